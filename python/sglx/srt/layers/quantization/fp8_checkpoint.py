"""FP8 checkpoints: weights stored in e4m3 with their scales, loaded straight into Fp8Linear (no re-quantizing).

Read from config.json's `quantization_config`:
* `compressed-tensors` (llm-compressor's FP8 and FP8-dynamic schemes): 8-bit float weights with one scale per
  output channel or per tensor, the `ignore` list kept in full precision (the lm_head, usually);
* `fp8` (AutoFP8, transformers' FP8 without `weight_block_size`): one scale per weight tensor.
A per-tensor scale becomes the same scale on every row, so Fp8Linear's row-wise GEMM computes exactly the
checkpoint's product. Activations are quantized per token on the fly, as under `--quantization fp8`; a static
`input_scale` in the checkpoint is not used (a per-token scale is never coarser).

Block-wise FP8 (`fp8` with `weight_block_size`: DeepSeek-V3, the Qwen3 *-FP8 repos; compressed-tensors'
"block" strategy) needs a block-scaled GEMM, which sglx does not have yet: such weights are dequantized to the
serving dtype as they load (codes times their block's scale in fp32, rounded once), so the model serves in full
precision, or in per-channel FP8 again with `--quantization fp8`. Integer schemes and other methods are refused at
start-up by name.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any, Dict, Iterable, Iterator, Optional, Tuple

import torch
from torch import nn

from sglx.srt.layers.quantization.fp8 import FP8_DTYPE, Fp8Linear, fp8_eligible

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Fp8CheckpointConfig:
    ignore: Tuple[str, ...] = ()  # module names, or "re:" patterns, kept in the serving dtype
    scheme: str = "channel"  # the weight scales' granularity: "channel", "tensor" or "block"
    block: Tuple[int, int] = (128, 128)  # "block": rows x columns that share one scale

    @property
    def dequantize(self) -> bool:
        """Loaded as full-precision weights (block-wise scales), not as Fp8Linear."""
        return self.scheme == "block"

    def ignores(self, module_name: str) -> bool:
        for pattern in self.ignore:
            if pattern.startswith("re:"):
                if re.fullmatch(pattern[3:], module_name):
                    return True
            elif module_name == pattern or module_name.endswith("." + pattern):
                return True
        return False


def _quant_config(hf_config: Any) -> Optional[Dict[str, Any]]:
    qc = getattr(hf_config, "quantization_config", None)
    if qc is None:
        text = getattr(hf_config, "get_text_config", lambda: None)()
        qc = getattr(text, "quantization_config", None)
    if qc is not None and not isinstance(qc, dict):
        qc = qc.to_dict() if hasattr(qc, "to_dict") else vars(qc)
    return qc


def fp8_checkpoint_config(hf_config: Any) -> Optional[Fp8CheckpointConfig]:
    """The checkpoint's FP8 scheme, or None for a full-precision checkpoint; ValueError for a quantized
    checkpoint sglx cannot serve, naming what it is."""
    qc = _quant_config(hf_config)
    if not qc:
        return None
    method = qc.get("quant_method")
    if method == "fp8":
        ignore = tuple(qc.get("ignored_layers") or qc.get("modules_to_not_convert") or ())
        block = qc.get("weight_block_size")
        if block:
            return Fp8CheckpointConfig(ignore=ignore, scheme="block", block=_block_shape(block))
        return Fp8CheckpointConfig(ignore=ignore, scheme="tensor")
    if method == "compressed-tensors":
        groups = list((qc.get("config_groups") or {}).values())
        if len(groups) != 1:
            raise ValueError(f"compressed-tensors checkpoints with {len(groups)} config groups are not supported")
        w = groups[0].get("weights") or {}
        if w.get("type") != "float" or w.get("num_bits") != 8 or w.get("strategy") not in ("channel", "tensor",
                                                                                          "block"):
            raise ValueError("only FP8 compressed-tensors checkpoints (8-bit float weights, per-channel, per-tensor "
                             f"or block scales) are supported; this one has weights {w}")
        a = groups[0].get("input_activations")
        if a is not None and (a.get("type") != "float" or a.get("num_bits") != 8):
            raise ValueError(f"compressed-tensors input activations {a} are not supported (FP8 only)")
        if qc.get("format") not in (None, "float-quantized", "naive-quantized"):
            raise ValueError(f"compressed-tensors format {qc.get('format')!r} is not supported")
        block = _block_shape(w.get("block_structure") or (128, 128)) if w["strategy"] == "block" else (128, 128)
        return Fp8CheckpointConfig(ignore=tuple(qc.get("ignore") or ()), scheme=w["strategy"], block=block)
    raise ValueError(f"quantized checkpoints of quant_method {method!r} are not supported; FP8 ones "
                     "(compressed-tensors, fp8) are, and --quantization fp8 quantizes a full-precision checkpoint")


def _block_shape(value: Any) -> Tuple[int, int]:
    if isinstance(value, str):  # compressed-tensors has written "128x128"
        value = value.lower().split("x")
    rows, cols = (int(v) for v in value)
    if rows < 1 or cols < 1:
        raise ValueError(f"FP8 block size {value} is not a positive size")
    return rows, cols


def dequantize_blockwise(q: torch.Tensor, scale: torch.Tensor, block: Tuple[int, int]) -> torch.Tensor:
    """q [N, K] e4m3 with one scale per block of `block` (the last blocks may be partial) -> fp32 values."""
    rows, cols = block
    n, k = q.shape
    if scale.shape != (-(-n // rows), -(-k // cols)):
        raise ValueError(f"block scales of shape {tuple(scale.shape)} do not tile a {n} x {k} weight in "
                         f"{rows} x {cols} blocks")
    full = scale.float().repeat_interleave(rows, 0)[:n].repeat_interleave(cols, 1)[:, :k]
    return q.float() * full


def dequantized_weights(weights: Iterable[Tuple[str, torch.Tensor]],
                        cfg: Fp8CheckpointConfig) -> Iterator[Tuple[str, torch.Tensor]]:
    """A block-wise FP8 checkpoint's tensors as a full-precision one: each e4m3 `X.weight` times its block
    scales (`X.weight_scale_inv`, or compressed-tensors' `X.weight_scale`), in fp32 (the model casts it)."""
    for name, tensor in _pairs(weights, scale_names=("weight_scale_inv", "weight_scale")):
        if isinstance(tensor, tuple):
            q, scale = tensor
            yield name, dequantize_blockwise(q, scale, cfg.block)
        else:
            yield name, tensor


def prepare_fp8_model(model: nn.Module, cfg: Fp8CheckpointConfig) -> int:
    """Replace each linear the checkpoint stores in FP8 (fp8_eligible and not ignored) by an empty Fp8Linear
    that the loader fills; returns how many."""
    targets = [(n, m) for n, m in model.named_modules() if fp8_eligible(n, m) and not cfg.ignores(n)]
    for name, linear in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, Fp8Linear.empty_like(linear))
    return len(targets)


def fp8_checkpoint_weights(weights: Iterable[Tuple[str, torch.Tensor]]) -> Iterator[Tuple[str, torch.Tensor]]:
    """The checkpoint's tensors as the model loads them: each e4m3 `X.weight` followed by its `X.weight_scale`
    as fp32 [rows] (a per-tensor scale repeated on every row); everything else as it comes."""
    for name, tensor in _pairs(weights, scale_names=("weight_scale",)):
        if not isinstance(tensor, tuple):
            yield name, tensor
            continue
        weight, scale = tensor
        scale = scale.float().reshape(-1)
        if scale.numel() == 1:
            scale = scale.expand(weight.shape[0])
        if scale.numel() != weight.shape[0]:
            raise ValueError(f"{name}_scale has {scale.numel()} values for {weight.shape[0]} rows "
                             "(only per-channel or per-tensor scales are loaded as FP8)")
        yield name, weight
        yield f"{name}_scale", scale.contiguous()


def _pairs(weights: Iterable[Tuple[str, torch.Tensor]], scale_names: Tuple[str, ...]) -> Iterator[Tuple[str, Any]]:
    """The stream with each e4m3 `X.weight` and its scale (`X.<one of scale_names>`) joined into one item
    ("X.weight", (codes, scale)); static `X.input_scale`s dropped; everything else as it comes. A weight and
    its scale may come in either order (or different shards): each waits for the other. Fails on an FP8
    weight without a scale, or a scale without its weight."""
    pending: Dict[str, Dict[str, torch.Tensor]] = {}
    dropped_input_scales = 0
    for name, tensor in weights:
        prefix, _, kind = name.rpartition(".")
        if kind == "input_scale":
            dropped_input_scales += 1
            continue
        if kind in scale_names or (kind == "weight" and tensor.dtype == FP8_DTYPE):
            pair = pending.setdefault(prefix, {})
            pair["scale" if kind in scale_names else "weight"] = tensor
            if len(pair) == 2:
                del pending[prefix]
                yield f"{prefix}.weight", (pair["weight"], pair["scale"])
            continue
        yield name, tensor
    if pending:
        prefix, pair = next(iter(pending.items()))
        raise ValueError(f"FP8 checkpoint: {prefix} has only its {next(iter(pair))}, not both weight and scale")
    if dropped_input_scales:
        logger.info("FP8 checkpoint: %d static input scales not used (activations are quantized per token)",
                    dropped_input_scales)

"""FP8 checkpoints: weights stored in e4m3 with their scales, loaded straight into Fp8Linear (no re-quantizing).

Read from config.json's `quantization_config`:
* `compressed-tensors` (llm-compressor's FP8 and FP8-dynamic schemes): 8-bit float weights with one scale per
  output channel or per tensor, the `ignore` list kept in full precision (the lm_head, usually);
* `fp8` (AutoFP8, transformers' FP8 without `weight_block_size`): one scale per weight tensor.
A per-tensor scale becomes the same scale on every row, so Fp8Linear's row-wise GEMM computes exactly the
checkpoint's product. Activations are quantized per token on the fly, as under `--quantization fp8`; a static
`input_scale` in the checkpoint is not used (a per-token scale is never coarser). Block-wise FP8
(`weight_block_size`: DeepSeek-V3, the Qwen3 *-FP8 repos) and integer schemes are refused at start-up with a
clear error: they need other GEMMs.
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
    scheme: str = "channel"  # the weight scales' granularity: "channel" or "tensor"

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
        if qc.get("weight_block_size"):
            raise ValueError(f"block-wise FP8 checkpoints (weight_block_size {qc['weight_block_size']}) are not "
                             "supported yet: serve the bf16 checkpoint with --quantization fp8")
        return Fp8CheckpointConfig(ignore=tuple(qc.get("ignored_layers") or qc.get("modules_to_not_convert") or ()),
                                   scheme="tensor")
    if method == "compressed-tensors":
        groups = list((qc.get("config_groups") or {}).values())
        if len(groups) != 1:
            raise ValueError(f"compressed-tensors checkpoints with {len(groups)} config groups are not supported")
        w = groups[0].get("weights") or {}
        if w.get("type") != "float" or w.get("num_bits") != 8 or w.get("strategy") not in ("channel", "tensor"):
            raise ValueError("only FP8 compressed-tensors checkpoints (8-bit float weights, per-channel or per-tensor "
                             f"scales) are supported; this one has weights {w}")
        a = groups[0].get("input_activations")
        if a is not None and (a.get("type") != "float" or a.get("num_bits") != 8):
            raise ValueError(f"compressed-tensors input activations {a} are not supported (FP8 only)")
        if qc.get("format") not in (None, "float-quantized", "naive-quantized"):
            raise ValueError(f"compressed-tensors format {qc.get('format')!r} is not supported")
        return Fp8CheckpointConfig(ignore=tuple(qc.get("ignore") or ()), scheme=w["strategy"])
    raise ValueError(f"quantized checkpoints of quant_method {method!r} are not supported; FP8 ones "
                     "(compressed-tensors, fp8) are, and --quantization fp8 quantizes a full-precision checkpoint")


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
    as fp32 [rows] (a per-tensor scale repeated on every row); static `X.input_scale`s dropped; everything else
    as it comes. A weight and its scale may come in either order (or different shards): each waits for the
    other. Fails on an FP8 weight without a scale, or a scale without its weight."""
    pending: Dict[str, Dict[str, torch.Tensor]] = {}
    dropped_input_scales = 0
    for name, tensor in weights:
        prefix, _, kind = name.rpartition(".")
        if kind == "input_scale":
            dropped_input_scales += 1
            continue
        if kind == "weight_scale" or (kind == "weight" and tensor.dtype == FP8_DTYPE):
            pair = pending.setdefault(prefix, {})
            pair[kind] = tensor
            if len(pair) == 2:
                del pending[prefix]
                weight, scale = pair["weight"], pair["weight_scale"].float().reshape(-1)
                if scale.numel() == 1:
                    scale = scale.expand(weight.shape[0])
                if scale.numel() != weight.shape[0]:
                    raise ValueError(f"{prefix}.weight_scale has {scale.numel()} values for {weight.shape[0]} rows "
                                     "(only per-channel or per-tensor scales are supported)")
                yield f"{prefix}.weight", weight
                yield f"{prefix}.weight_scale", scale.contiguous()
            continue
        yield name, tensor
    if pending:
        prefix, pair = next(iter(pending.items()))
        raise ValueError(f"FP8 checkpoint: {prefix} has {sorted(pair)} but not both weight and weight_scale")
    if dropped_input_scales:
        logger.info("FP8 checkpoint: %d static input scales not used (activations are quantized per token)",
                    dropped_input_scales)

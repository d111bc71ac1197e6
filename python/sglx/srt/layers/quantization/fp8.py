"""FP8 (e4m3) W8A8 linear layers, quantized online from the loaded weights (`--quantization fp8`).

Weights: one scale per output channel (row), computed once after loading, so any checkpoint (bf16/fp16/fp32
safetensors, GGUF, dummy) can be served in FP8. Activations: one scale per token, computed on the fly. The
product is `(q_x @ q_w^T) * s_x * s_w` with fp32 accumulation: on Hopper sgl_kernel's CUTLASS `fp8_scaled_mm`
where it imports, else on sm89+ GPUs `torch._scaled_mm` (row-wise scales, cuBLASLt), elsewhere (CPU, older
GPUs) the plain torch reference below, which both GPU GEMMs are tested against (choose_fp8_gemm;
$SGLX_FP8_GEMM). Finer than vLLM's online `--quantization fp8` (one scale per weight tensor and per activation
tensor): the scheme of llm-compressor's FP8-dynamic checkpoints, at no extra cost in the row-wise GEMM.
"""

from __future__ import annotations

import logging
import os
from typing import NamedTuple, Optional, Tuple, Union

import torch
from torch import nn

logger = logging.getLogger(__name__)

FP8_DTYPE = torch.float8_e4m3fn
FP8_E4M3_MAX = 448.0
AMAX_EPS = 1e-10  # kept equal to fp8_kernels._AMAX_EPS (that module imports triton, this one must not)
# scale = amax * (1/448) in fp32, written as a multiply on purpose: torch's CUDA division by a Python scalar is
# itself a multiply by the reciprocal, its CPU division is not, and the kernel must match both bit for bit.
INV_FP8_E4M3_MAX = 1.0 / FP8_E4M3_MAX


class Fp8Activation(NamedTuple):
    """An Fp8Linear's input already quantized by the layer before it (RMSNorm or a gated activation fused with
    the quantization): q [M, K] e4m3, scale [M, 1] fp32, and the dtype the linear's output takes."""

    q: torch.Tensor
    scale: torch.Tensor
    dtype: torch.dtype


def quantize_activation(y: torch.Tensor) -> Fp8Activation:
    """The unfused form of the producers' quant_fp8 outputs: y [..., K] -> Fp8Activation of y's rows."""
    q, scale = per_token_quant_fp8(y.reshape(-1, y.shape[-1]).contiguous())
    return Fp8Activation(q, scale, y.dtype)


def per_token_quant_fp8_ref(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (q [M, K] e4m3, scale [M, 1] fp32); the Triton kernel's reference."""
    xf = x.float()
    scale = xf.abs().amax(dim=-1, keepdim=True).clamp_min(AMAX_EPS) * INV_FP8_E4M3_MAX
    # A multiply by the row's reciprocal, not a division per element: the kernels do the same (one IEEE division
    # per row; per element a division costs the fused activation kernel twice its memory time).
    q = (xf * (1.0 / scale)).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(FP8_DTYPE)
    return q, scale


def quantize_weight_per_channel(w: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (q [N, K] e4m3, scale [N] fp32): the row-wise form of per_token_quant_fp8_ref."""
    q, scale = per_token_quant_fp8_ref(w)
    return q, scale.squeeze(-1)


def scaled_mm_ref(
    qx: torch.Tensor, sx: torch.Tensor, qw: torch.Tensor, sw: torch.Tensor, out_dtype: torch.dtype
) -> torch.Tensor:
    """(qx @ qw^T) * sx * sw in fp32, rounded once to out_dtype: what the FP8 GEMM computes."""
    acc = torch.mm(qx.float(), qw.float().t())
    return (acc * sx * sw.unsqueeze(0)).to(out_dtype)


def has_fp8_gemm(device: torch.device) -> bool:
    """torch._scaled_mm with row-wise scales needs an FP8 GPU (sm89+); the shapes are checked at conversion."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


# The FP8 GEMM of an Fp8Linear, by name: each computes (qx @ W^T) * sx * s_w (+ bias) into a new tensor.
#   sgl_kernel  sgl_kernel.fp8_scaled_mm (CUTLASS, sm90): 1263-1370 TFLOP/s on Qwen3-0.6B's 16k-token linears
#               on an H200, against 1056-1266 for torch's (docs/benchmarks.md, session 6);
#   torch       torch._scaled_mm with row-wise scales (cuBLASLt), any sm89+ GPU;
#   reference   scaled_mm_ref (any device; what the others are tested against).
FP8_GEMM_ENV = "SGLX_FP8_GEMM"
FP8_GEMMS = ("sgl_kernel", "torch", "reference")


def _gemm_sgl_kernel(layer: "Fp8Linear", qx: torch.Tensor, sx: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    import sgl_kernel

    return sgl_kernel.fp8_scaled_mm(qx, layer._weight_t, sx, layer.weight_scale, dtype, layer.bias)


def _gemm_torch(layer: "Fp8Linear", qx: torch.Tensor, sx: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    y = torch._scaled_mm(qx, layer._weight_t, scale_a=sx, scale_b=layer._scale_b, out_dtype=dtype)
    return y if layer.bias is None else y + layer.bias


def _gemm_reference(layer: "Fp8Linear", qx: torch.Tensor, sx: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    y = scaled_mm_ref(qx, sx, layer.weight, layer.weight_scale, dtype)
    return y if layer.bias is None else y + layer.bias


def _sgl_kernel_fp8_gemm_available(device: torch.device) -> bool:
    """sgl_kernel's FP8 GEMM: Hopper (the sm90 build sglx's GPU host carries), when the package imports."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device) != (9, 0):
        return False
    try:
        import sgl_kernel
    except Exception:  # missing, or built for another torch: the torch GEMM serves
        return False
    return hasattr(sgl_kernel, "fp8_scaled_mm")


def choose_fp8_gemm(device: torch.device) -> str:
    """The GEMM an Fp8Linear on `device` uses: $SGLX_FP8_GEMM if set (one of FP8_GEMMS), else sgl_kernel where
    it runs, else torch on FP8 GPUs, else the reference."""
    name = os.environ.get(FP8_GEMM_ENV, "auto")
    if name == "auto":
        if _sgl_kernel_fp8_gemm_available(device):
            return "sgl_kernel"
        return "torch" if has_fp8_gemm(device) else "reference"
    if name not in FP8_GEMMS:
        raise ValueError(f"{FP8_GEMM_ENV} must be auto or one of {', '.join(FP8_GEMMS)}; got {name!r}")
    if name == "sgl_kernel" and not _sgl_kernel_fp8_gemm_available(device):
        raise RuntimeError(f"{FP8_GEMM_ENV}=sgl_kernel, but sgl_kernel's FP8 GEMM does not run on {device}")
    if name == "torch" and not has_fp8_gemm(device):
        raise RuntimeError(f"{FP8_GEMM_ENV}=torch needs a GPU of compute capability 8.9 or newer")
    return name


_GEMM_FNS = {"sgl_kernel": _gemm_sgl_kernel, "torch": _gemm_torch, "reference": _gemm_reference}


def per_token_quant_fp8(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    if x.is_cuda:
        from sglx.srt.layers.quantization import fp8_kernels  # lazily: see fp8_kernels' docstring

        return fp8_kernels.per_token_quant_fp8(x)
    return per_token_quant_fp8_ref(x)


class Fp8Linear(nn.Module):
    """y = x @ W^T + b with W in e4m3 and one fp32 scale per output channel; x is quantized per token.

    Built from a loaded nn.Linear (`from_linear`); its in/out features must be multiples of 16 (the FP8 GEMM's
    alignment). The output keeps the input's dtype."""

    def __init__(self, weight: torch.Tensor, weight_scale: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.weight_scale = nn.Parameter(weight_scale, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.gemm = choose_fp8_gemm(weight.device)  # decided once: no device query per forward
        self._gemm = _GEMM_FNS[self.gemm]
        # The GEMM's operand layouts, made once (views): prefill under fp8 is close to host-bound, so every
        # microsecond of Python per linear shows.
        self._weight_t = self.weight.t()
        self._scale_b = self.weight_scale.view(1, -1)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Fp8Linear":
        with torch.no_grad():
            q, scale = quantize_weight_per_channel(linear.weight)
            bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(q, scale, bias)

    @classmethod
    def empty_like(cls, linear: nn.Linear) -> "Fp8Linear":
        """An unfilled layer of `linear`'s shape, for an FP8 checkpoint's loader (fp8_checkpoint.py); a
        StackedLinear's shards stay addressable by name (load_shard)."""
        w = linear.weight
        layer = cls(torch.empty(w.shape, dtype=FP8_DTYPE, device=w.device),
                    torch.empty(w.shape[0], dtype=torch.float32, device=w.device),
                    None if linear.bias is None else torch.empty_like(linear.bias))
        layer.shard_offsets = dict(getattr(linear, "shard_offsets", {}))
        return layer

    def load_shard(self, shard: str, param_kind: str, tensor: torch.Tensor) -> None:
        """A StackedLinear shard's e4m3 rows ("weight"), their scales ("weight_scale") or its bias."""
        off, n = self.shard_offsets[shard]
        target = {"weight": self.weight, "weight_scale": self.weight_scale, "bias": self.bias}[param_kind]
        if target is None or tensor.shape[0] != n or tensor.shape[1:] != target.shape[1:]:
            raise ValueError(f"shard {shard!r} {param_kind}: checkpoint has {tuple(tensor.shape)}")
        if (target.dtype == FP8_DTYPE) != (tensor.dtype == FP8_DTYPE):
            raise ValueError(f"shard {shard!r} {param_kind}: {tensor.dtype} into {target.dtype}")
        with torch.no_grad():
            target[off : off + n].copy_(tensor)

    def forward(self, x: Union[torch.Tensor, Fp8Activation]) -> torch.Tensor:
        """x [..., in_features] -> [..., out_features]; an Fp8Activation (rows already quantized) -> 2-D."""
        if isinstance(x, Fp8Activation):
            qx, sx, dtype, lead = x.q, x.scale, x.dtype, x.q.shape[:-1]
        else:
            x2 = x.reshape(-1, x.shape[-1])
            qx, sx = per_token_quant_fp8(x2 if x2.stride(-1) == 1 else x2.contiguous())
            dtype, lead = x.dtype, x.shape[:-1]
        return self._gemm(self, qx, sx, dtype).reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"gemm={self.gemm}")


def fp8_eligible(name: str, module: nn.Module) -> bool:
    """Every nn.Linear of the trunk whose shape the FP8 GEMM takes; the lm_head stays in the serving dtype
    (logits are sensitive and it is one GEMM per token, as in SGLang and vLLM)."""
    return (isinstance(module, nn.Linear) and not name.split(".")[-1] == "lm_head"
            and module.in_features % 16 == 0 and module.out_features % 16 == 0)


def fuse_input_quantization(model: nn.Module) -> int:
    """Let each producer a model lists in `fp8_input_pairs` ((producer, consumer) paths relative to the module
    that declares them; the producer's output must feed only that consumer) emit its output already quantized
    when its consumer is an Fp8Linear: one pass over the activation instead of two. Returns how many."""
    n = 0
    for module in model.modules():
        for producer, consumer in getattr(module, "fp8_input_pairs", ()):
            if isinstance(module.get_submodule(consumer), Fp8Linear):
                module.get_submodule(producer).quant_fp8 = True
                n += 1
    return n


def quantize_model_fp8(model: nn.Module) -> int:
    """Replace each eligible nn.Linear of `model` by an Fp8Linear, in place, and fuse the input quantization
    into the layers that feed them (fuse_input_quantization); returns how many linears were replaced."""
    targets = [(name, m) for name, m in model.named_modules() if fp8_eligible(name, m)]
    skipped = [name for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and not fp8_eligible(name, m) and not name.endswith("lm_head")]
    for name, linear in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, Fp8Linear.from_linear(linear))
    fused = fuse_input_quantization(model)
    logger.info("fp8: %d linear layers quantized; %d of their inputs quantized by the layer before", len(targets),
                fused)
    if skipped:
        logger.info("fp8: %d linear layers kept in the serving dtype (features not multiples of 16): %s",
                    len(skipped), ", ".join(skipped[:4]) + (" ..." if len(skipped) > 4 else ""))
    return len(targets)

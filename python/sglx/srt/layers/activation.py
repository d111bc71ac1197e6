"""Gated activations: input is [..., 2 * d] = [gate | up].

On CUDA each runs as one fused Triton kernel (see layernorm.fused_ops for the switch); the torch code below is
the CPU path and the reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sglx.srt.layers.layernorm import fused_ops
from sglx.srt.layers.quantization.fp8 import quantize_activation


class SiluAndMul(nn.Module):
    # Set by quantization.fp8.fuse_input_quantization when the output feeds only an Fp8Linear: the output is then
    # an Fp8Activation (one kernel on CUDA; the torch path quantizes after the product, the same arithmetic).
    quant_fp8 = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ops = fused_ops(x)
        if ops is not None:
            return ops.silu_and_mul(x, quant_fp8=self.quant_fp8)
        d = x.shape[-1] // 2
        out = F.silu(x[..., :d]) * x[..., d:]
        return quantize_activation(out) if self.quant_fp8 else out


class GeluAndMul(nn.Module):
    def __init__(self, approximate: str = "tanh") -> None:
        super().__init__()
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ops = fused_ops(x)
        if ops is not None and self.approximate in ("tanh", "none"):
            return ops.gelu_and_mul(x, self.approximate)
        d = x.shape[-1] // 2
        return F.gelu(x[..., :d], approximate=self.approximate) * x[..., d:]

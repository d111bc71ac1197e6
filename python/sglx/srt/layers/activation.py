"""Gated activations: input is [..., 2 * d] = [gate | up].

On CUDA each runs as one fused Triton kernel (see layernorm.fused_ops for the switch); the torch code below is
the CPU path and the reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sglx.srt.layers.layernorm import fused_ops


class SiluAndMul(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ops = fused_ops(x)
        if ops is not None:
            return ops.silu_and_mul(x)
        d = x.shape[-1] // 2
        return F.silu(x[..., :d]) * x[..., d:]


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

"""RMSNorm with an optional fused residual add (the residual stream is returned updated).

On CUDA the work runs in one fused Triton kernel (layers/triton_ops/fused_elementwise.py); elsewhere, or with
SGLX_DISABLE_FUSED_KERNELS=1, in the plain torch code below, which is also the reference the kernel is tested
against. `fused_ops` is the one switch for all the layers that have such a kernel.
"""

from __future__ import annotations

import logging
import os
from types import ModuleType
from typing import Optional, Tuple, Union

import torch
from torch import nn

from sglx.srt.layers.quantization.fp8 import quantize_activation

logger = logging.getLogger(__name__)

DISABLE_ENV = "SGLX_DISABLE_FUSED_KERNELS"
_fused_module: Optional[ModuleType] = None
_fused_unavailable = False


def fused_ops(t: torch.Tensor) -> Optional[ModuleType]:
    """The fused-kernel module when `t` is a CUDA tensor, triton imports, and SGLX_DISABLE_FUSED_KERNELS is not
    set to 1; otherwise None (use the torch path).

    The import is lazy on purpose: importing the module decorates its kernels, which fixes for the whole process
    whether Triton interprets them (TRITON_INTERPRET), and CPU runs should never import triton at all.
    """
    global _fused_module, _fused_unavailable
    if not t.is_cuda or _fused_unavailable or os.environ.get(DISABLE_ENV, "0") == "1":
        return None
    if _fused_module is None:
        try:
            from sglx.srt.layers.triton_ops import fused_elementwise
        except Exception as e:  # triton missing or broken: keep serving on the torch path
            logger.warning("fused Triton elementwise kernels unavailable (%r); using the torch path", e)
            _fused_unavailable = True
            return None
        _fused_module = fused_elementwise
    return _fused_module


class RMSNorm(nn.Module):
    # Set by quantization.fp8.fuse_input_quantization when the output feeds only an Fp8Linear: the output is then
    # an Fp8Activation (one kernel on CUDA; the torch path quantizes after the norm, the same arithmetic).
    quant_fp8 = False

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(
        self, x: torch.Tensor, residual: Optional[torch.Tensor] = None
    ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        """With `residual`, returns (norm(x + residual), x + residual). On the fused path the sum is written
        into `residual` in place and that same tensor is returned; on the torch path it is a new tensor."""
        ops = fused_ops(x)
        if ops is not None and (residual is None or (residual.dtype == x.dtype and residual.shape == x.shape)) \
                and (not self.quant_fp8 or self.weight.dtype == x.dtype):
            return ops.rmsnorm(x, self.weight, self.variance_epsilon, residual, quant_fp8=self.quant_fp8)
        if residual is not None:
            x = x + residual
            residual = x
        out = self._norm(x)
        if self.quant_fp8:
            out = quantize_activation(out)
        return out if residual is None else (out, residual)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        # Same order of operations as the HF reference: normalize in fp32, cast, then scale.
        dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * xf.to(dtype)

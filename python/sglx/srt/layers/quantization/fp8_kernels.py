"""Triton kernel for FP8 (e4m3) activation quantization, one scale per token (row).

One pass per row: amax, scale = amax * (1/448), q = clamp(x * (1 / scale)) rounded to nearest even, the same arithmetic
as `fp8.per_token_quant_fp8_ref`, which the tests hold it to bit for bit. Imported lazily by fp8.py on the first
CUDA tensor (importing fixes whether Triton interprets the kernel, as in triton_ops/fused_elementwise.py).
Launches do no host syncs, so they can be captured in a CUDA graph.
"""

from __future__ import annotations

import os
from typing import Tuple

import torch
import triton
import triton.language as tl

# Equal to fp8.FP8_E4M3_MAX, fp8.INV_FP8_E4M3_MAX and fp8.AMAX_EPS (the amax floor: an all-zero row gets a tiny
# scale instead of a division by zero; its q is all zero either way).
_FP8_MAX = tl.constexpr(448.0)
_INV_FP8_MAX = tl.constexpr(1.0 / 448.0)
_AMAX_EPS = tl.constexpr(1e-10)
_INTERP = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _to_e4m3_grid(v, INTERP: tl.constexpr):
    """|v| <= 448 in fp32 -> the nearest e4m3 value (ties to even), still fp32. Only the interpreter needs it:
    its fp32 -> fp8 cast rounds wrongly (e.g. 125.06 -> 64), while it converts exact e4m3 values exactly."""
    if INTERP:
        a = tl.abs(v)
        # Normal range (>= 2^-6): keep 3 of fp32's 23 mantissa bits, rounding the dropped 20 to nearest even.
        b = a.to(tl.uint32, bitcast=True)
        b = (b + 0x7FFFF + ((b >> 20) & 1)) & 0xFFF00000
        normal = b.to(tl.float32, bitcast=True)
        # Subnormals are multiples of 2^-9: adding 2^14 makes fp32's own rounding (ties to even) do it.
        sub = (a + 16384.0) - 16384.0
        r = tl.where(a < 0.015625, sub, normal)
        sign = v.to(tl.uint32, bitcast=True) & 0x80000000  # -0.0 and values rounding to zero keep their sign
        return (r.to(tl.uint32, bitcast=True) | sign).to(tl.float32, bitcast=True)
    else:
        return v


@triton.jit
def quant_fp8_rows(y, INTERP: tl.constexpr):
    """y [R, C] fp32 (zero where masked) -> (q [R, C] fp32 on the e4m3 grid, scale [R] fp32): one scale per row,
    amax * (1/448), and q = clamp(y * (1 / scale)) rounded to nearest even. Shared by every kernel that emits FP8
    (here and, fused into RMSNorm and the gated activations, in triton_ops/fused_elementwise.py)."""
    amax = tl.maximum(tl.max(tl.abs(y), axis=1), _AMAX_EPS)
    scale = amax * _INV_FP8_MAX  # fp32 multiply, as the reference does (fp8.INV_FP8_E4M3_MAX says why)
    if INTERP:
        inv = 1.0 / scale
    else:  # IEEE division, as torch's reciprocal: Triton's `/` is approximate on the GPU
        inv = tl.math.div_rn(1.0, scale)
    q = y * inv[:, None]
    q = _to_e4m3_grid(tl.minimum(tl.maximum(q, -_FP8_MAX), _FP8_MAX), INTERP)
    return q, scale


@triton.jit
def _per_token_quant_fp8_kernel(
    x_ptr, q_ptr, s_ptr, N, stride_x, stride_q, BLOCK: tl.constexpr, INTERP: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)[None, :]
    mask = cols < N
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    q, scale = quant_fp8_rows(x, INTERP)
    tl.store(q_ptr + row * stride_q + cols, q.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + row + tl.arange(0, 1), scale)


def per_token_quant_fp8(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] (last dim contiguous) -> (q [M, K] float8_e4m3fn, scale [M, 1] float32), x ~= q * scale."""
    assert x.dim() == 2 and x.stride(-1) == 1, "per_token_quant_fp8 takes rows with a contiguous last dim"
    m, k = x.shape
    q = torch.empty((m, k), dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    if m:
        block = triton.next_power_of_2(k)
        _per_token_quant_fp8_kernel[(m,)](
            x, q, scale, k, x.stride(0), q.stride(0), BLOCK=block, INTERP=_INTERP,
            num_warps=min(max(block // 256, 1), 8),
        )
    return q, scale

"""Fused Triton kernels for the per-token elementwise work of a decoder layer.

RMSNorm (optionally with the residual add fused in), the gated activations (SiLU/GELU and mul) and rotary
position embedding, each one pass over memory instead of torch's chain of elementwise kernels. Every kernel
rounds like the torch code in layers/ does (compute in fp32, round to the activation dtype at the same points),
so outputs match the torch path bit for bit except where a transcendental or a reduction order differs by an
fp32 ulp that survives rounding (rare; the tests bound it).

Importing this module imports triton and decorates the kernels: whether they run compiled or interpreted
(TRITON_INTERPRET=1) is fixed at that moment, so the layers import it lazily, on their first CUDA tensor.
Launches do no host syncs and branch only on shapes, strides and dtypes, so they can be captured in a CUDA graph
(after a first, compiling call outside capture). Any strides are accepted (integer arguments equal to 1 are
specialised by Triton, so the contiguous case costs nothing extra).
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import triton
import triton.language as tl

# CUDA's accurate math library (expf, tanhf): what torch's CUDA kernels call, where tl.exp is an approximation.
from triton.language.extra import libdevice

from sglx.srt.layers.quantization.fp8 import Fp8Activation
from sglx.srt.layers.quantization.fp8_kernels import quant_fp8_rows

_ACTS = {"silu": 0, "gelu_tanh": 1, "gelu": 2}


# ============================================================================ jit helpers
# INTERP is true when the kernel runs in Triton's CPU interpreter: its fp32 -> bf16 cast truncates instead of
# rounding to nearest even, and it has no libdevice, so there we round by hand and use the core math ops.
@triton.jit
def _round(x, DTYPE: tl.constexpr, INTERP: tl.constexpr):
    """fp32 -> DTYPE, round to nearest even (what torch does when it stores an fp32 result)."""
    if INTERP and DTYPE == tl.bfloat16:
        b = x.to(tl.uint32, bitcast=True)
        b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
        x = b.to(tl.float32, bitcast=True)
    return x.to(DTYPE)


@triton.jit
def _silu(g, INTERP: tl.constexpr):
    # torch: x / (1 + exp(-x)) with IEEE expf and division; Triton's `/` and tl.exp are approximate on GPU.
    if INTERP:
        return g / (1.0 + tl.exp(-g))
    else:
        return tl.math.div_rn(g, 1.0 + libdevice.exp(-g))


@triton.jit
def _gelu_tanh(g, INTERP: tl.constexpr):
    inner = 0.7978845608028654 * (g + 0.044715 * (g * g * g))  # torch's order: sqrt(2/pi) * (x + k * x^3)
    if INTERP:  # no tanh here: from exp in fp64, then rounded, close to a correctly rounded tanhf
        th = (1.0 - 2.0 / (1.0 + tl.exp(2.0 * inner.to(tl.float64)))).to(tl.float32)
    else:
        th = libdevice.tanh(inner)
    return 0.5 * g * (1.0 + th)


@triton.jit
def _gelu_erf(g):
    # tl.math.erf is libdevice's erff on GPU: as accurate as the erff torch's CUDA build calls (~1 ulp), but not
    # the same implementation, so ~10% of fp32 results differ by an ulp (~1% of bf16 outputs by one step).
    return g * 0.5 * (1.0 + tl.math.erf(g * 0.7071067811865476))


# ============================================================================ RMSNorm
@triton.jit
def _rmsnorm_kernel(
    x_ptr, sx_o, sx_i, sx_d,  # input viewed as [outer, inner, D] with any strides
    r_ptr, sr_o, sr_i, sr_d,  # residual, same view; updated in place to x + residual
    w_ptr, out_ptr,  # weight [D]; out contiguous [outer * inner, D]
    s_ptr,  # QUANT: out holds e4m3 codes and s_ptr [outer * inner] one fp32 scale per row
    n_rows, inner, D, eps,
    HAS_RES: tl.constexpr, QUANT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
    INTERP: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    o, i = rows // inner, rows % inner
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    mask = (rows < n_rows)[:, None] & cmask[None, :]
    x_dt: tl.constexpr = x_ptr.dtype.element_ty
    x_off = (o * sx_o + i * sx_i)[:, None] + (cols * sx_d)[None, :]
    x = tl.load(x_ptr + x_off, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        r_off = (o * sr_o + i * sr_i)[:, None] + (cols * sr_d)[None, :]
        r = tl.load(r_ptr + r_off, mask=mask, other=0.0).to(tl.float32)
        s = _round(x + r, x_dt, INTERP)  # torch's `x + residual` in x's dtype
        tl.store(r_ptr + r_off, s, mask=mask)
        x = s.to(tl.float32)
    var = tl.sum(x * x, axis=1) / D
    normed = _round(x * tl.math.rsqrt(var + eps)[:, None], x_dt, INTERP).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    out_off = rows[:, None] * D + cols[None, :]
    if QUANT:  # the norm's output as torch rounds it (x's dtype), then quantized per row
        q, scale = quant_fp8_rows(_round(w[None, :] * normed, x_dt, INTERP).to(tl.float32), INTERP)
        tl.store(out_ptr + out_off, q.to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(s_ptr + rows, scale, mask=rows < n_rows)
    else:
        tl.store(out_ptr + out_off, _round(w[None, :] * normed, out_ptr.dtype.element_ty, INTERP), mask=mask)


def _as_3d(t: torch.Tensor) -> Optional[torch.Tensor]:
    """A [outer, inner, D] view of t sharing its memory, or None when the leading dims can't be merged."""
    if t.dim() == 1:
        return t.view(1, 1, -1)
    if t.dim() == 2:
        return t.unsqueeze(1)
    if t.dim() == 3:
        return t
    try:
        return t.view(-1, t.shape[-2], t.shape[-1])
    except RuntimeError:
        return None


def rmsnorm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: Optional[torch.Tensor] = None,
    quant_fp8: bool = False,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """RMSNorm over the last dim: `weight * normalize(x).to(x.dtype)`, as layers.layernorm.RMSNorm computes it.

    With `residual`, first s = x + residual (rounded to x.dtype); residual is overwritten with s IN PLACE and
    (norm(s), residual) is returned. x may be any view (e.g. per-head q/k slices of a qkv tensor); the output
    is a new contiguous tensor of x's shape in torch's result dtype of `weight * x`.
    With `quant_fp8` (weight in x's dtype), the output is an Fp8Activation instead: the same norm quantized to
    e4m3 with one scale per row, for an Fp8Linear to consume.
    """
    D = x.shape[-1]
    if weight.shape != (D,):
        raise ValueError(f"weight shape {tuple(weight.shape)} does not match the last dim {D}")
    weight = weight if weight.stride(0) == 1 else weight.contiguous()
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError("residual must have x's shape and dtype")
    out_dtype = torch.result_type(weight, x)
    if quant_fp8 and out_dtype != x.dtype:
        raise ValueError("quant_fp8 needs the norm weight in the input's dtype")
    out = torch.empty(x.shape, dtype=torch.float8_e4m3fn if quant_fp8 else out_dtype, device=x.device)
    x3 = _as_3d(x)
    if x3 is None:
        x3 = _as_3d(x.contiguous())
    r_work = None
    if residual is not None:
        r3 = _as_3d(residual)
        if r3 is None:  # rare: not viewable as 3-D; work on a copy and write it back
            r_work = residual.contiguous()
            r3 = _as_3d(r_work)
    n_rows = x3.shape[0] * x3.shape[1]
    scale = torch.empty((n_rows, 1), dtype=torch.float32, device=x.device) if quant_fp8 else None
    if n_rows and D:
        BLOCK_D = triton.next_power_of_2(D)
        BLOCK_R = max(1, min(16, 2048 // BLOCK_D))
        rr = r3 if residual is not None else x3
        _rmsnorm_kernel[(triton.cdiv(n_rows, BLOCK_R),)](
            x3, *x3.stride(), rr, *rr.stride(), weight, out, scale, n_rows, x3.shape[1], D, float(eps),
            HAS_RES=residual is not None, QUANT=quant_fp8, BLOCK_R=BLOCK_R, BLOCK_D=BLOCK_D,
            INTERP=x.device.type != "cuda",
            num_warps=min(16, max(1, BLOCK_R * BLOCK_D // 512)),
        )  # fmt: skip
    if quant_fp8:
        out = Fp8Activation(out.view(n_rows, D), scale, x.dtype)
    if residual is None:
        return out
    if r_work is not None:
        residual.copy_(r_work)
    return out, residual


# ============================================================================ gated activations
@triton.jit
def _act_and_mul_kernel(
    x_ptr, sx_r, sx_c, out_ptr, s_ptr, d,
    ACT: tl.constexpr, QUANT: tl.constexpr, BLOCK: tl.constexpr, INTERP: tl.constexpr,
):  # fmt: skip
    """QUANT: one program per row (BLOCK >= d), out holds e4m3 codes and s_ptr one fp32 scale per row."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < d
    base = x_ptr + row * sx_r
    g = tl.load(base + cols * sx_c, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(base + (cols + d) * sx_c, mask=mask, other=0.0).to(tl.float32)
    if ACT == 0:
        a = _silu(g, INTERP)
    elif ACT == 1:
        a = _gelu_tanh(g, INTERP)
    else:
        a = _gelu_erf(g)
    # torch rounds the activation to the input dtype before the product, then rounds the product.
    a = _round(a, x_ptr.dtype.element_ty, INTERP).to(tl.float32)
    if QUANT:
        y = _round(a * u, x_ptr.dtype.element_ty, INTERP).to(tl.float32)
        q, scale = quant_fp8_rows(y[None, :], INTERP)
        tl.store(out_ptr + row * d + cols[None, :], q.to(out_ptr.dtype.element_ty), mask=mask[None, :])
        tl.store(s_ptr + row + tl.arange(0, 1), scale)
    else:
        tl.store(out_ptr + row * d + cols, _round(a * u, out_ptr.dtype.element_ty, INTERP), mask=mask)


def _act_and_mul(x: torch.Tensor, act: str, out: Optional[torch.Tensor],
                 quant_fp8: bool = False) -> Union[torch.Tensor, "Fp8Activation"]:
    two_d = x.shape[-1]
    if two_d % 2:
        raise ValueError(f"the last dim ({two_d}) must be even: [gate | up]")
    d = two_d // 2
    if quant_fp8:
        return _act_and_mul_fp8(x, act, d)
    if out is None:
        out = torch.empty(*x.shape[:-1], d, dtype=x.dtype, device=x.device)
    elif out.shape != (*x.shape[:-1], d) or not out.is_contiguous():
        raise ValueError("out must be a contiguous tensor of shape [..., d]")
    x2 = x.reshape(-1, two_d)  # a view unless the leading dims can't be merged
    rows = x2.shape[0]
    if rows and d:
        BLOCK = min(1024, triton.next_power_of_2(d))
        _act_and_mul_kernel[(rows, triton.cdiv(d, BLOCK))](
            x2, x2.stride(0), x2.stride(1), out, None, d,
            ACT=_ACTS[act], QUANT=False, BLOCK=BLOCK, INTERP=x.device.type != "cuda",
            num_warps=4 if BLOCK >= 512 else 1,
        )  # fmt: skip
    return out


def _act_and_mul_fp8(x: torch.Tensor, act: str, d: int) -> "Fp8Activation":
    """The activation's output quantized per row ([rows, d] e4m3 and [rows, 1] scales): a row per program."""
    x2 = x.reshape(-1, 2 * d)
    rows = x2.shape[0]
    q = torch.empty((rows, d), dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty((rows, 1), dtype=torch.float32, device=x.device)
    if rows and d:
        BLOCK = triton.next_power_of_2(d)
        _act_and_mul_kernel[(rows, 1)](
            x2, x2.stride(0), x2.stride(1), q, scale, d,
            ACT=_ACTS[act], QUANT=True, BLOCK=BLOCK, INTERP=x.device.type != "cuda",
            num_warps=min(8, max(1, BLOCK // 512)),
        )  # fmt: skip
    return Fp8Activation(q, scale, x.dtype)


def silu_and_mul(
    x: torch.Tensor, out: Optional[torch.Tensor] = None, quant_fp8: bool = False
) -> Union[torch.Tensor, "Fp8Activation"]:
    """x [..., 2d] = [gate | up] -> silu(gate) * up, [..., d] (into `out` when given); with `quant_fp8`, that
    product quantized per row as an Fp8Activation [rows, d]."""
    return _act_and_mul(x, "silu", out, quant_fp8)


def gelu_and_mul(x: torch.Tensor, approximate: str = "tanh", out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x [..., 2d] = [gate | up] -> gelu(gate, approximate) * up; approximate is 'tanh' or 'none'."""
    if approximate not in ("tanh", "none"):
        raise ValueError(f"approximate must be 'tanh' or 'none', not {approximate!r}")
    return _act_and_mul(x, "gelu_tanh" if approximate == "tanh" else "gelu", out)


# ============================================================================ rotary embedding
@triton.jit
def _token_cos_sin(pos_ptr, cache_ptr, s_cache, t, HALF: tl.constexpr, HALF_P2: tl.constexpr):
    """Token t's (cos, sin) rows [HALF_P2] in fp32 (zero past HALF), the pair index i and its mask."""
    pos = tl.load(pos_ptr + t).to(tl.int64)
    i = tl.arange(0, HALF_P2)
    imask = i < HALF
    row = cache_ptr + pos * s_cache
    cos = tl.load(row + i, mask=imask, other=0.0).to(tl.float32)
    sin = tl.load(row + HALF + i, mask=imask, other=0.0).to(tl.float32)
    return cos, sin, i, imask


@triton.jit
def _pair_dims(i, HALF: tl.constexpr, IS_NEOX: tl.constexpr):
    """The two dims of rotated pair i."""
    if IS_NEOX:  # rotate halves: (x[i], x[i + rot/2])
        d1, d2 = i, i + HALF
    else:  # GPT-J: interleaved pairs (x[2i], x[2i + 1])
        d1, d2 = 2 * i, 2 * i + 1
    return d1, d2


@triton.jit
def _store_rotated(p1, p2, x1, x2, cos, sin, mask, DTYPE: tl.constexpr, INTERP: tl.constexpr):
    """Rotate the fp32 pairs (x1, x2) by (cos, sin), round once to DTYPE and store them at p1, p2."""
    tl.store(p1, _round(x1 * cos[None, :] - x2 * sin[None, :], DTYPE, INTERP), mask=mask)
    tl.store(p2, _round(x2 * cos[None, :] + x1 * sin[None, :], DTYPE, INTERP), mask=mask)


@triton.jit
def _rotate_heads(
    base, s_h, s_d, n_heads, h0, cos, sin, i, imask,
    HALF: tl.constexpr, BLOCK_H: tl.constexpr, IS_NEOX: tl.constexpr, INTERP: tl.constexpr,
):  # fmt: skip
    h = h0 + tl.arange(0, BLOCK_H)
    mask = (h < n_heads)[:, None] & imask[None, :]
    d1, d2 = _pair_dims(i, HALF, IS_NEOX)
    p1 = base + h[:, None] * s_h + (d1 * s_d)[None, :]
    p2 = base + h[:, None] * s_h + (d2 * s_d)[None, :]
    x1 = tl.load(p1, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(p2, mask=mask, other=0.0).to(tl.float32)
    _store_rotated(p1, p2, x1, x2, cos, sin, mask, base.dtype.element_ty, INTERP)


@triton.jit
def _rotary_kernel(
    pos_ptr, cache_ptr, s_cache,
    q_ptr, sq_t, sq_h, sq_d, n_q_heads,
    k_ptr, sk_t, sk_h, sk_d, n_k_heads,
    HALF: tl.constexpr, HALF_P2: tl.constexpr, BLOCK_H: tl.constexpr, IS_NEOX: tl.constexpr,
    INTERP: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0).to(tl.int64)
    h0 = tl.program_id(1) * BLOCK_H
    cos, sin, i, imask = _token_cos_sin(pos_ptr, cache_ptr, s_cache, t, HALF, HALF_P2)
    if h0 < n_q_heads:
        _rotate_heads(q_ptr + t * sq_t, sq_h, sq_d, n_q_heads, h0, cos, sin, i, imask,
                      HALF, BLOCK_H, IS_NEOX, INTERP)  # fmt: skip
    if h0 < n_k_heads:
        _rotate_heads(k_ptr + t * sk_t, sk_h, sk_d, n_k_heads, h0, cos, sin, i, imask,
                      HALF, BLOCK_H, IS_NEOX, INTERP)  # fmt: skip


def _heads_view(x: torch.Tensor, head_size: int, n: int) -> Tuple[int, int, int, int]:
    """(heads, token stride, head stride, dim stride) of x as [n, heads, head_size], without copying."""
    if x.dim() == 3 and x.shape[0] == n and x.shape[2] == head_size:
        return x.shape[1], x.stride(0), x.stride(1), x.stride(2)
    if x.dim() == 2 and x.shape[0] == n and x.shape[1] % head_size == 0:
        return x.shape[1] // head_size, x.stride(0), head_size * x.stride(1), x.stride(1)
    raise ValueError(f"expected [{n}, heads * {head_size}] or [{n}, heads, {head_size}], got {tuple(x.shape)}")


def rotary_embedding_(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: Optional[torch.Tensor],
    head_size: int,
    cos_sin_cache: torch.Tensor,
    is_neox_style: bool = True,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Rotate q and k IN PLACE and return them (the same tensors).

    q [n, heads * head_size] (or [n, heads, head_size]) and k likewise with its own head count may be views
    with any strides (e.g. column slices of one qkv tensor). cos_sin_cache [max_pos, rotary_dim] holds the cos
    half then the sin half; positions [n] (int64 or int32) index its rows. Dims past rotary_dim are untouched.
    Computed in fp32 from the fp32 cache and rounded once.
    """
    n = positions.shape[0]
    rotary_dim = cos_sin_cache.shape[-1]
    cos_sin_cache = cos_sin_cache if cos_sin_cache.stride(-1) == 1 else cos_sin_cache.contiguous()
    if rotary_dim % 2 or rotary_dim > head_size:
        raise ValueError(f"rotary_dim {rotary_dim} must be even and <= head_size {head_size}")
    hq, sq_t, sq_h, sq_d = _heads_view(q, head_size, n)
    if k is not None:
        hk, sk_t, sk_h, sk_d = _heads_view(k, head_size, n)
        if k.dtype != q.dtype:
            raise ValueError("q and k must share a dtype")
    else:
        hk, sk_t, sk_h, sk_d = 0, 0, 0, 0
    if n == 0 or max(hq, hk) == 0:
        return q, k
    half = rotary_dim // 2
    half_p2 = triton.next_power_of_2(half)
    block_h = min(triton.next_power_of_2(max(hq, hk)), max(1, 512 // half_p2))
    _rotary_kernel[(n, triton.cdiv(max(hq, hk), block_h))](
        positions, cos_sin_cache, cos_sin_cache.stride(0),
        q, sq_t, sq_h, sq_d, hq,
        k if k is not None else q, sk_t, sk_h, sk_d, hk,
        HALF=half, HALF_P2=half_p2, BLOCK_H=block_h, IS_NEOX=bool(is_neox_style),
        INTERP=q.device.type != "cuda", num_warps=4 if block_h * half_p2 >= 512 else 1,
    )  # fmt: skip
    return q, k


# ============================================================================ q/k norm + rotary
@triton.jit
def _qk_norm_rope_heads(
    base, s_h, s_d, n_heads, h0, w_ptr, D, eps, cos, sin, i, imask,
    HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, PARTIAL: tl.constexpr,
    IS_NEOX: tl.constexpr, INTERP: tl.constexpr,
):  # fmt: skip
    # Per-head RMSNorm then rotation of heads h0 .. h0 + BLOCK_H of one token, in place. The variance is summed
    # over the whole [BLOCK_H, BLOCK_D] tile as _rmsnorm_kernel sums it (the same bits on the interpreter; on a
    # GPU another thread layout may reorder the sum by an fp32 ulp); the rotation then re-reads its pairs (cache
    # hits) and normalizes them with _rmsnorm_kernel's per-element ops before rotating as _rotate_heads does.
    dt: tl.constexpr = base.dtype.element_ty
    h = h0 + tl.arange(0, BLOCK_H)
    hmask = h < n_heads
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    p = base + h[:, None] * s_h + (cols * s_d)[None, :]
    x = tl.load(p, mask=hmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
    r = tl.math.rsqrt(tl.sum(x * x, axis=1) / D + eps)[:, None]
    if PARTIAL:  # rotary_dim < head_size: dims past rotary_dim are only normalized
        tmask = hmask[:, None] & (cmask & (cols >= 2 * HALF))[None, :]
        w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        tl.store(p, _round(w[None, :] * _round(x * r, dt, INTERP).to(tl.float32), dt, INTERP), mask=tmask)
    mask = hmask[:, None] & imask[None, :]
    d1, d2 = _pair_dims(i, HALF, IS_NEOX)
    p1 = base + h[:, None] * s_h + (d1 * s_d)[None, :]
    p2 = base + h[:, None] * s_h + (d2 * s_d)[None, :]
    w1 = tl.load(w_ptr + d1, mask=imask, other=0.0).to(tl.float32)
    w2 = tl.load(w_ptr + d2, mask=imask, other=0.0).to(tl.float32)
    x1 = tl.load(p1, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(p2, mask=mask, other=0.0).to(tl.float32)
    # the norm's two roundings (to x's dtype, then weight * normed to the output dtype, which is x's)
    x1 = _round(w1[None, :] * _round(x1 * r, dt, INTERP).to(tl.float32), dt, INTERP).to(tl.float32)
    x2 = _round(w2[None, :] * _round(x2 * r, dt, INTERP).to(tl.float32), dt, INTERP).to(tl.float32)
    _store_rotated(p1, p2, x1, x2, cos, sin, mask, dt, INTERP)


@triton.jit
def _qk_norm_rope_kernel(
    pos_ptr, cache_ptr, s_cache,
    q_ptr, sq_t, sq_h, sq_d, n_q_heads, qw_ptr,
    k_ptr, sk_t, sk_h, sk_d, n_k_heads, kw_ptr,
    q_blocks, D, eps,
    HALF: tl.constexpr, HALF_P2: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    PARTIAL: tl.constexpr, IS_NEOX: tl.constexpr, INTERP: tl.constexpr,
):  # fmt: skip
    # Program (t, j): token t; head block j of q for j < q_blocks, else head block j - q_blocks of k (every
    # program gets one block of at most BLOCK_H heads, so q's and k's programs are equally loaded).
    t = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1)
    cos, sin, i, imask = _token_cos_sin(pos_ptr, cache_ptr, s_cache, t, HALF, HALF_P2)
    if j < q_blocks:
        _qk_norm_rope_heads(q_ptr + t * sq_t, sq_h, sq_d, n_q_heads, j * BLOCK_H, qw_ptr, D, eps, cos, sin, i,
                            imask, HALF, BLOCK_H, BLOCK_D, PARTIAL, IS_NEOX, INTERP)  # fmt: skip
    else:
        _qk_norm_rope_heads(k_ptr + t * sk_t, sk_h, sk_d, n_k_heads, (j - q_blocks) * BLOCK_H, kw_ptr, D, eps,
                            cos, sin, i, imask, HALF, BLOCK_H, BLOCK_D, PARTIAL, IS_NEOX, INTERP)  # fmt: skip


def qk_norm_rope_(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    eps: float,
    head_size: int,
    cos_sin_cache: torch.Tensor,
    is_neox_style: bool = True,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Qwen3's per-head RMSNorm of q and k followed by rotary embedding, IN PLACE, in one launch; returns (q, k).

    Equal, bit for bit, to `rmsnorm` of each head (q_weight for q's heads, k_weight for k's) then
    `rotary_embedding_`: the norm rounds like layers.layernorm.RMSNorm (to x's dtype, then weight * normed to the
    result dtype, which must be x's for the result to go back in place), the rotation is fp32 math from the fp32
    cache rounded once. q [n, heads * head_size] (or [n, heads, head_size]) and k likewise may be views with any
    strides, e.g. column slices of one qkv tensor; nothing outside them is written.
    """
    n = positions.shape[0]
    rotary_dim = cos_sin_cache.shape[-1]
    if rotary_dim % 2 or rotary_dim > head_size:
        raise ValueError(f"rotary_dim {rotary_dim} must be even and <= head_size {head_size}")
    if k.dtype != q.dtype:
        raise ValueError("q and k must share a dtype")
    for w in (q_weight, k_weight):
        if w.shape != (head_size,):
            raise ValueError(f"weight shape {tuple(w.shape)} does not match head_size {head_size}")
        if torch.result_type(w, q) != q.dtype:
            raise ValueError(f"weight * x would be {torch.result_type(w, q)}, not q's {q.dtype}: can't be in place")
    q_weight = q_weight if q_weight.stride(0) == 1 else q_weight.contiguous()
    k_weight = k_weight if k_weight.stride(0) == 1 else k_weight.contiguous()
    cos_sin_cache = cos_sin_cache if cos_sin_cache.stride(-1) == 1 else cos_sin_cache.contiguous()
    hq, sq_t, sq_h, sq_d = _heads_view(q, head_size, n)
    hk, sk_t, sk_h, sk_d = _heads_view(k, head_size, n)
    if n == 0 or max(hq, hk) == 0:
        return q, k
    half = rotary_dim // 2
    block_d = triton.next_power_of_2(head_size)
    block_h = min(triton.next_power_of_2(max(hq, hk)), max(1, 1024 // block_d))
    q_blocks = triton.cdiv(hq, block_h)
    _qk_norm_rope_kernel[(n, q_blocks + triton.cdiv(hk, block_h))](
        positions, cos_sin_cache, cos_sin_cache.stride(0),
        q, sq_t, sq_h, sq_d, hq, q_weight,
        k, sk_t, sk_h, sk_d, hk, k_weight,
        q_blocks, head_size, float(eps),
        HALF=half, HALF_P2=triton.next_power_of_2(half), BLOCK_H=block_h, BLOCK_D=block_d,
        PARTIAL=rotary_dim < head_size, IS_NEOX=bool(is_neox_style), INTERP=q.device.type != "cuda",
        num_warps=4 if block_h * block_d >= 512 else 1,
    )  # fmt: skip
    return q, k


__all__ = ["gelu_and_mul", "qk_norm_rope_", "rmsnorm", "rotary_embedding_", "silu_and_mul"]

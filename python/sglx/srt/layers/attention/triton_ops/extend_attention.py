"""Extend (prefill) attention over a paged KV cache, in Triton.

Each request's new tokens attend to its cached prefix (slots listed in `kv_indices[kv_indptr[b]:kv_indptr[b+1]]`)
and to the new tokens themselves (causally unless `causal=False`). The new tokens' K/V are read straight from the
k/v tensors of this step when the caller has them (one gather less), otherwise from the pool through
`ext_loc` (= out_cache_loc). One program handles BLOCK_M queries of one q head; GQA maps q head h to kv head
h // group. The result is stored by the kernel into `o` (the caller's buffer), never returned as a new tensor.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
NEG_INIT = tl.constexpr(-1.0e30)  # finite running max: a fully masked block then gives p = 0 instead of exp(-inf + inf) = nan


@triton.jit
def tanh(x):
    # tanh from exp: tl has no tanh on every backend (the interpreter included); saturates cleanly at +-1.
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    # fp32 inputs: tl.dot defaults to TF32 (10-bit mantissa); fp32 serving is the exact-parity mode, so it asks
    # for IEEE products. bf16/fp16 inputs ignore the choice.
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _scores(q, k, sm_scale, logit_cap, USE_CAP: tl.constexpr, IEEE: tl.constexpr):
    """Scaled (and optionally soft-capped) logits in log2 units, so the softmax can use exp2."""
    s = _dot(q, tl.trans(k), IEEE) * sm_scale
    if USE_CAP:
        s = logit_cap * tanh(s / logit_cap)
    return s * 1.4426950408889634


@triton.jit
def _online_softmax_step(acc, m_i, l_i, s, v, IEEE: tl.constexpr):
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE)
    return acc, m_new, l_i


@triton.jit
def _extend_kernel(
    Q, K_ext, V_ext, K_pool, V_pool, O,
    qo_indptr, kv_indptr, kv_indices, ext_loc,
    sm_scale, logit_cap, window,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_pkt, stride_pkh, stride_pvt, stride_pvh, stride_ot, stride_oh,
    GROUP: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, USE_CAP: tl.constexpr, USE_WINDOW: tl.constexpr, EXT_FROM_POOL: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    h = tl.program_id(1)
    mb = tl.program_id(2)
    kvh = h // GROUP
    q_start = tl.load(qo_indptr + b)
    ext_len = tl.load(qo_indptr + b + 1) - q_start
    if mb * BLOCK_M >= ext_len:
        return
    kv_start = tl.load(kv_indptr + b)
    prefix_len = tl.load(kv_indptr + b + 1) - kv_start

    offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    m_mask = offs_m < ext_len
    d_mask = offs_d < D
    dv_mask = offs_dv < DV
    q_rows = (q_start + offs_m).to(tl.int64)
    q = tl.load(Q + q_rows[:, None] * stride_qt + h * stride_qh + offs_d[None, :],
                mask=m_mask[:, None] & d_mask[None, :], other=0.0)  # fmt: skip

    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], NEG_INIT, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)

    # Part 1: the cached prefix (every prefix key precedes every new query, so only the window can mask it).
    lo = prefix_len * 0
    if USE_WINDOW:
        lo = tl.maximum(prefix_len + mb * BLOCK_M - window + 1, 0) // BLOCK_N * BLOCK_N
    for start in range(lo, prefix_len, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_mask = offs_n < prefix_len
        slot = tl.load(kv_indices + kv_start + offs_n, mask=n_mask, other=0).to(tl.int64)
        k = tl.load(K_pool + slot[:, None] * stride_pkt + kvh * stride_pkh + offs_d[None, :],
                    mask=n_mask[:, None] & d_mask[None, :], other=0.0)  # fmt: skip
        v = tl.load(V_pool + slot[:, None] * stride_pvt + kvh * stride_pvh + offs_dv[None, :],
                    mask=n_mask[:, None] & dv_mask[None, :], other=0.0)  # fmt: skip
        s = _scores(q, k.to(q.dtype), sm_scale, logit_cap, USE_CAP, IEEE)
        keep = n_mask[None, :] & m_mask[:, None]
        if USE_WINDOW:
            keep = keep & (offs_n[None, :] > (prefix_len + offs_m)[:, None] - window)
        s = tl.where(keep, s, float("-inf"))
        acc, m_i, l_i = _online_softmax_step(acc, m_i, l_i, s, v.to(q.dtype), IEEE)

    # Part 2: the new tokens themselves; causally, keys past this block's last query are never needed.
    hi = ext_len
    if CAUSAL:
        hi = tl.minimum(ext_len, (mb + 1) * BLOCK_M)
    lo = ext_len * 0
    if USE_WINDOW:
        lo = tl.maximum(mb * BLOCK_M - window + 1, 0) // BLOCK_N * BLOCK_N
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_mask = offs_n < ext_len
        if EXT_FROM_POOL:
            rows_k = tl.load(ext_loc + q_start + offs_n, mask=n_mask, other=0).to(tl.int64)
            k_ptr = K_pool + rows_k[:, None] * stride_pkt + kvh * stride_pkh + offs_d[None, :]
            v_ptr = V_pool + rows_k[:, None] * stride_pvt + kvh * stride_pvh + offs_dv[None, :]
        else:
            rows_k = (q_start + offs_n).to(tl.int64)
            k_ptr = K_ext + rows_k[:, None] * stride_kt + kvh * stride_kh + offs_d[None, :]
            v_ptr = V_ext + rows_k[:, None] * stride_vt + kvh * stride_vh + offs_dv[None, :]
        k = tl.load(k_ptr, mask=n_mask[:, None] & d_mask[None, :], other=0.0)
        v = tl.load(v_ptr, mask=n_mask[:, None] & dv_mask[None, :], other=0.0)
        s = _scores(q, k.to(q.dtype), sm_scale, logit_cap, USE_CAP, IEEE)
        keep = n_mask[None, :] & m_mask[:, None]
        if CAUSAL:
            keep = keep & (offs_n[None, :] <= offs_m[:, None])
        if USE_WINDOW:
            keep = keep & (offs_n[None, :] > offs_m[:, None] - window)
        s = tl.where(keep, s, float("-inf"))
        acc, m_i, l_i = _online_softmax_step(acc, m_i, l_i, s, v.to(q.dtype), IEEE)

    l_i = tl.where(l_i == 0.0, 1.0, l_i)  # padding rows only; real rows always see at least themselves
    res = acc / l_i[:, None]
    tl.store(O + q_rows[:, None] * stride_ot + h * stride_oh + offs_dv[None, :],
             res.to(O.dtype.element_ty), mask=m_mask[:, None] & dv_mask[None, :])  # fmt: skip


@dataclass(frozen=True)
class ExtendLaunchConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def default_extend_config(head_dim: int, interpret: bool) -> ExtendLaunchConfig:
    if interpret:
        return ExtendLaunchConfig(32, 32, 4, 1)  # the interpreter pays per op, not per element
    if head_dim <= 64:
        return ExtendLaunchConfig(128, 64, 4, 3)
    if head_dim <= 128:
        return ExtendLaunchConfig(128, 64, 8, 2)
    return ExtendLaunchConfig(64, 32, 8, 2)  # head dim 256: keep q/k/v tiles within shared memory


def extend_attention_fwd(
    q: torch.Tensor,  # [T, H, D]
    k_ext: Optional[torch.Tensor],  # [T, Hkv, D] new keys, or None to read them from the pool at ext_loc
    v_ext: Optional[torch.Tensor],  # [T, Hkv, DV]
    k_pool: torch.Tensor,  # [slots, Hkv, D]
    v_pool: torch.Tensor,  # [slots, Hkv, DV]
    o: torch.Tensor,  # [T, H, DV] written in place
    qo_indptr: torch.Tensor,  # [bs + 1] int32
    kv_indptr: torch.Tensor,  # [bs + 1] int32, prefix slots per request
    kv_indices: torch.Tensor,  # [>= kv_indptr[-1]] int32 prefix slots
    ext_loc: Optional[torch.Tensor],  # [T] int64 slots of the new tokens (needed when k_ext is None)
    max_extend_len: int,
    sm_scale: float,
    logit_cap: float = 0.0,
    sliding_window: int = -1,
    causal: bool = True,
    config: Optional[ExtendLaunchConfig] = None,
) -> torch.Tensor:
    bs = qo_indptr.numel() - 1
    n_heads, head_dim = q.shape[1], q.shape[2]
    kv_heads, v_dim = k_pool.shape[1], v_pool.shape[2]
    if n_heads % kv_heads:
        raise ValueError(f"q heads ({n_heads}) must be a multiple of kv heads ({kv_heads})")
    if bs == 0 or max_extend_len == 0:
        return o
    from_pool = k_ext is None
    if from_pool and ext_loc is None:
        raise ValueError("extend_attention_fwd: ext_loc is required when the new K/V are read from the pool")
    k_src = k_pool if from_pool else k_ext
    v_src = v_pool if from_pool else v_ext
    cfg = config or default_extend_config(head_dim, _interpreting())
    grid = (bs, n_heads, triton.cdiv(max_extend_len, cfg.block_m))
    _extend_kernel[grid](
        q, k_src, v_src, k_pool, v_pool, o,
        qo_indptr, kv_indptr, kv_indices, ext_loc if from_pool else qo_indptr,
        sm_scale, float(logit_cap), int(sliding_window),
        q.stride(0), q.stride(1), k_src.stride(0), k_src.stride(1), v_src.stride(0), v_src.stride(1),
        k_pool.stride(0), k_pool.stride(1), v_pool.stride(0), v_pool.stride(1), o.stride(0), o.stride(1),
        GROUP=n_heads // kv_heads, D=head_dim, DV=v_dim,
        BLOCK_D=_block_dim(head_dim), BLOCK_DV=_block_dim(v_dim), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        CAUSAL=causal, USE_CAP=logit_cap > 0, USE_WINDOW=sliding_window > 0, EXT_FROM_POOL=from_pool,
        IEEE=q.dtype == torch.float32,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return o


def _block_dim(d: int) -> int:
    # Power-of-two tile covering the head dim (masked loads pad e.g. 80 or 96 up to 128); tl.dot needs >= 16.
    return max(16, triton.next_power_of_2(d))


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

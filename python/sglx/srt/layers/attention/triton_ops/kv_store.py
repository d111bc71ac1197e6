"""KV-cache bookkeeping kernels: the fused store of this step's K and V into one layer of the paged pool (one
launch instead of two scatters), and the per-batch flattening of req_to_token into kv_indices (one launch
instead of the ~8 small torch ops a sync-free gather/scatter takes; this runs once per forward)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _store_kv_kernel(
    K, V, K_pool, V_pool, loc,
    stride_kt, stride_vt, stride_pkt, stride_pvt,
    KV_WIDTH: tl.constexpr, V_WIDTH: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    # One program per token: its heads * head_dim values are contiguous in both source row and pool slot.
    t = tl.program_id(0)
    slot = tl.load(loc + t).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    for start in range(0, KV_WIDTH, BLOCK):
        m = start + offs < KV_WIDTH
        k = tl.load(K + t.to(tl.int64) * stride_kt + start + offs, mask=m)
        tl.store(K_pool + slot * stride_pkt + start + offs, k.to(K_pool.dtype.element_ty), mask=m)
    for start in range(0, V_WIDTH, BLOCK):
        m = start + offs < V_WIDTH
        v = tl.load(V + t.to(tl.int64) * stride_vt + start + offs, mask=m)
        tl.store(V_pool + slot * stride_pvt + start + offs, v.to(V_pool.dtype.element_ty), mask=m)


def can_fuse_store(k: torch.Tensor, k_pool: torch.Tensor, v: torch.Tensor, v_pool: torch.Tensor) -> bool:
    """Rows of k/v and pool slots must each be one contiguous run (heads * dim) for the flat copy."""
    return (
        k.dtype == k_pool.dtype
        and v.dtype == v_pool.dtype
        and k.dim() == 3
        and k.stride(2) == 1
        and k.stride(1) == k.shape[2]
        and v.stride(2) == 1
        and v.stride(1) == v.shape[2]
        and k_pool.stride(2) == 1
        and k_pool.stride(1) == k_pool.shape[2]
        and v_pool.stride(2) == 1
        and v_pool.stride(1) == v_pool.shape[2]
    )


def store_kv_cache(
    k: torch.Tensor,  # [T, Hkv, D]
    v: torch.Tensor,  # [T, Hkv, DV]
    k_pool: torch.Tensor,  # [slots, Hkv, D]
    v_pool: torch.Tensor,  # [slots, Hkv, DV]
    loc: torch.Tensor,  # [T] int64 slots
) -> None:
    n = loc.numel()
    if n == 0:
        return
    k_width = k.shape[1] * k.shape[2]
    v_width = v.shape[1] * v.shape[2]
    block = min(1024, triton.next_power_of_2(max(k_width, v_width)))
    _store_kv_kernel[(n,)](
        k, v, k_pool, v_pool, loc,
        k.stride(0), v.stride(0), k_pool.stride(0), v_pool.stride(0),
        KV_WIDTH=k_width, V_WIDTH=v_width, BLOCK=block, num_warps=4,
    )  # fmt: skip


@triton.jit
def _fill_kv_indices_kernel(
    req_to_token, req_pool_indices, lens, indptr, out, stride_r2t, PAGE: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    # Program b writes, for j < lens[b], req_to_token[req_pool_indices[b], j * PAGE] // PAGE to out[indptr[b] + j]:
    # token slots when PAGE == 1, else page numbers (a request's tokens fill its pages in order).
    b = tl.program_id(0)
    row = tl.load(req_pool_indices + b).to(tl.int64)
    n = tl.load(lens + b).to(tl.int32)
    dst = tl.load(indptr + b).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    for start in range(0, n, BLOCK):
        m = start + offs < n
        x = tl.load(req_to_token + row * stride_r2t + (start + offs) * PAGE, mask=m)
        if PAGE > 1:
            x = x // PAGE
        tl.store(out + dst + start + offs, x, mask=m)


def fill_kv_indices(
    req_to_token: torch.Tensor,  # int32 [rows, max_ctx]
    req_pool_indices: torch.Tensor,  # [bs]
    lens: torch.Tensor,  # [bs] tokens (page_size 1) or pages to take from the start of each row
    indptr: torch.Tensor,  # int32 [>= bs + 1], already holding the exclusive cumsum of lens
    out: torch.Tensor,  # int32 [>= sum(lens)]
    page_size: int = 1,  # > 1: out gets page numbers, from every page_size-th slot of the row
) -> None:
    bs = lens.numel()
    if bs:
        _fill_kv_indices_kernel[(bs,)](
            req_to_token, req_pool_indices, lens, indptr, out, req_to_token.stride(0), PAGE=page_size, BLOCK=512,
            num_warps=4,
        )

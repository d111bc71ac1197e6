"""Decode attention (one query token per request) over a paged KV cache: split-K flash-decoding, in Triton.

Stage 1: program (request b, kv head g, split s) reads split s of the request's KV once and computes attention
for all q heads of group g together (GQA: the group's heads form the M dimension of the dot product), writing
a normalized partial output and its log-sum-exp (log2 units) to fp32 scratch.
Stage 2: program (b, q head) merges the splits and stores the result into the caller's `o`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from sglx.srt.layers.attention.triton_ops.extend_attention import (
    NEG_INIT,
    _block_dim,
    _interpreting,
    _online_softmax_step,
    _scores,
)

MAX_KV_SPLITS = 16
MIN_TOKENS_PER_SPLIT = 128  # below this a split's fixed cost (q load, scratch write) outweighs the parallelism


@triton.jit
def _decode_stage1(
    Q, K_pool, V_pool, kv_indptr, kv_indices, Part_o, Part_lse,
    sm_scale, logit_cap, window, num_splits,
    stride_qb, stride_qh, stride_pkt, stride_pkh, stride_pvt, stride_pvh,
    stride_pob, stride_poh, stride_pos, stride_lb, stride_lh,
    GROUP: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr,
    USE_CAP: tl.constexpr, USE_WINDOW: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    kv_start = tl.load(kv_indptr + b)
    seq_len = tl.load(kv_indptr + b + 1) - kv_start
    lo = seq_len * 0
    if USE_WINDOW:
        lo = tl.maximum(seq_len - window, 0)
    split_len = tl.cdiv(seq_len - lo, num_splits)
    s_start = lo + split * split_len
    s_end = tl.minimum(s_start + split_len, seq_len)

    offs_h = tl.arange(0, BLOCK_H)
    heads = kvh * GROUP + offs_h
    h_mask = offs_h < GROUP
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    d_mask = offs_d < D
    dv_mask = offs_dv < DV
    q = tl.load(Q + b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=h_mask[:, None] & d_mask[None, :], other=0.0)  # fmt: skip

    acc = tl.zeros([BLOCK_H, BLOCK_DV], dtype=tl.float32)
    m_i = tl.full([BLOCK_H], NEG_INIT, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    for start in range(s_start, s_end, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_mask = offs_n < s_end
        slot = tl.load(kv_indices + kv_start + offs_n, mask=n_mask, other=0).to(tl.int64)
        k = tl.load(K_pool + slot[:, None] * stride_pkt + kvh * stride_pkh + offs_d[None, :],
                    mask=n_mask[:, None] & d_mask[None, :], other=0.0)  # fmt: skip
        v = tl.load(V_pool + slot[:, None] * stride_pvt + kvh * stride_pvh + offs_dv[None, :],
                    mask=n_mask[:, None] & dv_mask[None, :], other=0.0)  # fmt: skip
        s = _scores(q, k.to(q.dtype), sm_scale, logit_cap, USE_CAP, IEEE)
        s = tl.where(n_mask[None, :], s, float("-inf"))
        acc, m_i, l_i = _online_softmax_step(acc, m_i, l_i, s, v.to(q.dtype), IEEE)

    # An empty split (short request, many splits) records lse = -inf, so stage 2 gives it weight 0.
    empty = s_end <= s_start
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    lse = tl.where(empty, float("-inf"), m_i + tl.log2(l_safe))
    po = Part_o + b.to(tl.int64) * stride_pob + heads[:, None] * stride_poh + split * stride_pos + offs_dv[None, :]
    tl.store(po, acc / l_safe[:, None], mask=h_mask[:, None] & dv_mask[None, :])  # zeros when empty
    tl.store(Part_lse + b.to(tl.int64) * stride_lb + heads * stride_lh + split, lse, mask=h_mask)


@triton.jit
def _decode_stage2(
    Part_o, Part_lse, O, num_splits,
    stride_pob, stride_poh, stride_pos, stride_lb, stride_lh, stride_ob, stride_oh,
    DV: tl.constexpr, BLOCK_DV: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    h = tl.program_id(1)
    offs_dv = tl.arange(0, BLOCK_DV)
    dv_mask = offs_dv < DV
    acc = tl.zeros([BLOCK_DV], dtype=tl.float32)
    m = tl.full([1], NEG_INIT, dtype=tl.float32)  # shaped tensors: loop-carried types must not change
    l = tl.zeros([1], dtype=tl.float32)
    for s in range(0, num_splits):
        lse = tl.load(Part_lse + b.to(tl.int64) * stride_lb + h * stride_lh + s)
        # Stage 1 writes every split (zeros for empty ones, whose weight exp2(-inf) is 0): no garbage to mask.
        part = tl.load(Part_o + b.to(tl.int64) * stride_pob + h * stride_poh + s * stride_pos + offs_dv,
                       mask=dv_mask, other=0.0)  # fmt: skip
        m_new = tl.maximum(m, lse)
        alpha = tl.exp2(m - m_new)
        w = tl.exp2(lse - m_new)
        acc = acc * alpha + w * part
        l = l * alpha + w
        m = m_new
    res = acc / tl.where(l == 0.0, 1.0, l)
    tl.store(O + b.to(tl.int64) * stride_ob + h * stride_oh + offs_dv, res.to(O.dtype.element_ty), mask=dv_mask)


@dataclass(frozen=True)
class DecodeLaunchConfig:
    block_n: int
    num_warps: int
    num_stages: int


def default_decode_config(head_dim: int, interpret: bool) -> DecodeLaunchConfig:
    """Measured with benchmark/bench_decode_attention.py (H100, head dim 128, 8 KV heads, 640-token contexts,
    CUDA-graph replays): 3 pipeline stages instead of 2 take batch 64 from 72% to 83% of copy bandwidth and
    batch 256 from 78% to 93%; batch 1 is unchanged. BLOCK_N 128 would be faster at batch 1 but needs 192 KB
    of shared memory at 3 stages (more than an A100 has), so it stays at 64. Head dims > 128: not measured."""
    if interpret:
        return DecodeLaunchConfig(32, 4, 1)
    if head_dim <= 128:
        return DecodeLaunchConfig(64, 4, 3)
    return DecodeLaunchConfig(32, 4, 2)


def choose_num_kv_splits(batch_size: int, kv_heads: int, max_seq_len: int, num_sms: int,
                         programs_per_sm: int = 4) -> int:
    """Enough (batch, kv head, split) programs to fill the GPU a few times over, never splits of a few tokens."""
    want = triton.cdiv(programs_per_sm * num_sms, max(1, batch_size * kv_heads))
    by_len = triton.cdiv(max(1, max_seq_len), MIN_TOKENS_PER_SPLIT)
    return max(1, min(MAX_KV_SPLITS, want, by_len))


def decode_scratch(
    batch_size: int, num_heads: int, num_splits: int, v_dim: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 partial outputs [bs, H, splits, DV] and log-sum-exps [bs, H, splits] for stage 1 -> stage 2."""
    part_o = torch.empty((batch_size, num_heads, num_splits, v_dim), dtype=torch.float32, device=device)
    part_lse = torch.empty((batch_size, num_heads, num_splits), dtype=torch.float32, device=device)
    return part_o, part_lse


def decode_attention_fwd(
    q: torch.Tensor,  # [bs, H, D]
    k_pool: torch.Tensor,  # [slots, Hkv, D]
    v_pool: torch.Tensor,  # [slots, Hkv, DV]
    o: torch.Tensor,  # [bs, H, DV] written in place
    kv_indptr: torch.Tensor,  # [bs + 1] int32
    kv_indices: torch.Tensor,  # [>= kv_indptr[-1]] int32 slots, the new token's included
    part_o: torch.Tensor,  # scratch from decode_scratch(); its split dim sets the number of splits
    part_lse: torch.Tensor,
    sm_scale: float,
    logit_cap: float = 0.0,
    sliding_window: int = -1,
    config: Optional[DecodeLaunchConfig] = None,
) -> torch.Tensor:
    bs, n_heads, head_dim = q.shape
    kv_heads, v_dim = k_pool.shape[1], v_pool.shape[2]
    if n_heads % kv_heads:
        raise ValueError(f"q heads ({n_heads}) must be a multiple of kv heads ({kv_heads})")
    if bs == 0:
        return o
    num_splits = part_o.shape[2]
    group = n_heads // kv_heads
    cfg = config or default_decode_config(head_dim, _interpreting())
    _decode_stage1[(bs, kv_heads, num_splits)](
        q, k_pool, v_pool, kv_indptr, kv_indices, part_o, part_lse,
        sm_scale, float(logit_cap), int(sliding_window), num_splits,
        q.stride(0), q.stride(1), k_pool.stride(0), k_pool.stride(1), v_pool.stride(0), v_pool.stride(1),
        part_o.stride(0), part_o.stride(1), part_o.stride(2), part_lse.stride(0), part_lse.stride(1),
        GROUP=group, D=head_dim, DV=v_dim,
        BLOCK_H=max(16, triton.next_power_of_2(group)), BLOCK_D=_block_dim(head_dim), BLOCK_DV=_block_dim(v_dim),
        BLOCK_N=cfg.block_n, USE_CAP=logit_cap > 0, USE_WINDOW=sliding_window > 0, IEEE=q.dtype == torch.float32,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    _decode_stage2[(bs, n_heads)](
        part_o, part_lse, o, num_splits,
        part_o.stride(0), part_o.stride(1), part_o.stride(2), part_lse.stride(0), part_lse.stride(1),
        o.stride(0), o.stride(1),
        DV=v_dim, BLOCK_DV=_block_dim(v_dim), num_warps=4 if v_dim <= 128 else 8,
    )  # fmt: skip
    return o

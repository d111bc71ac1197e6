"""Batched next-token sampling: logit bias, min-new-tokens masking, penalties, then greedy or filtered sampling.

Sampling uses the exponential race: with E_i ~ Exp(1) independent, argmax_i p_i / E_i is distributed as
p / sum(p). That makes it (1) indifferent to whether p is renormalized, (2) a single batched argmax, and
(3) seedable per request: a seeded row draws its E from a counter-based hash of (seed, position, vocab
index), so its token depends on nothing but its own logits, seed and position — never on batch neighbours.
Everything here is plain tensor ops with no per-row host sync, so it runs unchanged on CPU and CUDA.

Backends (`--sampling-backend`) differ only in how the unseeded, non-greedy rows are filtered and drawn once
the logits are processed and divided by the temperature: `pytorch` as above; `flashinfer` with flashinfer's
sorting-free kernels where they apply the same filters in the same order (flashinfer_sampling.py says where;
elsewhere the batch takes the pytorch path). Greedy rows are argmax and seeded rows take the counter-hash
race with either backend, so their tokens do not depend on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
from torch import nn

from sglx.srt.constrained.base_grammar_backend import apply_vocab_mask
from sglx.srt.layers import flashinfer_sampling
from sglx.srt.sampling.sampling_batch_info import SamplingBatchInfo
from sglx.srt.server_args import SAMPLING_BACKENDS

# Where processed logits are capped: divided by the smallest temperature that still samples (1e-6), it stays
# finite in float32 (1e36 < 3.4e38), so softmax never meets inf - inf.
LOGIT_LIMIT = 1e30


@dataclass
class SamplerOutput:
    next_token_ids: torch.Tensor  # [bs] int64
    next_token_logprobs: Optional[torch.Tensor]  # [bs] float32, raw log_softmax at the chosen id
    # [bs, max(top_logprobs_nums)] on the device; row i's first top_logprobs_nums[i] entries are its answer
    # (top_logprobs_to_lists cuts them once the host has them: no host transfer happens here).
    top_logprobs_val: Optional[torch.Tensor]
    top_logprobs_idx: Optional[torch.Tensor]


class Sampler(nn.Module):
    def __init__(self, backend: str = "pytorch") -> None:
        """`backend`: one of SAMPLING_BACKENDS. "flashinfer" imports flashinfer here, so that a missing
        package fails at start-up rather than on the first sampled batch."""
        super().__init__()
        if backend not in SAMPLING_BACKENDS:
            raise ValueError(f"unknown sampling backend {backend!r}; expected one of {', '.join(SAMPLING_BACKENDS)}")
        self.backend = backend
        self.flashinfer = flashinfer_sampling.import_flashinfer_sampling() if backend == "flashinfer" else None

    def forward(
        self,
        logits: torch.Tensor,
        info: SamplingBatchInfo,
        return_logprob: bool = False,
        top_logprobs_nums: Optional[List[int]] = None,
    ) -> SamplerOutput:
        logits = logits.float()
        # Reported logprobs are those of the model itself, before any request-specific processing.
        want_logprobs = return_logprob or top_logprobs_nums is not None
        logprobs = torch.log_softmax(logits, dim=-1) if want_logprobs else None

        processed = apply_logits_processing(logits, info)
        greedy_ids = torch.argmax(processed, dim=-1)
        if info.is_all_greedy:
            next_ids = greedy_ids
        else:
            sampled = self.sample(processed, info)
            # Greedy rows in a mixed batch must be exactly argmax, whatever the sampling path did with them.
            next_ids = torch.where(info.top_ks == 1, greedy_ids, sampled)

        token_logprobs = None
        if return_logprob:
            token_logprobs = logprobs.gather(1, next_ids.view(-1, 1)).squeeze(1)
        top_val, top_idx = (None, None)
        if top_logprobs_nums is not None:
            top_val, top_idx = top_logprobs(logprobs, top_logprobs_nums)
        return SamplerOutput(next_ids, token_logprobs, top_val, top_idx)

    def sample(self, logits: torch.Tensor, info: SamplingBatchInfo) -> torch.Tensor:
        """[bs] int64 ids drawn from softmax(logits / temperature) after top-k, top-p, min-p (greedy rows: any id;
        the caller overwrites them). The flashinfer backend draws the unseeded rows with the kernel that
        flashinfer_kernel_for picks and re-draws the seeded rows on the torch path; a batch with no such
        kernel takes the torch path whole."""
        probs = temperature_probs(logits, info)
        kernel = None if self.flashinfer is None else flashinfer_sampling.flashinfer_kernel_for(info)
        if kernel is None:
            return sample_from_probs(probs, info)
        ids = flashinfer_sampling.flashinfer_sample(self.flashinfer, kernel, probs, info)
        if info.seeded_rows is not None:
            seeded = info.seeded_sub_batch()
            ids.index_copy_(0, info.seeded_rows, sample_from_probs(probs.index_select(0, info.seeded_rows), seeded))
        return ids


def apply_logits_processing(logits: torch.Tensor, info: SamplingBatchInfo) -> torch.Tensor:
    """Logit bias, min-new-tokens stop masking, penalties, then the grammars' token masks, in that order; never
    writes into `logits`."""
    out = logits
    if info.logit_bias is not None:
        out = out + info.logit_bias
    if info.min_new_tokens_mask is not None:
        out = out.masked_fill(info.min_new_tokens_mask, float("-inf"))
    counts = info.output_token_counts
    if info.repetition_penalties is not None:
        seen = info.prompt_token_mask | (counts > 0)
        p = info.repetition_penalties.view(-1, 1)
        # Divide positive logits and multiply negative ones: both push a seen token's probability down.
        out = torch.where(seen, torch.where(out > 0, out / p, out * p), out)
    if info.frequency_penalties is not None:
        out = out - info.frequency_penalties.view(-1, 1) * counts
    if info.presence_penalties is not None:
        out = out - info.presence_penalties.view(-1, 1) * (counts > 0)
    if info.repetition_penalties is not None:
        # A repetition penalty that rounds to 0 in float32 divides positive logits into inf, softmax turns the
        # row into NaN, and a NaN row samples token 0 whatever the model says. Capped, the boosted tokens win.
        out = torch.nan_to_num(out, nan=float("-inf"), posinf=LOGIT_LIMIT, neginf=float("-inf"))
    if info.vocab_mask is not None:
        rows = info.vocab_mask_rows
        out = out.index_copy(0, rows, apply_vocab_mask(out.index_select(0, rows), info.vocab_mask))
    return out


def temperature_probs(logits: torch.Tensor, info: SamplingBatchInfo) -> torch.Tensor:
    """softmax(logits / temperature), row by row: what every backend filters and samples from."""
    return torch.softmax(logits / info.temperatures, dim=-1)


def sample_from_probs(probs: torch.Tensor, info: SamplingBatchInfo) -> torch.Tensor:
    """The torch path: filter_probs, then the exponential race (hashed noise for seeded rows)."""
    probs = filter_probs(probs, info)
    return torch.argmax(probs / exponential_noise(probs, info), dim=-1)


def filter_probs(probs: torch.Tensor, info: SamplingBatchInfo) -> torch.Tensor:
    """Zero the tokens removed by top-k, then top-p, then min-p (the result is not renormalized).

    Each filter acts on the distribution left by the previous ones, renormalized (as vLLM and HF do):
    top-p compares against top_p times the mass top-k kept, and min-p against the largest kept probability.
    """
    if info.need_top_k or info.need_top_p:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        if info.need_top_k:
            rank = torch.arange(probs.shape[-1], device=probs.device).view(1, -1)
            sorted_probs = sorted_probs.masked_fill(rank >= info.top_ks.view(-1, 1), 0.0)
        if info.need_top_p:
            cum = torch.cumsum(sorted_probs, dim=-1)
            mass_before = cum - sorted_probs
            limit = info.top_ps.view(-1, 1) * cum[:, -1:]
            # Keep the smallest prefix reaching top_p; rows with top_p == 1 skip the test so float rounding
            # in the cumsum can never cut their tail. The most probable token always stays: a top_p that
            # rounds to 0 in float32 (1e-300) once dropped every token, and token 0 came out.
            drop = (mass_before >= limit) & (info.top_ps.view(-1, 1) < 1.0)
            drop[:, 0] = False
            sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(1, order, sorted_probs)
    if info.need_min_p:
        threshold = probs.amax(dim=-1, keepdim=True) * info.min_ps.view(-1, 1)
        probs = probs.masked_fill(probs < threshold, 0.0)
    return probs


def exponential_noise(probs: torch.Tensor, info: SamplingBatchInfo) -> torch.Tensor:
    """Exp(1) noise shaped like probs: seeded rows from the counter hash, the rest from torch's generator."""
    rows = info.seeded_rows
    if rows is None and info.seeds is not None:  # built by hand rather than by from_reqs
        rows = torch.nonzero(info.seeds >= 0).squeeze(1)
    if rows is not None and rows.numel() == probs.shape[0]:
        return seeded_exponential(info.seeds, info.positions, probs.shape[-1])
    # exponential_ may return an exact 0; 0/0 would make argmax pick a zero-probability token.
    noise = torch.empty_like(probs).exponential_().clamp_min_(torch.finfo(probs.dtype).tiny)
    if rows is not None:
        seeded = seeded_exponential(info.seeds[rows], info.positions[rows], probs.shape[-1])
        noise.index_copy_(0, rows, seeded)
    return noise


# splitmix64 constants, written as the int64 values with the same bit pattern.
def _as_int64(c: int) -> int:
    return c - (1 << 64) if c >= 1 << 63 else c


_GOLDEN = _as_int64(0x9E3779B97F4A7C15)
_MIX1 = _as_int64(0xBF58476D1CE4E5B9)
_MIX2 = _as_int64(0x94D049BB133111EB)


def _shr(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns (torch's >> is arithmetic: mask off the sign copies)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def splitmix64_finalize(z: torch.Tensor) -> torch.Tensor:
    """splitmix64's output mix on int64 tensors; multiplication and addition wrap mod 2**64 like uint64."""
    z = (z ^ _shr(z, 30)) * _MIX1
    z = (z ^ _shr(z, 27)) * _MIX2
    return z ^ _shr(z, 31)


def seeded_uniform_bits(seeds: torch.Tensor, positions: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[n, vocab] int64 hash of (seed, position, vocab index).

    Each level walks a splitmix64 stream: the seed picks a stream, the position a point on it whose mix
    keys a second stream, and the vocab index a point on that one.
    """
    stream = splitmix64_finalize(seeds.to(torch.int64) + _GOLDEN)
    row_key = splitmix64_finalize(stream + (positions.to(torch.int64) + 1) * _GOLDEN)
    vocab = (torch.arange(vocab_size, dtype=torch.int64, device=seeds.device) + 1) * _GOLDEN
    return splitmix64_finalize(row_key.view(-1, 1) + vocab.view(1, -1))


def seeded_exponential(seeds: torch.Tensor, positions: torch.Tensor, vocab_size: int) -> torch.Tensor:
    bits = _shr(seeded_uniform_bits(seeds, positions, vocab_size), 41)  # top 23 bits
    # (m + 0.5) / 2**23 is exact in float32 and lies strictly inside (0, 1), so -log(u) is finite and > 0.
    u = (bits.to(torch.float32) + 0.5) * (1.0 / (1 << 23))
    return -torch.log(u)


def top_logprobs(logprobs: torch.Tensor, nums: List[int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """The max(nums) largest logprobs of every row and their ids, as device tensors ([bs, 0] if none asked)."""
    k = min(max(nums, default=0), logprobs.shape[-1])
    if k <= 0:
        empty = logprobs.new_empty((logprobs.shape[0], 0))
        return empty, empty.to(torch.int64)
    return torch.topk(logprobs, k, dim=-1)


def top_logprobs_to_lists(vals: List[List[float]], idx: List[List[int]], nums: List[int]
                          ) -> Tuple[List[List[float]], List[List[int]]]:
    """Per request, its own number of (value, id) entries from the host copies of top_logprobs' tensors."""
    return [v[:n] for v, n in zip(vals, nums)], [i[:n] for i, n in zip(idx, nums)]

"""Device tensors describing how each request of a batch samples its next token.

Built every step from the requests' python state (`from_reqs`): a loop over requests gathers python lists,
then a handful of batched tensor ops turn them into [bs] / [bs, vocab] tensors. The penalties' token counts
are the exception: they persist on the device across steps (penalty_counts.py) and are only gathered here.
Anything no request in the batch uses stays None so the sampler can skip it entirely.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Iterable, List, Optional, Sequence

import torch

from sglx.srt.constrained.base_grammar_backend import allocate_vocab_mask
from sglx.srt.sampling.penalty_counts import PenaltyCounts, flat_indices

# Seeds are folded into 63 bits so every user seed (negative or huge python ints included) maps to a
# non-negative int64 and -1 stays free as the "unseeded" marker.
_SEED_MASK = (1 << 63) - 1
# Fields that are not [bs, ...] tensors (seeded_rows indexes rows rather than being one entry per row).
_HOST_FIELDS = frozenset({"is_all_greedy", "need_top_p", "need_top_k", "need_min_p", "vocab_size", "seeded_rows",
                          "vocab_mask", "vocab_mask_rows", "penalty_counts", "counted_rows", "counted_pool_rows",
                          "gate_mask_rows", "gate_pool_rows", "gate_tokens", "gated_masks"})


@dataclass
class SamplingBatchInfo:
    temperatures: torch.Tensor  # [bs, 1] float32
    top_ps: torch.Tensor  # [bs] float32
    top_ks: torch.Tensor  # [bs] int32, clamped to vocab_size
    min_ps: torch.Tensor  # [bs] float32
    is_all_greedy: bool
    # The need_* flags only look at non-greedy rows: greedy rows are answered by argmax anyway.
    need_top_p: bool
    need_top_k: bool
    need_min_p: bool
    seeds: Optional[torch.Tensor]  # [bs] int64, -1 for unseeded; None if no request is seeded
    positions: torch.Tensor  # [bs] int64, tokens generated so far (the seeded noise counter)
    frequency_penalties: Optional[torch.Tensor]  # [bs] float32
    presence_penalties: Optional[torch.Tensor]  # [bs] float32
    repetition_penalties: Optional[torch.Tensor]  # [bs] float32
    output_token_counts: Optional[torch.Tensor]  # [bs, vocab] int32
    prompt_token_mask: Optional[torch.Tensor]  # [bs, vocab] bool
    min_new_tokens_mask: Optional[torch.Tensor]  # [bs, vocab] bool, True = stop id still forbidden
    logit_bias: Optional[torch.Tensor]  # [bs, vocab] float32
    vocab_size: int
    # Row indices (int64) of seeded requests, so the sampler hashes only those rows without a device sync.
    seeded_rows: Optional[torch.Tensor] = None
    # Structured output: the tokens each constrained row may take next, as a bitmask [n, ceil(vocab / 32)]
    # int32 (constrained/base_grammar_backend.py), for the rows vocab_mask_rows [n] int64 names.
    vocab_mask: Optional[torch.Tensor] = None
    vocab_mask_rows: Optional[torch.Tensor] = None
    # Rows of vocab_mask that hold only unless the token still in flight (the overlap schedule's) is the row's
    # gate token, and the masks that hold if it is (BaseGrammarObject.gate_token; resolve_gates picks).
    gate_mask_rows: Optional[torch.Tensor] = None  # [g] int64 rows of vocab_mask
    gate_pool_rows: Optional[torch.Tensor] = None  # [g] int64 request rows of the runner's last_token_ids
    gate_tokens: Optional[torch.Tensor] = None  # [g] int64
    gated_masks: Optional[torch.Tensor] = None  # [g, ceil(vocab / 32)] int32
    # Penalties: the device-side counts the rows above were read from, and which batch rows' sampled tokens
    # `record_sampled` adds to which of its rows (the penalized requests that keep their token).
    penalty_counts: Optional[PenaltyCounts] = None
    counted_rows: Optional[torch.Tensor] = None  # [n] int64 batch rows
    counted_pool_rows: Optional[torch.Tensor] = None  # [n] int64 rows of penalty_counts

    @property
    def batch_size(self) -> int:
        return self.top_ps.shape[0]

    def seeded_sub_batch(self) -> "SamplingBatchInfo":
        """The seeded rows (`seeded_rows`, in that order) as a batch of their own, without a device sync.

        Every per-row tensor is gathered. The host-side flags stay the whole batch's: they only turn filters
        on, and a filter is a no-op for a row that does not use it (top_k = vocab, top_p = 1, min_p = 0).
        """
        rows = self.seeded_rows
        if rows is None:
            raise ValueError("seeded_sub_batch needs seeded_rows (from_reqs sets them)")
        per_row = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in _HOST_FIELDS}
        return dataclasses.replace(
            self,
            **{name: None if t is None else t.index_select(0, rows) for name, t in per_row.items()},
            seeded_rows=torch.arange(rows.numel(), dtype=torch.int64, device=rows.device),
            vocab_mask=None, vocab_mask_rows=None,  # (applied to the whole batch's logits already)
        )

    def resolve_gates(self, last_token_ids: torch.Tensor) -> None:
        """Where a gated row's token in flight (`last_token_ids`, by request row, read on the device: no sync)
        is its gate token, switch its mask to the gated one. Call before sampling."""
        if self.gate_mask_rows is None:
            return
        hit = (last_token_ids.index_select(0, self.gate_pool_rows).long() == self.gate_tokens).unsqueeze(1)
        current = self.vocab_mask.index_select(0, self.gate_mask_rows)
        self.vocab_mask.index_copy_(0, self.gate_mask_rows, torch.where(hit, self.gated_masks, current))

    def record_sampled(self, next_token_ids: torch.Tensor) -> None:
        """Add this step's sampled tokens to the penalized requests' device counts (queued, no sync)."""
        if self.penalty_counts is not None:
            self.penalty_counts.accumulate(self.counted_pool_rows, next_token_ids.index_select(0, self.counted_rows))

    @classmethod
    def from_reqs(cls, reqs: Sequence[Any], vocab_size: int, device: torch.device, inflight_tokens: int = 0,
                  penalty_counts: Optional[PenaltyCounts] = None) -> "SamplingBatchInfo":
        """`inflight_tokens`: tokens each request sampled on the device that are not in its output_ids yet
        (the overlap schedule launches a step before the previous one's tokens reach the host). They count
        for the seeded position and min_new_tokens. Penalties read `penalty_counts`, which the device keeps
        up to date (`record_sampled`); without it, counts are built from the host ids for this batch alone.
        Grammars need the ids themselves, so a batch with one must not be built with inflight tokens."""
        sps = [r.sampling_params for r in reqs]
        greedy = [sp.top_k == 1 for sp in sps]
        sampled = [sp for sp, g in zip(sps, greedy) if not g]

        def f32(vals: List[float]) -> torch.Tensor:
            return torch.tensor(vals, dtype=torch.float32).to(device, non_blocking=True)

        def i64(vals: List[int]) -> torch.Tensor:
            return _i64(vals, device)

        top_ks = torch.tensor([min(sp.top_k, vocab_size) for sp in sps], dtype=torch.int32)
        seed_list = [-1 if sp.sampling_seed is None else sp.sampling_seed & _SEED_MASK for sp in sps]
        any_seeded = any(s >= 0 for s in seed_list)

        if inflight_tokens and any(needs_output_ids(r) for r in reqs):
            raise ValueError("grammars need every output id on the host: build this after the previous step's "
                             "results are processed (Scheduler.launch_batch's before_sampling)")
        freq = [sp.frequency_penalty for sp in sps]
        pres = [sp.presence_penalty for sp in sps]
        rep = [sp.repetition_penalty for sp in sps]
        use_freq = any(v != 0.0 for v in freq)
        use_pres = any(v != 0.0 for v in pres)
        use_rep = any(v != 1.0 for v in rep)
        penalties = _penalty_rows(reqs, vocab_size, device, inflight_tokens, penalty_counts, use_rep) \
            if (use_freq or use_pres or use_rep) else {}
        outputs = [r.output_ids for r in reqs]

        return cls(
            temperatures=f32([sp.temperature for sp in sps]).view(-1, 1),
            top_ps=f32([sp.top_p for sp in sps]),
            top_ks=top_ks.to(device, non_blocking=True),
            min_ps=f32([sp.min_p for sp in sps]),
            is_all_greedy=all(greedy),
            need_top_p=any(sp.top_p < 1.0 for sp in sampled),
            need_top_k=any(sp.top_k < vocab_size for sp in sampled),
            need_min_p=any(sp.min_p > 0.0 for sp in sampled),
            seeds=i64(seed_list) if any_seeded else None,
            positions=i64([len(o) + inflight_tokens for o in outputs]),
            frequency_penalties=f32(freq) if use_freq else None,
            presence_penalties=f32(pres) if use_pres else None,
            repetition_penalties=f32(rep) if use_rep else None,
            output_token_counts=penalties.pop("output_token_counts", None),
            prompt_token_mask=penalties.pop("prompt_token_mask", None),
            min_new_tokens_mask=_min_new_tokens_mask(reqs, vocab_size, device, inflight_tokens),
            logit_bias=_logit_bias(sps, vocab_size, device),
            vocab_size=vocab_size,
            seeded_rows=i64([i for i, s in enumerate(seed_list) if s >= 0]) if any_seeded else None,
            **_vocab_mask(reqs, vocab_size, device, inflight_tokens),
            **penalties,
        )


def needs_output_ids(req: Any) -> bool:
    """Whether sampling for `req` reads its output ids on the host (a grammar has taken them), not only how
    many there are. Penalties do not: their counts live on the device (PenaltyCounts); nor does a grammar
    with a gate token (a thinking request whose constraint waits for the end of its reasoning)."""
    return req.grammar is not None and req.grammar.gate_token() is None


def _penalty_rows(reqs: Sequence[Any], vocab_size: int, device: torch.device, inflight_tokens: int,
                  pool: Optional[PenaltyCounts], with_prompt_mask: bool) -> dict:
    """The batch's rows of the penalty counts (and prompt masks), and which sampled tokens go back into them.
    A chunk that does not end its prompt samples a token nobody keeps: it is not counted."""
    pool = pool if pool is not None else PenaltyCounts(vocab_size, device, capacity=len(reqs) + 1)
    rows = pool.rows(reqs, inflight_tokens)
    counted = [i for i, r in enumerate(reqs)
               if r.sampling_params.uses_penalties and not getattr(r, "mid_prompt_chunk", False)]
    counted_rows = _i64(counted, device)
    return {
        "output_token_counts": pool.counts.index_select(0, rows),
        "prompt_token_mask": pool.prompt_mask.index_select(0, rows) if with_prompt_mask else None,
        "penalty_counts": pool,
        "counted_rows": counted_rows,
        "counted_pool_rows": rows.index_select(0, counted_rows),
    }


def _token_mask(rows: Sequence[Iterable[int]], vocab_size: int, device: torch.device) -> torch.Tensor:
    flat = flat_indices(rows, vocab_size).to(device, non_blocking=True)
    mask = torch.zeros(len(rows) * vocab_size, dtype=torch.bool, device=device)
    mask[flat] = True
    return mask.view(len(rows), vocab_size)


def _min_new_tokens_mask(reqs: Sequence[Any], vocab_size: int, device: torch.device, inflight_tokens: int = 0
                         ) -> Optional[torch.Tensor]:
    """Stop ids a request may not emit yet because it has fewer than min_new_tokens outputs.

    With ignore_eos the eos ids don't end the request, so they are left alone; stop_token_ids always end it.
    """
    rows: List[List[int]] = []
    for r in reqs:
        sp = r.sampling_params
        if len(r.output_ids) + inflight_tokens >= sp.min_new_tokens:
            rows.append([])
            continue
        ids = set(sp.stop_token_ids or ())
        if not sp.ignore_eos:
            ids |= set(r.eos_token_ids or ())
        rows.append(sorted(ids))
    if not any(rows):
        return None
    return _token_mask(rows, vocab_size, device)


def _vocab_mask(reqs: Sequence[Any], vocab_size: int, device: torch.device, inflight_tokens: int = 0) -> dict:
    """The next-token bitmasks of the requests with a grammar (filled on the host: the grammar state is there).
    A terminated grammar (its request finished on the previous step; this step's token is dropped) has none.
    With a token in flight, a grammar with a gate token also gets its gated mask (resolve_gates)."""
    rows = [i for i, r in enumerate(reqs) if r.grammar is not None and not r.grammar.is_terminated()]
    if not rows:
        return {}
    mask = allocate_vocab_mask(len(rows), vocab_size)
    gates = []  # (vocab_mask row, request) of the rows whose mask turns on the token in flight
    for j, i in enumerate(rows):
        reqs[i].grammar.fill_vocab_mask(mask, j)
        if inflight_tokens and reqs[i].grammar.gate_token() is not None:
            gates.append((j, reqs[i]))
    out = {"vocab_mask": _to_device(mask, device), "vocab_mask_rows": _i64(rows, device)}
    if gates:
        gated = allocate_vocab_mask(len(gates), vocab_size)
        for k, (_, r) in enumerate(gates):
            r.grammar.fill_gated_mask(gated, k)

        out.update(gate_mask_rows=_i64([j for j, _ in gates], device),
                   gate_pool_rows=_i64([r.req_pool_idx for _, r in gates], device),
                   gate_tokens=_i64([r.grammar.gate_token() for _, r in gates], device),
                   gated_masks=_to_device(gated, device))
    return out


def _i64(vals: List[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(vals, dtype=torch.int64).to(device, non_blocking=True)


def _to_device(mask: torch.Tensor, device: torch.device) -> torch.Tensor:
    return (mask.pin_memory() if device.type == "cuda" else mask).to(device, non_blocking=True)


def _logit_bias(sps: Sequence[Any], vocab_size: int, device: torch.device) -> Optional[torch.Tensor]:
    if not any(sp.logit_bias for sp in sps):
        return None
    biases = [sp.logit_bias or {} for sp in sps]
    flat = flat_indices([[int(k) for k in b] for b in biases], vocab_size)
    # Same filter as flat_indices, applied to the values so they stay aligned with the ids.
    vals = torch.tensor(
        [float(v) for b in biases for k, v in b.items() if 0 <= int(k) < vocab_size], dtype=torch.float32
    )
    bias = torch.zeros(len(sps) * vocab_size, dtype=torch.float32, device=device)
    # accumulate: "7" and "07" name the same token; their biases add up rather than one silently winning.
    bias.index_put_((flat.to(device, non_blocking=True),), vals.to(device, non_blocking=True), accumulate=True)
    return bias.view(len(sps), vocab_size)

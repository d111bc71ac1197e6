"""Req and ScheduleBatch: the scheduler's CPU-side state of requests and of the batch it runs next.

KV bookkeeping of a request: `req_to_token[req.req_pool_idx, :req.kv_len]` are the KV slots of its first
`kv_len` tokens (prompt + output). Everything but the newest output token has KV once a step finishes; the
prefix part of those slots (`prefix_indices`) is owned by the prefix cache and locked through `last_node`.
"""

from __future__ import annotations

from enum import Enum, auto
from typing import Any, Dict, List, Optional, Set, Tuple

import torch

from sglx.srt.mem_cache.base_prefix_cache import BasePrefixCache
from sglx.srt.model_executor.forward_batch import ForwardMode, ModelWorkerBatch
from sglx.srt.sampling.penalty_counts import PenaltyCounts
from sglx.srt.sampling.sampling_batch_info import SamplingBatchInfo
from sglx.srt.sampling.sampling_params import SamplingParams


class FinishReason(Enum):
    STOP = auto()
    LENGTH = auto()
    ABORT = auto()


def finish_stop(matched: Any) -> Dict[str, Any]:
    return {"type": "stop", "matched": matched}


def finish_length(length: int) -> Dict[str, Any]:
    return {"type": "length", "length": length}


def finish_abort(message: str, status_code: int = 400) -> Dict[str, Any]:
    return {"type": "abort", "message": message, "status_code": status_code}


class Req:
    def __init__(
        self,
        rid: str,
        origin_input_text: Optional[str],
        origin_input_ids: List[int],
        sampling_params: SamplingParams,
        eos_token_ids: Set[int],
        return_logprob: bool = False,
        top_logprobs_num: int = 0,
        stream: bool = False,
        max_seq_len: int = 1 << 30,
        logprob_start_len: int = -1,
    ) -> None:
        self.rid = rid
        self.origin_input_text = origin_input_text
        self.origin_input_ids = origin_input_ids
        self.sampling_params = sampling_params
        self.eos_token_ids = eos_token_ids
        self.return_logprob = return_logprob
        self.top_logprobs_num = top_logprobs_num
        self.stream = stream
        self.max_seq_len = max_seq_len  # min(context length, KV pool size): a request never outgrows it

        self.output_ids: List[int] = []
        # time.monotonic() when the first output token reached the host (for --enable-metrics' time to first
        # token; CLOCK_MONOTONIC is one clock for every process of the machine).
        self.first_token_time: Optional[float] = None
        self.finished_reason: Optional[Dict[str, Any]] = None
        self.to_abort: Optional[str] = None
        # Structured output: this request's grammar state (a BaseGrammarObject), set once it is compiled.
        self.grammar: Any = None

        # KV state
        self.req_pool_idx: Optional[int] = None
        self.prefix_indices: torch.Tensor = torch.empty(0, dtype=torch.int64)
        self.last_node: Any = None
        self.kv_len = 0
        self.fill_ids: List[int] = []
        self.extend_input_len = 0
        self.cached_tokens = 0  # prompt tokens served from the prefix cache, reported to the user
        self.is_chunked = False
        self.num_prefills = 0
        self.retract_count = 0

        # Output streaming: how many output ids / logprobs were already sent.
        self.send_offset = 0
        self.output_token_logprobs: List[Tuple[float, int]] = []
        self.output_top_logprobs: List[List[Tuple[float, int]]] = []
        # Prompt logprobs (return_logprob with logprob_start_len >= 0): (logprob, id) of each prompt token from
        # position logprob_start_len on, filled chunk by chunk as the prefill runs. Position 0 has no context:
        # its logprob (and top list) is None. input_logprobs_sent: how many were already streamed.
        self.logprob_start_len = logprob_start_len if return_logprob else -1
        self.input_token_logprobs: List[Tuple[Optional[float], int]] = []
        self.input_top_logprobs: List[Optional[List[Tuple[float, int]]]] = []
        self.input_logprobs_sent = 0
        if self.logprob_start_len == 0 and origin_input_ids:
            self.input_token_logprobs.append((None, origin_input_ids[0]))
            self.input_top_logprobs.append(None)

        # Embedding requests: one prefill, no sampling; the pooled vector once it ran.
        self.token_type_ids: Optional[List[int]] = None
        self.embedding: Optional[List[float]] = None

    # ---------------------------------------------------------------- state
    @property
    def seqlen(self) -> int:
        return len(self.origin_input_ids) + len(self.output_ids)

    def all_ids(self) -> List[int]:
        return self.origin_input_ids + self.output_ids

    def kv_token_ids(self) -> List[int]:
        return self.all_ids()[: self.kv_len]

    @property
    def mid_prompt_chunk(self) -> bool:
        """Whether this request's prefill in the current batch is a chunk that does not end its prompt: the
        token sampled after it is thrown away (is_chunked alone also holds for the final chunk)."""
        return self.is_chunked and len(self.fill_ids) < self.seqlen

    def finished(self) -> bool:
        return self.finished_reason is not None

    @property
    def next_input_logprob_pos(self) -> int:
        """The first prompt position whose logprob is still to be computed; len(prompt) when none is."""
        if self.logprob_start_len < 0:
            return len(self.origin_input_ids)
        return self.logprob_start_len + len(self.input_token_logprobs)

    def input_logprob_rows(self, prefix_len: int, seq_len: int) -> range:
        """The positions of an extend over [prefix_len, seq_len) whose logits score a prompt token still
        unscored: position q scores prompt token q + 1 (the last prompt position predicts the first output)."""
        lo = max(prefix_len, self.next_input_logprob_pos - 1)
        hi = min(seq_len, len(self.origin_input_ids) - 1)
        return range(lo, max(lo, hi))

    def init_next_round_input(self, tree_cache: BasePrefixCache) -> None:
        """Match the longest cached prefix of what must be in KV after the next prefill (at least one token
        is always computed, so the prefill has a position to take logits from). Prompt tokens still to be
        scored need the hidden state before them computed, so the match stops there."""
        self.fill_ids = self.all_ids()
        if self.is_chunked:
            # A chunked prefill continues from its own slots, already locked in the tree.
            self.extend_input_len = len(self.fill_ids) - len(self.prefix_indices)
            return
        limit = len(self.fill_ids) - 1
        if self.next_input_logprob_pos < len(self.origin_input_ids):
            limit = min(limit, self.next_input_logprob_pos - 1)
        match = tree_cache.match_prefix(self.fill_ids[:limit])
        self.prefix_indices, self.last_node = match.device_indices, match.last_node
        self.extend_input_len = len(self.fill_ids) - len(self.prefix_indices)

    def reset_for_retract(self) -> None:
        self.req_pool_idx = None
        self.prefix_indices = torch.empty(0, dtype=torch.int64)
        self.last_node = None
        self.kv_len = 0
        self.is_chunked = False
        self.retract_count += 1

    # ---------------------------------------------------------------- finishing
    def check_finished(self, tokenizer: Any) -> None:
        if self.finished():
            return
        if self.to_abort is not None:
            self.finished_reason = finish_abort(self.to_abort)
            return
        sp = self.sampling_params
        n_out = len(self.output_ids)
        if n_out == 0:
            return
        last = self.output_ids[-1]
        if self.grammar is not None and self.grammar.is_terminated():
            # The grammar is complete and took a stop token (even with ignore_eos: nothing more may follow).
            self.finished_reason = finish_stop(last)
            return
        if n_out >= sp.min_new_tokens:
            if sp.stop_token_ids and last in sp.stop_token_ids:
                self.finished_reason = finish_stop(last)
                return
            if not sp.ignore_eos and last in self.eos_token_ids:
                self.finished_reason = finish_stop(last)
                return
            if sp.stop_strs and tokenizer is not None:
                tail = tokenizer.decode(self.output_ids[-(sp.stop_str_max_len + 2) :])
                for s in sp.stop_strs:
                    if s in tail:
                        self.finished_reason = finish_stop(s)
                        return
        if sp.max_new_tokens is not None and n_out >= sp.max_new_tokens:
            self.finished_reason = finish_length(sp.max_new_tokens)
        elif self.seqlen >= self.max_seq_len:
            self.finished_reason = finish_length(n_out)

    def __repr__(self) -> str:
        return f"Req(rid={self.rid}, input={len(self.origin_input_ids)}, output={len(self.output_ids)})"


def decode_tokens_needed(reqs: List[Req], page_size: int) -> int:
    """KV slots one decode step of `reqs` takes: one each, or a fresh page where the last one is full."""
    if page_size == 1:
        return len(reqs)
    return sum(page_size for r in reqs if r.kv_len % page_size == 0)


class ScheduleBatch:
    """The requests of one forward step and the KV slots their new tokens go to."""

    def __init__(self, reqs: List[Req], forward_mode: ForwardMode, ctx: "BatchContext") -> None:
        self.reqs = reqs
        self.forward_mode = forward_mode
        self.ctx = ctx
        self.input_ids: Optional[List[int]] = []
        self.seq_lens: List[int] = []
        self.prefix_lens: List[int] = []
        self.out_cache_loc: Optional[torch.Tensor] = None
        # Prompt logprobs of this extend: per request how many it scores, and for all of them together the
        # rows of the batch's tokens whose logits score them and the ids they score (Req.input_logprob_rows).
        self.input_logprob_counts: List[int] = []
        self.input_logprob_indices: List[int] = []
        self.input_logprob_targets: List[int] = []

    # ---------------------------------------------------------------- extend
    def prepare_for_extend(self) -> None:
        """Give each request a ReqToTokenPool row and KV slots for its new tokens (the caller checked that
        enough memory is free or evictable)."""
        ctx = self.ctx
        self.input_ids, self.seq_lens, self.prefix_lens = [], [], []
        last_locs = []
        for r in self.reqs:
            if r.req_pool_idx is None:
                r.req_pool_idx = ctx.req_to_token_pool.alloc()
                if r.req_pool_idx is None:
                    raise RuntimeError("ReqToTokenPool exhausted; --max-running-requests bookkeeping is off")
                if len(r.prefix_indices):
                    ctx.req_to_token_pool.write(r.req_pool_idx, 0, r.prefix_indices)
            pre = len(r.prefix_indices)
            self.prefix_lens.append(pre)
            self.seq_lens.append(len(r.fill_ids))
            self.input_ids.extend(r.fill_ids[pre:])
            last_locs.append(int(ctx.req_to_token_pool.req_to_token[r.req_pool_idx, pre - 1]) if pre else -1)
        n = len(self.input_ids)
        loc = ctx.alloc_with_evict(
            lambda: ctx.allocator.alloc_extend(self.prefix_lens, self.seq_lens, last_locs, n), n
        )
        self.out_cache_loc = loc
        off = 0
        for r, pre, seq in zip(self.reqs, self.prefix_lens, self.seq_lens):
            ctx.req_to_token_pool.write(r.req_pool_idx, pre, loc[off : off + seq - pre])
            off += seq - pre
            r.kv_len = seq
        if not ctx.is_embedding:
            self.plan_input_logprobs()

    def plan_input_logprobs(self) -> None:
        self.input_logprob_counts, self.input_logprob_indices, self.input_logprob_targets = [], [], []
        offset = 0  # of each request's first new token in the batch
        for r, pre, seq in zip(self.reqs, self.prefix_lens, self.seq_lens):
            rows = r.input_logprob_rows(pre, seq)
            self.input_logprob_counts.append(len(rows))
            self.input_logprob_indices.extend(offset + q - pre for q in rows)
            self.input_logprob_targets.extend(r.origin_input_ids[q + 1] for q in rows)
            offset += seq - pre

    # ---------------------------------------------------------------- decode
    def decode_tokens_needed(self) -> int:
        return decode_tokens_needed(self.reqs, self.ctx.page_size)

    def prepare_for_decode(self) -> None:
        """One KV slot per request for its newest token, whose id the host may not know yet: the input ids
        are left to the device (input_ids None, see ModelWorkerBatch). Nothing here waits for the device."""
        ctx = self.ctx
        self.forward_mode = ForwardMode.DECODE
        self.input_ids = None
        self.prefix_lens = [r.kv_len for r in self.reqs]
        self.seq_lens = [r.kv_len + 1 for r in self.reqs]
        table = ctx.req_to_token_pool.req_to_token

        def dev(vals: List[int]) -> torch.Tensor:
            return torch.tensor(vals, dtype=torch.int64).to(table.device, non_blocking=True)

        rows, cols = dev([r.req_pool_idx for r in self.reqs]), dev([r.kv_len - 1 for r in self.reqs])
        # Paged pools continue each request's last page: the slot of its newest KV, read on the device.
        last_locs = table[rows, cols].to(torch.int64) if ctx.page_size > 1 else None
        loc = ctx.alloc_with_evict(
            lambda: ctx.allocator.alloc_decode(self.seq_lens, last_locs), self.decode_tokens_needed()
        )
        self.out_cache_loc = loc
        table[rows, cols + 1] = loc.to(table.device, table.dtype)
        for r in self.reqs:
            r.kv_len += 1

    # ---------------------------------------------------------------- hand-off
    def get_model_worker_batch(self, inflight_tokens: int = 0, with_sampling_info: bool = True) -> ModelWorkerBatch:
        """The runner's view of this step. `inflight_tokens`: tokens each request has already sampled on the
        device beyond its output_ids (1 when the step launches before the previous one's results are
        processed), so sampling sees the true output count. Without sampling info, the caller sets it
        (`sampling_info()`) before sampling."""
        ctx = self.ctx
        batch = ModelWorkerBatch(
            forward_mode=self.forward_mode,
            input_ids=self.input_ids,
            req_pool_indices=[r.req_pool_idx for r in self.reqs],
            seq_lens=self.seq_lens,
            prefix_lens=self.prefix_lens,
            out_cache_loc=self.out_cache_loc,
        )
        if ctx.is_embedding:
            # Prefill only: no sampling; token type ids of the new tokens when any request has them.
            batch.is_embedding = True
            if any(r.token_type_ids is not None for r in self.reqs):
                batch.token_type_ids = [
                    t
                    for r, pre, seq in zip(self.reqs, self.prefix_lens, self.seq_lens)
                    for t in (r.token_type_ids[pre:seq] if r.token_type_ids is not None else [0] * (seq - pre))
                ]
            return batch
        if with_sampling_info:
            batch.sampling_info = self.sampling_info(inflight_tokens)
        batch.return_logprob = any(r.return_logprob for r in self.reqs)
        if batch.return_logprob:
            batch.top_logprobs_nums = [r.top_logprobs_num for r in self.reqs]
        if self.input_logprob_indices and self.forward_mode.is_extend():
            batch.input_logprob_indices = self.input_logprob_indices
            batch.input_logprob_targets = self.input_logprob_targets
            batch.input_top_logprobs_num = max(
                r.top_logprobs_num for r, c in zip(self.reqs, self.input_logprob_counts) if c)
        return batch

    def sampling_info(self, inflight_tokens: int = 0) -> SamplingBatchInfo:
        return SamplingBatchInfo.from_reqs(self.reqs, self.ctx.vocab_size, self.ctx.device, inflight_tokens,
                                           self.ctx.penalty_counts)


class BatchContext:
    """What a ScheduleBatch needs from the scheduler's memory managers."""

    def __init__(self, req_to_token_pool, allocator, tree_cache: BasePrefixCache, page_size: int,
                 vocab_size: int, device: torch.device, is_embedding: bool = False,
                 penalty_counts: Optional[PenaltyCounts] = None) -> None:
        self.is_embedding = is_embedding
        self.penalty_counts = penalty_counts  # the runner's; None: counts built per batch from host ids
        self.req_to_token_pool = req_to_token_pool
        self.allocator = allocator
        self.tree_cache = tree_cache
        self.page_size = page_size
        self.vocab_size = vocab_size
        self.device = device

    def available_tokens(self) -> int:
        return self.allocator.available_size() + self.tree_cache.evictable_size()

    def alloc_with_evict(self, alloc, num_tokens: int) -> torch.Tensor:
        if self.allocator.available_size() < num_tokens:
            self.tree_cache.evict(num_tokens - self.allocator.available_size())
        loc = alloc()
        if loc is None:
            # Page-granular allocation can need a little more than num_tokens; evict generously once.
            self.tree_cache.evict(num_tokens + self.page_size * 64)
            loc = alloc()
        if loc is None:
            raise RuntimeError(
                f"KV pool exhausted: need {num_tokens}, free {self.allocator.available_size()}, "
                f"evictable {self.tree_cache.evictable_size()}"
            )
        return loc

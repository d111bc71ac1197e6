"""ForwardBatch: the device-side view of one scheduler step, handed to model.forward()."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum, auto
from typing import TYPE_CHECKING, Any, List, Optional

import torch

if TYPE_CHECKING:
    from sglx.srt.layers.attention.base_attn_backend import AttentionBackend
    from sglx.srt.mem_cache.memory_pool import KVCache, ReqToTokenPool


class ForwardMode(IntEnum):
    EXTEND = auto()  # prefill, possibly on top of a cached prefix (chunked prefill included)
    DECODE = auto()  # one new token per request
    MIXED = auto()  # extend and decode requests in one batch (decode ones are extends of length 1)
    IDLE = auto()  # nothing to run (kept for DP/TP symmetry)
    TARGET_VERIFY = auto()  # speculative decoding: verify draft tokens
    DRAFT_EXTEND = auto()

    def is_extend(self) -> bool:
        return self in (ForwardMode.EXTEND, ForwardMode.MIXED, ForwardMode.DRAFT_EXTEND, ForwardMode.TARGET_VERIFY)

    def is_decode(self) -> bool:
        return self == ForwardMode.DECODE

    def is_mixed(self) -> bool:
        return self == ForwardMode.MIXED

    def is_idle(self) -> bool:
        return self == ForwardMode.IDLE


@dataclass
class ModelWorkerBatch:
    """CPU-side description of a step, produced by ScheduleBatch for the model runner."""

    forward_mode: ForwardMode
    # None for a decode step whose inputs are the requests' newest tokens: the runner reads them on the
    # device (ModelRunner.last_token_ids), so the host may launch the step before it has those tokens.
    input_ids: Optional[List[int]]
    req_pool_indices: List[int]
    seq_lens: List[int]  # sequence length after this step
    prefix_lens: List[int]  # tokens already in the KV cache before this step
    out_cache_loc: torch.Tensor  # [num_tokens] int64 KV slots of the new tokens
    sampling_info: Any = None  # SamplingBatchInfo
    return_logprob: bool = False
    top_logprobs_nums: Optional[List[int]] = None
    # Prompt logprobs (extend only): the batch's token rows whose logits score a prompt token, the ids they
    # score, and how many top alternatives the most demanding of their requests wants.
    input_logprob_indices: Optional[List[int]] = None
    input_logprob_targets: Optional[List[int]] = None
    input_top_logprobs_num: int = 0
    # Embedding serving: pooled hidden states instead of logits.
    is_embedding: bool = False
    token_type_ids: Optional[List[int]] = None

    @property
    def extend_lens(self) -> List[int]:
        return [s - p for s, p in zip(self.seq_lens, self.prefix_lens)]


@dataclass
class ForwardBatch:
    forward_mode: ForwardMode
    batch_size: int
    input_ids: torch.Tensor  # [num_tokens] int64
    positions: torch.Tensor  # [num_tokens] int64
    req_pool_indices: torch.Tensor  # [bs] int64
    seq_lens: torch.Tensor  # [bs] int64
    out_cache_loc: torch.Tensor  # [num_tokens] int64
    seq_lens_cpu: List[int]
    extend_prefix_lens_cpu: List[int]
    extend_seq_lens_cpu: List[int]
    extend_prefix_lens: torch.Tensor  # [bs] int64
    extend_seq_lens: torch.Tensor  # [bs] int64
    extend_start_loc: torch.Tensor  # [bs] int64: offset of each request's first new token
    req_to_token_pool: "ReqToTokenPool"
    token_to_kv_pool: "KVCache"
    attn_backend: "AttentionBackend"
    sampling_info: Any = None
    return_logprob: bool = False
    top_logprobs_nums: Optional[List[int]] = None
    token_type_ids: Optional[torch.Tensor] = None
    # Prompt logprobs (ModelWorkerBatch says what they are), on the device; None when no request asks.
    input_logprob_indices: Optional[torch.Tensor] = None
    input_logprob_targets: Optional[torch.Tensor] = None
    input_top_logprobs_num: int = 0
    # Skip the KV cache (prefill-only embedding serving; decided once, in model_runner.decide_skip_kv_cache):
    # attention runs on this batch's raw k/v, varlen over requests, the queries' cumulative lengths used for
    # the keys too (no request has a cached prefix). The KV pool is a NoOpKVPool: nothing may write or read it.
    skip_kv_cache: bool = False
    # The token rows whose final hidden states are read, one per request in request order, or None for all
    # rows. Set by the model runner for extend batches that read only each request's last token (next-token
    # logits) or one pooled token (last/cls pooling), and only for models whose `supports_output_rows` is
    # True: their last layer then runs everything after its attention (o_proj, residual, MLP) on these rows
    # only, and the model returns [len(out_rows), hidden]. Every layer's k/v is still computed for all tokens.
    out_rows: Optional[torch.Tensor] = None
    extra: dict = field(default_factory=dict)  # per-backend scratch metadata

    def last_token_rows(self) -> torch.Tensor:
        """[bs] the row of each request's last new token."""
        return self.extend_start_loc + self.extend_seq_lens - 1

    def check_out_rows(self, hidden_states: torch.Tensor) -> None:
        """With out_rows set, the model must have returned one row per request (a model that ignored it would be
        read wrongly by the logits processor or the pooler)."""
        if self.out_rows is not None and hidden_states.shape[0] != self.batch_size:
            raise RuntimeError(f"ForwardBatch.out_rows is set but the model returned {hidden_states.shape[0]} rows "
                               f"for {self.batch_size} requests: it does not honour out_rows")

    @classmethod
    def init_new(cls, b: ModelWorkerBatch, runner: Any) -> "ForwardBatch":
        device = runner.device
        ext = b.extend_lens
        starts = [0]
        for n in ext[:-1]:
            starts.append(starts[-1] + n)
        positions = torch.cat(
            [torch.arange(p, s, dtype=torch.int64) for p, s in zip(b.prefix_lens, b.seq_lens)]
        ) if b.seq_lens else torch.empty(0, dtype=torch.int64)

        def t(x: List[int]) -> torch.Tensor:
            return torch.tensor(x, dtype=torch.int64).to(device, non_blocking=True)

        skip_kv_cache = bool(getattr(runner, "skip_kv_cache", False)) and b.forward_mode.is_extend()
        if skip_kv_cache and any(b.prefix_lens):
            raise RuntimeError("skip_kv_cache batch with a cached prefix: its KV was never written")
        req_pool_indices = t(b.req_pool_indices)
        return cls(
            forward_mode=b.forward_mode,
            batch_size=len(b.seq_lens),
            input_ids=t(b.input_ids) if b.input_ids is not None else last_token_input_ids(b, runner, req_pool_indices),
            positions=positions.to(device, non_blocking=True),
            req_pool_indices=req_pool_indices,
            seq_lens=t(b.seq_lens),
            out_cache_loc=b.out_cache_loc.to(device, non_blocking=True),
            seq_lens_cpu=list(b.seq_lens),
            extend_prefix_lens_cpu=list(b.prefix_lens),
            extend_seq_lens_cpu=ext,
            extend_prefix_lens=t(b.prefix_lens),
            extend_seq_lens=t(ext),
            extend_start_loc=t(starts),
            req_to_token_pool=runner.req_to_token_pool,
            token_to_kv_pool=runner.token_to_kv_pool,
            attn_backend=runner.attn_backend,
            sampling_info=b.sampling_info,
            return_logprob=b.return_logprob,
            top_logprobs_nums=b.top_logprobs_nums,
            token_type_ids=t(b.token_type_ids) if b.token_type_ids is not None else None,
            input_logprob_indices=t(b.input_logprob_indices) if b.input_logprob_indices else None,
            input_logprob_targets=t(b.input_logprob_targets) if b.input_logprob_indices else None,
            input_top_logprobs_num=b.input_top_logprobs_num,
            skip_kv_cache=skip_kv_cache,
        )


def last_token_input_ids(b: ModelWorkerBatch, runner: Any, req_pool_indices: torch.Tensor) -> torch.Tensor:
    """A decode step's input ids read on the device: each request's newest sampled token."""
    if not b.forward_mode.is_decode():
        raise ValueError("only a decode batch may leave input_ids to the device (one new token per request)")
    return runner.last_token_ids.index_select(0, req_pool_indices)

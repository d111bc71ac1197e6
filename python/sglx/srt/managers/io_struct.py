"""Messages between the HTTP process, the scheduler and the detokenizer.

All travel over ZMQ as pickled dataclasses. The request id (`rid`) is carried end to end.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field, replace
from typing import Any, Dict, List, Optional, Tuple, Union

from sglx.srt.sampling.sampling_params import parallel_sample_num

# Why a generation request fails on an embedding server (every route says the same).
EMBEDDING_ONLY = "this server serves an embedding model: use /v1/embeddings or /encode"


def new_rid() -> str:
    return uuid.uuid4().hex


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def is_int_list(x: Any) -> bool:
    """A list of integers (bools excluded). The common case, plain ints, is checked at C speed: a Python loop
    over the 1.9M ids of a 512-input embedding request took 0.24 s of the host's time before the first batch."""
    if not isinstance(x, list):
        return False
    types = set(map(type, x))
    return types <= {int} or all(_is_int(v) for v in x)


def ids_in_range(ids: List[int], vocab_size: int) -> bool:
    """Every id in [0, vocab_size) (min and max at C speed)."""
    return not ids or (min(ids) >= 0 and max(ids) < vocab_size)


def _ids_shape_ok(ids: Any) -> bool:
    """A list of integers, or a list of lists of integers."""
    return is_int_list(ids) or (isinstance(ids, list) and all(is_int_list(row) for row in ids))


def _check_unicode(text: Any) -> None:
    """A prompt must be valid unicode: a lone surrogate (possible in a Python str, refused by the HTTP layer's
    JSON parser) would reach the tokenizer and fail there as an internal error."""
    for t in text if isinstance(text, list) else [text]:
        try:
            t.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"the text is not valid unicode: {e.reason} at position {e.start}") from None


# ----------------------------------------------------------------------------- HTTP-facing inputs
@dataclass
class GenerateReqInput:
    """SGLang's /generate payload: `text` or `input_ids`, single or batch."""

    text: Optional[Union[str, List[str]]] = None
    input_ids: Optional[Union[List[int], List[List[int]]]] = None
    sampling_params: Optional[Union[Dict[str, Any], List[Dict[str, Any]]]] = None
    rid: Optional[Union[str, List[str]]] = None
    return_logprob: Optional[Union[bool, List[bool]]] = None
    logprob_start_len: Optional[Union[int, List[int]]] = None
    top_logprobs_num: Optional[Union[int, List[int]]] = None
    return_text_in_logprobs: bool = False
    stream: bool = False

    def validate(self) -> None:
        """Shape and type checks of the payload; raises ValueError with a message for the client."""
        t, ids = self.text, self.input_ids
        if t is None and ids is None:
            raise ValueError("either text or input_ids is required")
        if t is not None and ids is not None:
            raise ValueError("give either text or input_ids, not both")
        if t is not None and not (isinstance(t, str) or (isinstance(t, list) and all(isinstance(x, str) for x in t))):
            raise ValueError("text must be a string or a list of strings")
        if t is not None:
            _check_unicode(t)
        if ids is not None:
            if not _ids_shape_ok(ids):
                raise ValueError("input_ids must be a list of integers or a list of lists of integers")
        sp = self.sampling_params
        if sp is not None and not isinstance(sp, dict) and not (
            isinstance(sp, list) and all(isinstance(x, dict) for x in sp)
        ):
            raise ValueError("sampling_params must be an object or a list of objects")
        rid = self.rid
        if rid is not None and not (isinstance(rid, str) or (isinstance(rid, list) and all(isinstance(r, str)
                                                                                          for r in rid))):
            raise ValueError("rid must be a string or a list of strings")
        if not isinstance(self.stream, bool):
            raise ValueError("stream must be a boolean")
        for name in ("sampling_params", "rid", "return_logprob", "logprob_start_len", "top_logprobs_num"):
            v = getattr(self, name)
            if isinstance(v, list) and (self.is_single() or len(v) != self.batch_size()):
                raise ValueError(f"{name} as a list needs one entry per prompt of a batch")

    def is_single(self) -> bool:
        if self.text is not None:
            return isinstance(self.text, str)
        return self.input_ids is not None and (len(self.input_ids) == 0 or isinstance(self.input_ids[0], int))

    def batch_size(self) -> int:
        if self.is_single():
            return 1
        return len(self.text if self.text is not None else self.input_ids)

    def with_parallel_samples(self) -> "GenerateReqInput":
        """SGLang's `sampling_params.n`: each prompt repeated n times as a batch (prompt i's samples one after
        another), each copy with n = 1, a given rid suffixed `-j` and a given seed offset by j, so the samples
        differ and stay reproducible. Returns self when every n is 1 (call after validate)."""
        items, counts = self._items_and_sample_counts()
        if all(c == 1 for c in counts):
            return self
        copies = [_sample_copy(it, j) if c > 1 else it for it, c in zip(items, counts) for j in range(c)]

        def each(name: str) -> List[Any]:
            return [getattr(c, name) for c in copies]

        rids = each("rid")
        return GenerateReqInput(
            text=each("text") if self.text is not None else None,
            input_ids=each("input_ids") if self.input_ids is not None else None,
            sampling_params=each("sampling_params"), rid=rids if all(r is not None for r in rids) else None,
            return_logprob=each("return_logprob"), logprob_start_len=each("logprob_start_len"),
            top_logprobs_num=each("top_logprobs_num"), return_text_in_logprobs=self.return_text_in_logprobs,
            stream=self.stream,
        )

    def parallel_sample_groups(self) -> List[Optional[str]]:
        """For each request of `with_parallel_samples()`, in order: the rid it is a sample of (an abort of that
        rid reaches it), or None."""
        items, counts = self._items_and_sample_counts()
        return [it.rid if c > 1 and isinstance(it.rid, str) else None for it, c in zip(items, counts)
                for _ in range(c)]

    def _items_and_sample_counts(self) -> Tuple[List["GenerateReqInput"], List[int]]:
        items = [self] if self.is_single() else [self[i] for i in range(self.batch_size())]
        return items, [parallel_sample_num(it.sampling_params) for it in items]

    def __getitem__(self, i: int) -> "GenerateReqInput":
        """The i-th request of a batch, as a single request."""

        def pick(v: Any) -> Any:
            return v[i] if isinstance(v, list) else v

        sp = self.sampling_params
        return GenerateReqInput(
            text=self.text[i] if self.text is not None else None,
            input_ids=self.input_ids[i] if self.input_ids is not None else None,
            sampling_params=sp[i] if isinstance(sp, list) else sp,
            rid=self.rid[i] if isinstance(self.rid, list) else None,
            return_logprob=pick(self.return_logprob),
            logprob_start_len=pick(self.logprob_start_len),
            top_logprobs_num=pick(self.top_logprobs_num),
            return_text_in_logprobs=self.return_text_in_logprobs,
            stream=self.stream,
        )


def _sample_copy(item: GenerateReqInput, j: int) -> GenerateReqInput:
    """Sample j of a single request: n = 1, rid `rid-j`, seed + j."""
    sp = dict(item.sampling_params or {})
    sp["n"] = 1
    for key in ("sampling_seed", "seed"):
        if isinstance(sp.get(key), int) and not isinstance(sp[key], bool):
            sp[key] += j
    rid = f"{item.rid}-{j}" if isinstance(item.rid, str) else None
    return replace(item, sampling_params=sp, rid=rid)


@dataclass
class EmbeddingReqInput:
    """SGLang's /encode payload (and what /v1/embeddings builds): `text` or `input_ids`, single or batch.
    `truncate`: cut inputs longer than the context instead of rejecting them."""

    text: Optional[Union[str, List[str]]] = None
    input_ids: Optional[Union[List[int], List[List[int]]]] = None
    rid: Optional[Union[str, List[str]]] = None
    truncate: bool = False

    def validate(self) -> None:
        """Shape and type checks; raises ValueError with a message for the client."""
        t, ids = self.text, self.input_ids
        if (t is None) == (ids is None):
            raise ValueError("give exactly one of text or input_ids")
        if t is not None:
            if isinstance(t, list):
                if not t:
                    raise ValueError("the input list is empty")
                if not all(isinstance(x, str) for x in t):
                    raise ValueError("text must be a string or a list of strings")
            elif not isinstance(t, str):
                raise ValueError("text must be a string or a list of strings")
            if any(x == "" for x in (t if isinstance(t, list) else [t])):
                raise ValueError("an input string is empty")
            _check_unicode(t)
        else:
            if not _ids_shape_ok(ids):
                raise ValueError("input_ids must be a list of integers or a list of lists of integers")
            if not ids or any(isinstance(row, list) and not row for row in ids):
                raise ValueError("an input token list is empty")
        if not isinstance(self.truncate, bool):
            raise ValueError("truncate must be a boolean")
        rid = self.rid
        if rid is not None:
            if self.is_single() and not isinstance(rid, str):
                raise ValueError("rid must be a string")
            if not self.is_single() and not (
                isinstance(rid, list) and len(rid) == self.batch_size() and all(isinstance(r, str) for r in rid)
            ):
                raise ValueError("rid must be a list of strings, one per input")

    def is_single(self) -> bool:
        if self.text is not None:
            return isinstance(self.text, str)
        return not self.input_ids or _is_int(self.input_ids[0])

    def batch_size(self) -> int:
        return 1 if self.is_single() else len(self.text if self.text is not None else self.input_ids)

    def items(self) -> List[Tuple[Optional[str], Optional[List[int]], Optional[str]]]:
        """(text, input_ids, rid) per input, in order."""
        if self.is_single():
            return [(self.text, self.input_ids, self.rid)]
        rids = self.rid if isinstance(self.rid, list) else [None] * self.batch_size()
        if self.text is not None:
            return [(t, None, r) for t, r in zip(self.text, rids)]
        return [(None, ids, r) for ids, r in zip(self.input_ids, rids)]


# ----------------------------------------------------------------------------- tokenizer -> scheduler
@dataclass
class TokenizedGenerateReqInput:
    rid: str
    input_text: Optional[str]
    input_ids: List[int]
    sampling_params: Any  # SamplingParams, normalized
    return_logprob: bool = False
    logprob_start_len: int = -1
    top_logprobs_num: int = 0
    stream: bool = False


@dataclass
class TokenizedEmbeddingReqInput:
    rid: str
    input_text: Optional[str]
    input_ids: List[int]
    token_type_ids: Optional[List[int]] = None


@dataclass
class BatchTokenizedEmbeddingReqInput:
    """The inputs of one embedding request, sent together so that the scheduler batches them."""

    reqs: List[TokenizedEmbeddingReqInput]


@dataclass
class AbortReq:
    """Abort these requests (exact rids: the tokenizer manager resolves an id to the requests it names), or
    every request."""

    rids: List[str] = field(default_factory=list)
    abort_all: bool = False

    def __post_init__(self) -> None:
        self._rid_set = frozenset(self.rids)

    def matches(self, rid: str) -> bool:
        return self.abort_all or rid in self._rid_set


@dataclass
class FlushCacheReqInput:
    pass


@dataclass
class FlushCacheReqOutput:
    success: bool
    message: str = ""


@dataclass
class GetInternalStateReq:
    pass


@dataclass
class ProfileReq:
    """Start or stop the scheduler's torch profiler (see managers/scheduler_profiler.py)."""

    action: str  # "start" | "stop"
    output_dir: Optional[str] = None  # default: $SGLX_TORCH_PROFILER_DIR, else /tmp
    num_steps: Optional[int] = None  # stop by itself after this many steps that ran a batch
    activities: Optional[List[str]] = None  # "CPU", "GPU" (default both)
    record_shapes: bool = False
    with_stack: bool = False


@dataclass
class ProfileReqOutput:
    success: bool
    message: str = ""
    trace_path: Optional[str] = None


@dataclass
class GetInternalStateReqOutput:
    state: Dict[str, Any]


# ----------------------------------------------------------------------------- scheduler -> detokenizer
@dataclass
class BatchTokenIDOut:
    """One scheduler step's news, per request: the output ids produced since the last message."""

    rids: List[str]
    finished_reasons: List[Optional[Dict[str, Any]]]
    new_output_ids: List[List[int]]
    prompt_tokens: List[int]
    completion_tokens: List[int]
    cached_tokens: List[int]
    skip_special_tokens: List[bool]
    spaces_between_special_tokens: List[bool]
    no_stop_trim: List[bool]
    # Stop strings per request: the detokenizer holds back text that may still become one, and trims the match.
    stop_strs: List[List[str]]
    # Per request: list of (logprob, token_id) for the new tokens, or None when not asked for.
    output_token_logprobs: List[Optional[List[Tuple[float, int]]]] = field(default_factory=list)
    # Per request: per new token, list of (logprob, token_id), or None.
    output_top_logprobs: List[Optional[List[List[Tuple[float, int]]]]] = field(default_factory=list)
    # Per request: the prompt logprobs not sent before, (logprob, token_id) from logprob_start_len on (the
    # first prompt token's logprob is None), or None when not asked for; and per prompt token its top list.
    input_token_logprobs: List[Optional[List[Tuple[Optional[float], int]]]] = field(default_factory=list)
    input_top_logprobs: List[Optional[List[Optional[List[Tuple[float, int]]]]]] = field(default_factory=list)
    # Per request: time.monotonic() when its first output token reached the scheduler's host (None before).
    first_token_times: List[Optional[float]] = field(default_factory=list)


@dataclass
class BatchEmbeddingOut:
    """Scheduler -> tokenizer manager directly (no detokenizer): finished embedding requests. An aborted or
    rejected request has an empty embedding and an abort finish reason."""

    rids: List[str]
    embeddings: List[List[float]]
    prompt_tokens: List[int]
    finished_reasons: List[Optional[Dict[str, Any]]]


# ----------------------------------------------------------------------------- detokenizer -> tokenizer
@dataclass
class BatchStrOut:
    rids: List[str]
    finished_reasons: List[Optional[Dict[str, Any]]]
    # Text produced since the last message for this request (already stop-trimmed at the end).
    new_texts: List[str]
    new_output_ids: List[List[int]]
    prompt_tokens: List[int]
    completion_tokens: List[int]
    cached_tokens: List[int]
    output_token_logprobs: List[Optional[List[Tuple[float, int]]]] = field(default_factory=list)
    output_top_logprobs: List[Optional[List[List[Tuple[float, int]]]]] = field(default_factory=list)
    # Per request: the prompt logprobs not sent before, (logprob, token_id) from logprob_start_len on (the
    # first prompt token's logprob is None), or None when not asked for; and per prompt token its top list.
    input_token_logprobs: List[Optional[List[Tuple[Optional[float], int]]]] = field(default_factory=list)
    input_top_logprobs: List[Optional[List[Optional[List[Tuple[float, int]]]]]] = field(default_factory=list)
    # Per request: time.monotonic() when its first output token reached the scheduler's host (None before).
    first_token_times: List[Optional[float]] = field(default_factory=list)

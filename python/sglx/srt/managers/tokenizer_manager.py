"""TokenizerManager: lives in the HTTP process; tokenizes, validates, sends to the scheduler, and turns the
detokenizer's deltas back into per-request outputs (streamed or whole)."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import copy
import dataclasses
import functools
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Deque, Dict, List, Optional, TypeVar

import zmq
import zmq.asyncio

from sglx.srt.hf_transformers_utils import get_tokenizer
from sglx.srt.managers.detokenizer_manager import DETOKENIZER_ABORT
from sglx.srt.managers.io_struct import (
    EMBEDDING_ONLY,
    AbortReq,
    BatchEmbeddingOut,
    BatchStrOut,
    BatchTokenizedEmbeddingReqInput,
    EmbeddingReqInput,
    FlushCacheReqInput,
    FlushCacheReqOutput,
    GenerateReqInput,
    GetInternalStateReq,
    GetInternalStateReqOutput,
    ProfileReq,
    ProfileReqOutput,
    TokenizedEmbeddingReqInput,
    TokenizedGenerateReqInput,
    ids_in_range,
    is_int_list,
    new_rid,
)
from sglx.srt.metrics.collector import TokenizerMetricsCollector
from sglx.srt.reasoning_parser import reasoning_tag_ids
from sglx.srt.sampling.sampling_params import SamplingParams
from sglx.srt.server_args import ServerArgs
from sglx.srt.utils import PortArgs, get_zmq_socket

logger = logging.getLogger(__name__)

CLIENT_ABORT = "aborted by the client"
DISCONNECT_POLL_S = 1.0
# Tokens per scheduler message of a batched embedding request. Sent whole, a 512-input, 1.9M-token request
# reached the scheduler only after all of it was pickled, sent and unpickled (~0.16 s of one CPU core), with
# the GPU idle meanwhile; in parts, the first batch starts after the first part (docs/benchmarks.md).
EMBED_MESSAGE_TOKENS = 65536
# Requests whose text is at least this long are tokenized off the event loop (off_loop_if_long).
OFF_LOOP_CHARS = 1 << 16
_off_loop_pool: Optional[cf.ThreadPoolExecutor] = None
T = TypeVar("T")


async def off_loop_if_long(chars: int, fn: Callable[..., T], *args: Any) -> T:
    """fn(*args), on a worker thread when it tokenizes `chars` characters or more. Tokenizing a 10 MB prompt takes
    seconds, which on the event loop stalled every other request (and /health); the fast tokenizer releases the
    GIL, so on the thread it does not. One thread: such calls never run two at once."""
    global _off_loop_pool
    if chars < OFF_LOOP_CHARS:
        return fn(*args)
    if _off_loop_pool is None:
        _off_loop_pool = cf.ThreadPoolExecutor(1, thread_name_prefix="sglx-tokenize")
    return await asyncio.get_running_loop().run_in_executor(_off_loop_pool, functools.partial(fn, *args))


def _text_chars(text: Any) -> int:
    return sum(len(t) for t in text) if isinstance(text, list) else len(text or "")


def chunk_by_tokens(reqs: List[TokenizedEmbeddingReqInput], budget: int) -> List[List[TokenizedEmbeddingReqInput]]:
    """Consecutive groups of requests, each closed once it holds `budget` tokens or more (order kept)."""
    parts: List[List[TokenizedEmbeddingReqInput]] = [[]]
    tokens = 0
    for r in reqs:
        if tokens >= budget:
            parts.append([])
            tokens = 0
        parts[-1].append(r)
        tokens += len(r.input_ids)
    return [p for p in parts if p]


class ClientDisconnected(Exception):
    """The HTTP client of a request went away and its unfinished inputs were aborted: nobody is left to answer.
    The HTTP layer ends the exchange quietly (status 499, nginx's "client closed request"), not as a failure."""


class DisconnectWatch:
    """Whether the HTTP client behind one request went away: asked of the server at most once per `period` of
    wall time, however often outputs arrive. (Asked only after a quiet `period`, as before, it was never asked
    while outputs kept coming: a dropped 1500-input embedding request, whose batches each took under a second,
    ran to its end in CI.) One watch serves every wait of a request; once gone, it stays gone."""

    def __init__(self, request: Any, period: Optional[float] = None) -> None:
        self.request = request
        self.period = DISCONNECT_POLL_S if period is None else period
        self._next = time.monotonic() + self.period
        self.gone = False

    def wait_s(self) -> Optional[float]:
        """How long a wait may last before the next check is due (None: no client to watch)."""
        return None if self.request is None else max(self._next - time.monotonic(), 0.0)

    async def client_gone(self) -> bool:
        if self.gone or self.request is None or time.monotonic() < self._next:
            return self.gone
        self._next = time.monotonic() + self.period
        self.gone = await self.request.is_disconnected()
        return self.gone


async def next_output(st: "ReqState", watch: DisconnectWatch) -> bool:
    """Wait for st's next output and consume its event; False (nothing consumed) once the client is gone."""
    while True:
        if await watch.client_gone():
            return False
        if st.event.is_set():
            st.event.clear()
            return True
        try:
            await asyncio.wait_for(st.event.wait(), timeout=watch.wait_s())
        except asyncio.TimeoutError:
            pass


@dataclass
class ReqState:
    stream: bool
    event: asyncio.Event = field(default_factory=asyncio.Event)
    text: str = ""
    output_ids: List[int] = field(default_factory=list)
    finished_reason: Optional[Dict[str, Any]] = None
    meta: Dict[str, Any] = field(default_factory=dict)
    token_logprobs: List[Any] = field(default_factory=list)
    top_logprobs: List[Any] = field(default_factory=list)
    return_logprob: bool = False
    top_n: int = 0
    # Prompt logprobs (logprob_start_len >= 0): they arrive with the first output.
    want_input_logprobs: bool = False
    input_token_logprobs: List[Any] = field(default_factory=list)
    input_top_logprobs: List[Any] = field(default_factory=list)
    # time.monotonic() for --enable-metrics (one clock across processes): the request's arrival, its first
    # token (stamped by the scheduler) and its latest output with tokens.
    created: float = field(default_factory=time.monotonic)
    first_token_time: Optional[float] = None
    last_output_time: Optional[float] = None
    # The id that /abort_request also reaches this request by: the rid it is a sample of (n > 1), the
    # OpenAI response it is a choice of.
    group: Optional[str] = None
    # Its consumer is gone and an abort was sent: the rid stays taken (its outputs dropped) until the scheduler's
    # last message for it, so that a new request reusing the rid cannot receive them.
    abandoned: bool = False

    @property
    def finished(self) -> bool:
        return self.finished_reason is not None


class TokenizerManager:
    metrics: Optional[TokenizerMetricsCollector] = None  # --enable-metrics

    def __init__(self, server_args: ServerArgs, port_args: PortArgs, scheduler_info: Dict[str, Any]) -> None:
        self.server_args = server_args
        self.served_model_name = server_args.served_model_name
        self.model_path = server_args.model_path
        self.tokenizer = get_tokenizer(server_args.tokenizer_path)
        self._thread_tokenizer: Any = None  # _worker_tokenizer's copy
        self.context_len: int = scheduler_info["context_len"]
        self.max_req_input_len: int = scheduler_info["max_req_input_len"]
        self.vocab_size: int = scheduler_info["vocab_size"]
        self.scheduler_info = scheduler_info
        # The tokens that open and close a thinking model's reasoning (None: no --reasoning-parser, or a tag that
        # is not one token): requests may then ask for a constraint that starts after it (constrain_after_reasoning).
        self.reasoning_tags = reasoning_tag_ids(self.tokenizer, server_args.reasoning_parser)
        # The scheduler knows best: an encoder (BertModel) serves embeddings even without --is-embedding.
        self.is_embedding: bool = bool(scheduler_info.get("is_embedding", server_args.is_embedding))
        self.embedding_normalized: bool = bool(scheduler_info.get("normalize", True))
        self.embedding_dim: Optional[int] = scheduler_info.get("embedding_dim")
        # sentence-transformers' do_lower_case: the text is lowercased before tokenizing, as it does.
        self.embedding_lowercase: bool = bool(scheduler_info.get("lowercase", False))
        self.zmq_ctx = zmq.asyncio.Context(2)
        self.recv_from_detokenizer = get_zmq_socket(self.zmq_ctx, zmq.PULL, port_args.tokenizer_ipc, bind=True)
        self.send_to_scheduler = get_zmq_socket(self.zmq_ctx, zmq.PUSH, port_args.scheduler_input_ipc, bind=False)
        self.rid_to_state: Dict[str, ReqState] = {}
        self.pending_control: Deque[asyncio.Future] = deque()
        self._loop_task: Optional[asyncio.Task] = None
        self._token_text_cache: Dict[int, str] = {}
        self.metrics: Optional[TokenizerMetricsCollector] = (
            TokenizerMetricsCollector(self.served_model_name) if server_args.enable_metrics else None)

    def close(self) -> None:
        """Close the sockets and terminate the zmq context now. Left to the garbage collector, a context
        whose sockets die in the same collection cycle can block forever in its __del__ (zmq_ctx_term waits
        for sockets pyzmq no longer tracks): an in-process Engine's shutdown once hung a test run that way."""
        if self.zmq_ctx.closed:
            return
        for sock in (self.recv_from_detokenizer, self.send_to_scheduler):
            sock.close(linger=0)
        self.zmq_ctx.term()

    # ------------------------------------------------------------------ background receive loop
    def _ensure_loop(self) -> None:
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.get_running_loop().create_task(self._handle_loop())

    async def _handle_loop(self) -> None:
        while True:
            msg = await self.recv_from_detokenizer.recv_pyobj()
            try:
                self._dispatch(msg)
            except Exception:  # one bad message must not stop every other request
                logger.exception("error while handling %s", type(msg).__name__)

    def _dispatch(self, msg: Any) -> None:
        if isinstance(msg, BatchStrOut):
            for i, rid in enumerate(msg.rids):
                st = self._live_state(rid, msg.finished_reasons[i] is not None)
                if st is None:
                    continue
                st.text += msg.new_texts[i]
                st.output_ids.extend(msg.new_output_ids[i])
                if self.metrics is not None and msg.new_output_ids[i]:
                    self._observe_output(st, msg, i)
                st.finished_reason = msg.finished_reasons[i]
                st.meta = {"prompt_tokens": msg.prompt_tokens[i], "completion_tokens": msg.completion_tokens[i],
                           "cached_tokens": msg.cached_tokens[i]}
                if msg.output_token_logprobs and msg.output_token_logprobs[i]:
                    st.token_logprobs.extend(msg.output_token_logprobs[i])
                if msg.output_top_logprobs and msg.output_top_logprobs[i]:
                    st.top_logprobs.extend(msg.output_top_logprobs[i])
                if msg.input_token_logprobs and msg.input_token_logprobs[i]:
                    st.input_token_logprobs.extend(msg.input_token_logprobs[i])
                if msg.input_top_logprobs and msg.input_top_logprobs[i]:
                    st.input_top_logprobs.extend(msg.input_top_logprobs[i])
                st.event.set()
        elif isinstance(msg, BatchEmbeddingOut):
            for i, rid in enumerate(msg.rids):
                st = self._live_state(rid, finished=True)
                if st is None:
                    continue
                st.meta = {"prompt_tokens": msg.prompt_tokens[i], "embedding": msg.embeddings[i]}
                st.finished_reason = msg.finished_reasons[i] or {"type": "length", "length": 0}
                st.event.set()
        elif isinstance(msg, (FlushCacheReqOutput, GetInternalStateReqOutput, ProfileReqOutput)):
            if self.pending_control:
                fut = self.pending_control.popleft()
                if not fut.done():
                    fut.set_result(msg)
        else:
            logger.error("tokenizer manager got an unknown message %r", type(msg))

    def _live_state(self, rid: str, finished: bool) -> Optional[ReqState]:
        """The state an output for `rid` goes to; None to drop it (an unknown rid, or an abandoned one, which is
        released by its last message)."""
        st = self.rid_to_state.get(rid)
        if st is not None and st.abandoned:
            if finished:
                del self.rid_to_state[rid]
            return None
        return st

    def _release(self, rid: str, st: ReqState, abort: bool) -> None:
        """A request's consumer is done with it. With `abort` the scheduler still runs it: abort it, and keep the
        rid taken until its last message comes back."""
        if abort:
            self._send_abort([rid])
        if abort and not st.finished:
            st.abandoned = True
        elif self.rid_to_state.get(rid) is st:
            del self.rid_to_state[rid]

    def _check_new_rids(self, rids: List[str]) -> None:
        if len(set(rids)) != len(rids):
            raise ValueError("duplicate request id within the request")
        taken = [r for r in rids if r in self.rid_to_state]
        if taken:
            raise ValueError(f"request id {taken[0]} is in use by a request that has not ended")

    # ------------------------------------------------------------------ generate
    def _tokenize(self, obj: GenerateReqInput) -> TokenizedGenerateReqInput:
        if obj.text is None and obj.input_ids is None:
            raise ValueError("either text or input_ids is required")
        if obj.text is not None and obj.input_ids is not None:
            raise ValueError("give either text or input_ids, not both")
        if obj.text is not None:
            if not isinstance(obj.text, str):
                raise ValueError("text must be a string or a list of strings")
            input_ids = self.tokenizer.encode(obj.text)
        else:
            ids = obj.input_ids
            if not is_int_list(ids):
                raise ValueError("input_ids must be a list of integers or a list of lists of integers")
            if not ids_in_range(ids, self.vocab_size):
                raise ValueError(f"input_ids must be in [0, {self.vocab_size})")
            input_ids = list(ids)
        if not input_ids:
            raise ValueError("the prompt is empty")
        if len(input_ids) > self.max_req_input_len:
            raise ValueError(
                f"The input ({len(input_ids)} tokens) is longer than the model's context length "
                f"({self.max_req_input_len} tokens)."
            )
        sp_dict = obj.sampling_params or {}
        if not isinstance(sp_dict, dict):
            raise ValueError("sampling_params must be an object")
        sp = SamplingParams.from_dict(sp_dict)
        sp.verify(self.vocab_size)
        if sp.constrain_after_reasoning and self.reasoning_tags is None:
            raise ValueError("constrain_after_reasoning needs a server started with --reasoning-parser whose "
                             "reasoning tags are single tokens of the tokenizer")
        sp.normalize()
        top_n = obj.top_logprobs_num or 0
        if not isinstance(top_n, int) or isinstance(top_n, bool) or not 0 <= top_n <= 20:
            raise ValueError("top_logprobs_num must be an integer in [0, 20]")
        if obj.return_logprob is not None and not isinstance(obj.return_logprob, bool):
            raise ValueError("return_logprob must be a boolean")
        start = obj.logprob_start_len if obj.logprob_start_len is not None else -1
        if not isinstance(start, int) or isinstance(start, bool) or not -1 <= start < len(input_ids):
            raise ValueError(f"logprob_start_len must be an integer in [-1, {len(input_ids) - 1}] "
                             f"(the prompt has {len(input_ids)} tokens; -1: no prompt logprobs)")
        return_logprob = bool(obj.return_logprob or top_n)
        return TokenizedGenerateReqInput(
            rid=obj.rid or new_rid(), input_text=obj.text if isinstance(obj.text, str) else None,
            input_ids=input_ids, sampling_params=sp, return_logprob=return_logprob,
            logprob_start_len=start if return_logprob else -1, top_logprobs_num=top_n, stream=obj.stream,
        )

    async def generate_request(self, obj: GenerateReqInput, request: Any = None,
                               group: Optional[str] = None) -> AsyncIterator[Any]:
        """See the contract in docs/architecture.md: single requests yield dicts with cumulative text;
        a non-streamed batch yields one list; a streamed batch yields dicts tagged with "index". `group`: an id
        that /abort_request also reaches every request of this call by (an OpenAI response's)."""
        start = time.monotonic()
        self._ensure_loop()
        if self.is_embedding:
            raise ValueError(EMBEDDING_ONLY)
        obj.validate()
        groups = [group or g for g in obj.parallel_sample_groups()]
        obj = obj.with_parallel_samples()
        watch = DisconnectWatch(request)
        chars = _text_chars(obj.text)
        if obj.is_single():
            tokenized = await off_loop_if_long(chars, self._tokenize, obj)
            async for out in self._wait_one(tokenized, obj.return_text_in_logprobs, watch, start, groups[0]):
                yield out
            return
        n = obj.batch_size()
        if n == 0:
            raise ValueError("the batch is empty")
        # validate all before sending any
        tokenized = await off_loop_if_long(chars, lambda: [self._tokenize(obj[i]) for i in range(n)])
        self._check_new_rids([t.rid for t in tokenized])
        gens = [self._wait_one(t, obj.return_text_in_logprobs, watch, start, g) for t, g in zip(tokenized, groups)]
        if not obj.stream:
            yield await _gather_or_cancel([_last(g) for g in gens])
            return
        async for out in _merge_streams(gens):
            yield out

    async def _wait_one(self, t: TokenizedGenerateReqInput, with_text: bool,
                        watch: DisconnectWatch, start: float, group: Optional[str] = None) -> AsyncIterator[Dict]:
        self._check_new_rids([t.rid])
        st = ReqState(stream=t.stream, return_logprob=t.return_logprob, top_n=t.top_logprobs_num,
                      want_input_logprobs=t.logprob_start_len >= 0, created=start, group=group)
        self.rid_to_state[t.rid] = st
        self.send_to_scheduler.send_pyobj(t)
        try:
            while True:
                if not await next_output(st, watch):
                    raise ClientDisconnected(t.rid)  # `finally` aborts the request
                if st.finished:
                    fr = st.finished_reason
                    if fr.get("type") == "abort" and fr.get("message") != CLIENT_ABORT and not st.output_ids:
                        raise ValueError(fr.get("message", "request aborted"))
                    yield self._make_output(t.rid, st, with_text)
                    return
                if st.stream:
                    yield self._make_output(t.rid, st, with_text)
        finally:
            # The consumer went away (disconnect, cancellation), or the detokenizer gave up on a request that
            # the scheduler still runs (its later outputs do not come back: the rid is free at once).
            self._release(t.rid, st, abort=not st.finished or bool(st.finished_reason.get(DETOKENIZER_ABORT)))
            self._observe_finished(st, len(t.input_ids))

    def _observe_output(self, st: ReqState, msg: BatchStrOut, i: int) -> None:
        """--enable-metrics: time to first token from the scheduler's stamp (a non-streamed request's only message
        comes at its end); the tokens after the first spread evenly over the time since the previous output."""
        now = time.monotonic()
        new_tokens = len(msg.new_output_ids[i])
        ttft = None
        if st.first_token_time is None:
            stamp = msg.first_token_times[i] if msg.first_token_times else None
            st.first_token_time = stamp if stamp is not None else now
            ttft = st.first_token_time - st.created
            new_tokens -= 1
        self.metrics.observe_output(ttft, now - (st.last_output_time or st.first_token_time), new_tokens)
        st.last_output_time = now

    def _observe_finished(self, st: ReqState, prompt_tokens: int) -> None:
        """--enable-metrics: a request leaves the manager (finished, rejected, aborted or dropped by its client)."""
        if self.metrics is None:
            return
        aborted = not st.finished or st.finished_reason.get("type") == "abort"
        self.metrics.observe_finished(time.monotonic() - st.created, st.meta.get("prompt_tokens", prompt_tokens),
                                      len(st.output_ids), st.meta.get("cached_tokens", 0), aborted)

    # ------------------------------------------------------------------ embeddings
    def _worker_tokenizer(self) -> Any:
        """The tokenizer for off_loop_if_long's thread, where that thread may use another setting than the event
        loop: a fast tokenizer keeps its truncation setting in shared state that each call sets, so one object
        used by two threads at once truncates one thread's text by the other's setting (seen: 4 in 300 calls).
        Each thread therefore gets its own object; a copy is made once, on first use."""
        if self._thread_tokenizer is None:
            self._thread_tokenizer = copy.deepcopy(self.tokenizer)
        return self._thread_tokenizer

    def _tokenize_embedding(self, text: Optional[str], ids: Optional[List[int]], rid: str,
                            truncate: bool, tokenizer: Any) -> TokenizedEmbeddingReqInput:
        limit = self.max_req_input_len
        types = None
        if text is not None:
            text = text.lower() if self.embedding_lowercase else text
            enc = tokenizer(text, truncation=truncate, max_length=limit if truncate else None)
            input_ids, types = list(enc["input_ids"]), enc.get("token_type_ids")
        else:
            if not ids_in_range(ids, self.vocab_size):
                raise ValueError(f"input_ids must be in [0, {self.vocab_size})")
            input_ids = list(ids[:limit] if truncate else ids)
        if not input_ids:
            raise ValueError("an input is empty after tokenization")
        if len(input_ids) > limit:
            raise ValueError(
                f"The input ({len(input_ids)} tokens) is longer than the model's context length ({limit} tokens); "
                "pass truncate=true to cut it."
            )
        # All zeros is the model's default: not worth carrying.
        types = list(types) if types is not None and any(types) else None
        return TokenizedEmbeddingReqInput(rid=rid, input_text=text, input_ids=input_ids, token_type_ids=types)

    async def embedding_request(self, obj: EmbeddingReqInput, request: Any = None) -> Any:
        """One dict {"embedding", "meta_info"} for a single input, a list of them for a batch. All inputs
        are validated before any is sent (a bad one rejects the request whole); then they go in messages of
        about EMBED_MESSAGE_TOKENS tokens, so the scheduler starts on the first while the rest are pickled and
        sent, and batches across them as they queue."""
        start = time.monotonic()
        self._ensure_loop()
        if not self.is_embedding:
            raise ValueError("this server serves a generation model; start it with --is-embedding for embeddings")
        obj.validate()
        items = list(obj.items())

        def tokenize_all(tokenizer: Any) -> List[TokenizedEmbeddingReqInput]:
            return [self._tokenize_embedding(t, ids, rid or new_rid(), obj.truncate, tokenizer)
                    for t, ids, rid in items]

        # A batch of long texts takes seconds to tokenize (~0.5M tokens/s): off the event loop, as for generation.
        chars = sum(len(t) for t, _, _ in items if t is not None)
        tokenizer = self._worker_tokenizer() if chars >= OFF_LOOP_CHARS else self.tokenizer  # off_loop's test
        tokenized = await off_loop_if_long(chars, tokenize_all, tokenizer)
        rids = [t.rid for t in tokenized]
        self._check_new_rids(rids)
        states = [ReqState(stream=False, created=start) for _ in tokenized]
        self.rid_to_state.update(zip(rids, states))
        for part in chunk_by_tokens(tokenized, EMBED_MESSAGE_TOKENS):
            self.send_to_scheduler.send_pyobj(BatchTokenizedEmbeddingReqInput(part))
        watch = DisconnectWatch(request)
        try:
            outs = [await self._wait_embedding(rid, st, watch) for rid, st in zip(rids, states)]
        finally:
            for rid, st, t in zip(rids, states, tokenized):
                self._release(rid, st, abort=not st.finished)
                self._observe_finished(st, len(t.input_ids))
        return outs[0] if obj.is_single() else outs

    async def _wait_embedding(self, rid: str, st: ReqState, watch: DisconnectWatch) -> Dict[str, Any]:
        while not st.finished:
            if not await next_output(st, watch):
                raise ClientDisconnected(rid)
        fr = st.finished_reason
        if fr.get("type") == "abort":
            raise ValueError(fr.get("message", "request aborted"))
        meta = {"id": rid, "finish_reason": fr, "prompt_tokens": st.meta.get("prompt_tokens", 0)}
        return {"embedding": st.meta.get("embedding"), "meta_info": meta}

    def _token_text(self, tid: int) -> str:
        s = self._token_text_cache.get(tid)
        if s is None:
            s = self._token_text_cache[tid] = self.tokenizer.decode([tid])
        return s

    def _make_output(self, rid: str, st: ReqState, with_text: bool) -> Dict[str, Any]:
        meta: Dict[str, Any] = {"id": rid, "finish_reason": st.finished_reason, **st.meta}
        if st.return_logprob:
            fmt = (lambda lp, tid: (lp, tid, self._token_text(tid) if with_text else None))
            meta["output_token_logprobs"] = [fmt(lp, tid) for lp, tid in st.token_logprobs]
            if st.top_n:
                meta["output_top_logprobs"] = [[fmt(lp, tid) for lp, tid in row] for row in st.top_logprobs]
            if st.want_input_logprobs:
                meta["input_token_logprobs"] = [fmt(lp, tid) for lp, tid in st.input_token_logprobs]
                if st.top_n:
                    meta["input_top_logprobs"] = [
                        None if row is None else [fmt(lp, tid) for lp, tid in row] for row in st.input_top_logprobs
                    ]
        return {"text": st.text, "output_ids": list(st.output_ids), "meta_info": meta}

    def abort_request(self, rid: str = "", abort_all: bool = False) -> None:
        """/abort_request: the request `rid`, and the requests whose group it is (the samples of a request with
        n > 1, the choices of an OpenAI response), or every request. Requests that have already ended are left
        alone, so are others whose rid merely starts the same way."""
        if abort_all:
            self.send_to_scheduler.send_pyobj(AbortReq(abort_all=True))
            return
        rids = [rid] + [r for r, st in self.rid_to_state.items() if st.group == rid and r != rid]
        self._send_abort(rids)

    def _send_abort(self, rids: List[str]) -> None:
        self.send_to_scheduler.send_pyobj(AbortReq(rids=rids))

    # ------------------------------------------------------------------ control
    async def _control(self, msg: Any, timeout: float = 60) -> Any:
        self._ensure_loop()
        fut = asyncio.get_running_loop().create_future()
        self.pending_control.append(fut)
        self.send_to_scheduler.send_pyobj(msg)
        return await asyncio.wait_for(fut, timeout=timeout)

    async def flush_cache(self) -> FlushCacheReqOutput:
        return await self._control(FlushCacheReqInput())

    async def get_internal_state(self) -> Dict[str, Any]:
        state = (await self._control(GetInternalStateReq())).state
        # Requests this process still tracks: running, or dropped by their client and waiting for the scheduler's
        # last message. None once everything has ended.
        return {**state, "tokenizer_reqs": len(self.rid_to_state)}

    async def profile(self, req: ProfileReq) -> ProfileReqOutput:
        """Start or stop the scheduler's torch profiler; stopping waits for the trace to be written."""
        return await self._control(req, timeout=600)

    def server_args_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self.server_args)


async def _gather_or_cancel(coros: List[Any]) -> List[Any]:
    """asyncio.gather, except that the first failure cancels the rest (whose `finally` aborts their requests)
    rather than leaving them to run to their end for a response that is already an error."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()


async def _last(gen: AsyncIterator[Any]) -> Any:
    out = None
    async for out in gen:
        pass
    return out


async def _merge_streams(gens: List[AsyncIterator[Dict]]) -> AsyncIterator[Dict]:
    """Interleave several request streams as their outputs arrive, tagging each with its index."""
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, g: AsyncIterator[Dict]) -> None:
        try:
            async for out in g:
                await queue.put({**out, "index": i})
        except Exception as e:  # surface the error to the consumer
            await queue.put(e)
        finally:
            await queue.put(done)

    tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(gens)]
    remaining = len(tasks)
    try:
        while remaining:
            item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()

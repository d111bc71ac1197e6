"""The scheduler process: receives tokenized requests, forms batches, runs the model, streams token ids out.

One loop iteration: take new messages -> pick the next batch (a prefill of waiting requests if any fit, else
one decode step of the running ones) -> run it -> append tokens, finish requests, free or cache their KV ->
send the news to the detokenizer. Decode memory that runs out retracts requests back to the waiting queue.

Overlap schedule (the default; --disable-overlap-schedule turns it off): the host's share of a step (the
scheduling, the tensors of the next batch, the result processing and streaming) would leave the GPU idle
between steps. So a decode step N+1 is formed and launched before step N's tokens reach the host: its input
ids are read on the device (ModelRunner.last_token_ids), and step N's results are processed while N+1 runs.
A request that finishes on N's token has then run one step ahead: that token is dropped, and its KV slot
(written by N+1, for N's token) goes back with the request's others. A step overlaps only when nothing it
depends on is still on the device (`can_overlap`): the previous step is a decode, no request waits (a
prefill needs the finished requests' memory and rows), no chunked prefill, no retraction. Where sampling needs
the previous tokens on the host (a grammar takes them), only the forward is queued early: the previous step is
processed while it runs, and sampling is queued after that. Penalties do not: their token counts are kept and
advanced on the device (sampling/penalty_counts.py).
Embedding steps overlap too: every request of one finishes with its prefill, so the next batch of waiting
inputs can be formed and launched while the previous one runs (its rows and KV slots are counted as held
until its results are processed).

Embedding models: requests are prefill only (no decode, no sampling); each finishes right after its prefill,
its KV is freed at once (or, on the skip-KV path, was never stored), and its pooled vector goes straight to
the tokenizer manager as a BatchEmbeddingOut.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Dict, List, Optional, Tuple

import zmq

from sglx.srt.configs.model_config import ModelConfig
from sglx.srt.constrained.base_grammar_backend import create_grammar_backend, grammar_key
from sglx.srt.hf_transformers_utils import get_eos_token_ids, get_tokenizer
from sglx.srt.managers.io_struct import (
    EMBEDDING_ONLY,
    AbortReq,
    BatchTokenizedEmbeddingReqInput,
    FlushCacheReqInput,
    FlushCacheReqOutput,
    GetInternalStateReq,
    GetInternalStateReqOutput,
    ProfileReq,
    TokenizedEmbeddingReqInput,
    TokenizedGenerateReqInput,
)
from sglx.srt.layers.pooler import PoolingType, resolve_pooling_config
from sglx.srt.managers.schedule_batch import (
    BatchContext,
    Req,
    ScheduleBatch,
    decode_tokens_needed,
    finish_abort,
)
from sglx.srt.managers.grammar_manager import GrammarManager
from sglx.srt.managers.schedule_policy import PrefillAdder, SchedulePolicy, reserved_decode_tokens
from sglx.srt.managers.scheduler_output_processor import SchedulerOutputProcessorMixin
from sglx.srt.managers.scheduler_profiler import SchedulerProfiler
from sglx.srt.mem_cache.chunk_cache import ChunkCache
from sglx.srt.mem_cache.radix_cache import RadixCache
from sglx.srt.model_executor.batch_result import BatchResult
from sglx.srt.model_executor.forward_batch import ForwardMode
from sglx.srt.model_executor.model_runner import ModelRunner
from sglx.srt.reasoning_parser import reasoning_tag_ids
from sglx.srt.sampling.sampling_batch_info import needs_output_ids
from sglx.srt.sampling.sampling_params import SamplingParams
from sglx.srt.server_args import ServerArgs
from sglx.srt.utils import PortArgs, get_zmq_socket

logger = logging.getLogger(__name__)

# Admission reserves new_token_ratio x the remaining max_new_tokens of each request for its decode. The ratio
# starts at INIT x --schedule-conservativeness (capped at 1), falls linearly to MIN_FACTOR x that over DECAY_STEPS
# decode steps, rises by 0.1 at each retraction and starts over whenever the scheduler is idle (SGLang's scheme).
INIT_NEW_TOKEN_RATIO = 0.7
MIN_NEW_TOKEN_RATIO_FACTOR = 0.14
NEW_TOKEN_RATIO_DECAY_STEPS = 600
# How long an otherwise idle step waits for a grammar to compile before it looks at the socket again.
GRAMMAR_POLL_S = 0.05


DEFAULT_MAX_PREFILL_TOKENS = 16384  # SGLang's default
SKIP_KV_MAX_PREFILL_TOKENS = 32768


def effective_max_prefill_tokens(server_args: ServerArgs, skip_kv_cache: bool, device_type: str) -> int:
    """The token budget of one prefill batch: --max-prefill-tokens as given, else 16384, except for embeddings
    on a GPU on the skip-KV path, which reserves no KV pool: there the memory goes to larger batches, 32768
    tokens, which amortize the host's per-forward launches (Qwen3-0.6B shape on an H200, one lease, items/s:
    fp8 104.79 -> 111.50, and 111.00 at 65536; bf16 92.58 -> 94.45 at 65536: docs/benchmarks.md, session 6). On the CPU
    a forward is compute-bound and launches cost nothing, so the default stays."""
    if server_args.max_prefill_tokens is not None:
        return server_args.max_prefill_tokens
    return SKIP_KV_MAX_PREFILL_TOKENS if skip_kv_cache and device_type == "cuda" else DEFAULT_MAX_PREFILL_TOKENS


def embedding_server_args(server_args: ServerArgs, model_config: ModelConfig) -> ServerArgs:
    """The effective arguments for an embedding model. A request must run in one piece when its embedding
    needs the hidden state of every token (cls / mean pooling) or when every token sees every other
    (bidirectional encoders): then neither a cached prefix nor chunked prefill can be used. Only causal
    last-token pooling keeps the radix cache and chunking (the last token sees everything before it)."""
    pooling = resolve_pooling_config(model_config.model_path, not model_config.is_encoder_only,
                                     server_args.pooling, server_args.no_normalize)
    whole = model_config.is_encoder_only or pooling.pooling != PoolingType.LAST
    if not whole or (server_args.disable_radix_cache and server_args.chunked_prefill_size == -1):
        return dataclasses.replace(server_args, is_embedding=True)
    logger.info("%s pooling of %s: the radix cache and chunked prefill are turned off",
                pooling.pooling.value, model_config.architecture)
    return dataclasses.replace(server_args, is_embedding=True, disable_radix_cache=True, chunked_prefill_size=-1)


class Scheduler(SchedulerOutputProcessorMixin):
    def __init__(self, server_args: ServerArgs, port_args: Optional[PortArgs]) -> None:
        self.server_args = server_args
        self.model_config = ModelConfig.from_path(
            server_args.model_path, dtype=server_args.dtype, context_length=server_args.context_length,
            is_embedding=server_args.is_embedding, device=server_args.device,
        )
        self.is_embedding = self.model_config.is_embedding
        if self.is_embedding:
            server_args = self.server_args = embedding_server_args(server_args, self.model_config)
        self.tokenizer = get_tokenizer(server_args.tokenizer_path)
        self.eos_token_ids = get_eos_token_ids(self.tokenizer, self.model_config.hf_config)
        self.runner = ModelRunner(self.model_config, server_args)
        self.page_size = server_args.page_size
        self.max_total_num_tokens = self.runner.max_total_num_tokens
        # A request never outgrows the pool, so one request alone can always make progress.
        self.max_req_len = min(self.model_config.context_len, self.max_total_num_tokens - self.page_size)
        # A generation prompt leaves room for one output token; an embedding input may fill the context.
        self.max_input_len = self.max_req_len if self.is_embedding else self.max_req_len - 1
        cache_cls = ChunkCache if server_args.disable_radix_cache else RadixCache
        self.tree_cache = cache_cls(self.runner.req_to_token_pool, self.runner.token_to_kv_pool_allocator, self.page_size)
        self.ctx = BatchContext(
            self.runner.req_to_token_pool, self.runner.token_to_kv_pool_allocator, self.tree_cache,
            self.page_size, self.model_config.vocab_size, self.runner.device, self.is_embedding,
            self.runner.penalty_counts,
        )
        self.policy = SchedulePolicy(server_args.schedule_policy, self.tree_cache, server_args.random_seed)
        self.max_running_requests = self.runner.max_running_requests
        self.chunked_prefill_size = server_args.chunked_prefill_size if server_args.chunked_prefill_size > 0 else None
        # The token budget of one prefill batch. A request longer than it still runs when it is the batch's
        # first (PrefillAdder admits that one alone); the budget must not grow to the context length, or a
        # batch of many long prompts overruns activation memory (a 131k-token batch OOMed an 8B model on an H100).
        self.max_prefill_tokens = effective_max_prefill_tokens(
            server_args, self.runner.skip_kv_cache, self.runner.device.type)

        self.waiting_queue: List[Req] = []
        self.running_reqs: List[Req] = []
        self.chunked_req: Optional[Req] = None
        self.init_new_token_ratio = min(INIT_NEW_TOKEN_RATIO * server_args.schedule_conservativeness, 1.0)
        self.min_new_token_ratio = self.init_new_token_ratio * MIN_NEW_TOKEN_RATIO_FACTOR
        self.new_token_ratio_decay = (self.init_new_token_ratio - self.min_new_token_ratio) / \
            NEW_TOKEN_RATIO_DECAY_STEPS
        self.new_token_ratio = self.init_new_token_ratio
        self.forward_ct = 0
        self.num_retracted = 0
        self.num_aborted = 0  # queued requests that ended aborted (a client gone or asking, or a server limit)
        # Overlap schedule: the launched step whose results are not processed yet.
        self.enable_overlap = not server_args.disable_overlap_schedule
        self.inflight: Optional[Tuple[ScheduleBatch, BatchResult]] = None
        self.profiler = SchedulerProfiler(self.runner.device)
        # Structured output: constrained requests wait here while their grammar compiles (grammar_manager.py).
        self.grammar_manager: Optional[GrammarManager] = None if self.is_embedding else GrammarManager(
            lambda: create_grammar_backend(server_args.grammar_backend, self.tokenizer, self.model_config.vocab_size,
                                           self.eos_token_ids, server_args),
            reasoning_tags=reasoning_tag_ids(self.tokenizer, server_args.reasoning_parser))

        if port_args is not None:
            ctx = zmq.Context(2)
            self.recv_from_tokenizer = get_zmq_socket(ctx, zmq.PULL, port_args.scheduler_input_ipc, bind=True)
            self.send_to_detokenizer = get_zmq_socket(ctx, zmq.PUSH, port_args.detokenizer_ipc, bind=False)
            self.send_to_tokenizer = get_zmq_socket(ctx, zmq.PUSH, port_args.tokenizer_ipc, bind=False)
            self.poller = zmq.Poller()
            self.poller.register(self.recv_from_tokenizer, zmq.POLLIN)

    # ------------------------------------------------------------------ info
    def ready_info(self) -> Dict[str, Any]:
        return {
            "max_total_num_tokens": self.max_total_num_tokens,
            "max_req_input_len": self.max_input_len,
            "context_len": self.model_config.context_len,
            "vocab_size": self.model_config.vocab_size,
            "max_running_requests": self.max_running_requests,
            # Effective settings (an encoder turns the radix cache off, ...): they override the launch args
            # in /get_server_info.
            "is_embedding": self.is_embedding,
            "disable_radix_cache": self.server_args.disable_radix_cache,
            "chunked_prefill_size": self.server_args.chunked_prefill_size,
            "skip_kv_cache": self.runner.skip_kv_cache,
            "max_prefill_tokens": self.max_prefill_tokens,
            "prefill_attention_backend": self.server_args.prefill_attention_backend,
            "decode_attention_backend": self.server_args.decode_attention_backend,
            "cuda_graph": self.runner.cuda_graph_runner is not None,
            **self.embedding_info(),
        }

    def embedding_info(self) -> Dict[str, Any]:
        pooler = self.runner.pooler
        if pooler is None:
            return {}
        st = self.model_config.st_tokenizer
        return {"pooling": pooler.config.pooling.value, "normalize": pooler.config.normalize,
                "embedding_dim": self.model_config.hidden_size, "lowercase": bool(st and st.do_lower_case)}

    def internal_state(self) -> Dict[str, Any]:
        alloc = self.runner.token_to_kv_pool_allocator
        free, evictable = alloc.available_size(), self.tree_cache.evictable_size()
        protected = self.tree_cache.protected_size()
        idle = self.is_idle()
        return {
            "max_total_num_tokens": self.max_total_num_tokens,
            "available_kv_tokens": free,
            "evictable_kv_tokens": evictable,
            "protected_kv_tokens": protected,
            "num_running_reqs": len(self.running_reqs),
            "num_waiting_reqs": len(self.waiting_queue),
            "num_retracted_reqs": self.num_retracted,
            "num_grammar_queue_reqs": self.grammar_manager.pending if self.grammar_manager else 0,
            "num_aborted_reqs": self.num_aborted,
            "is_idle": idle,
            # The invariant: idle => every KV slot is free or held (unlocked) by the prefix cache.
            "kv_leak_free": (not idle) or (free + evictable == self.max_total_num_tokens and protected == 0),
            "page_size": self.page_size,
            "new_token_ratio": self.new_token_ratio,
            # Skip-KV path: the slots above are a batch-token budget only; the pool itself holds 0 bytes.
            "skip_kv_cache": self.runner.skip_kv_cache,
            "kv_pool_bytes": self.runner.token_to_kv_pool.mem_usage_bytes(),
            # Penalized requests' device count rows held by unfinished requests (0 when idle).
            "penalty_rows_live": self.runner.penalty_counts.live_rows,
        }

    def is_idle(self) -> bool:
        """Nothing waits (for memory or a grammar), runs or is in flight (an overlapped step's results not
        processed yet)."""
        return self.nothing_to_run() and not (self.grammar_manager and self.grammar_manager.pending)

    def nothing_to_run(self) -> bool:
        return (not self.running_reqs and not self.waiting_queue and self.chunked_req is None
                and self.inflight is None)

    # ------------------------------------------------------------------ loop
    def event_loop(self) -> None:
        while True:
            self.recv_requests(block=self.is_idle())
            if self.step():
                self.profiler.step()
            elif self.is_idle():
                self.on_idle()

    def on_idle(self) -> None:
        """Nothing to do: check for leaks, and let the next admission start from the initial ratio again."""
        self.check_memory()
        self.new_token_ratio = self.init_new_token_ratio

    def step(self) -> bool:
        """One scheduling step: run (or, overlapped, launch) the next batch. False if nothing happened."""
        polled = self.poll_grammar_queue()
        if not self.enable_overlap:
            batch = self.next_batch()
            if batch is not None:
                self.run_batch(batch)
            return batch is not None or polled
        prev, progressed = self.inflight, polled
        if prev is not None and not self.can_overlap(prev[0]):
            self.inflight = None
            self.process_batch_result(*prev)
            prev, progressed = None, True
        batch = self.next_batch()  # (sees self.inflight: its rows are still held)
        launched = None
        if batch is not None and prev is not None and self.sampling_needs_host_tokens(batch):
            # A grammar takes the previous step's tokens: queue this step's forward, process the previous step
            # while it runs, then sample with every token on the host.
            before, prev, progressed = prev, None, True
            launched = (batch, self.launch_batch(batch, before_sampling=lambda: self.process_batch_result(*before)))
        elif batch is not None:  # every request of an overlapped decode batch has one token on the device
            inflight_tokens = 1 if prev is not None and not self.is_embedding else 0
            launched = (batch, self.launch_batch(batch, inflight_tokens))
        self.inflight = launched
        if prev is not None:  # while `batch` runs
            self.process_batch_result(*prev)
        return batch is not None or prev is not None or progressed

    def poll_grammar_queue(self) -> bool:
        """Queue the requests whose grammar is compiled; answer those whose constraint failed to compile (a
        400). With nothing else to do, wait a little for the oldest compile rather than spin. True if any
        request left the grammar queue."""
        gm = self.grammar_manager
        if gm is None or not gm.pending:
            return False
        ready, failed = gm.take_ready(timeout=GRAMMAR_POLL_S if self.nothing_to_run() else 0.0)
        self.waiting_queue.extend(ready)
        if failed:
            self.stream_output(failed)
        return bool(ready or failed)

    def next_batch(self) -> Optional[ScheduleBatch]:
        with self.profiler.annotate("sglx::get_next_batch"):
            return self.get_next_batch_to_run()

    def can_overlap(self, prev: ScheduleBatch) -> bool:
        """Whether the next step can be formed before `prev`'s results are processed. Embeddings: unless a
        chunked input continues (its next chunk needs this one cached). Generation: the next step is then a
        decode of exactly `prev`'s requests, and nothing it needs from the host depends on those results."""
        if self.is_embedding:
            return self.chunked_req is None
        if not prev.forward_mode.is_decode() or self.waiting_queue or self.chunked_req is not None:
            return False
        # No retraction: the running requests' next KV slots are free or evictable.
        return decode_tokens_needed(self.running_reqs, self.page_size) <= self.ctx.available_tokens()

    @staticmethod
    def sampling_needs_host_tokens(batch: ScheduleBatch) -> bool:
        return any(needs_output_ids(r) for r in batch.reqs)

    def recv_requests(self, block: bool) -> None:
        """Take the messages waiting on the socket (blocking for one when idle). After a batched embedding
        message, stop early once the queue holds two prefill batches of input: a large request arrives as many
        messages, and unpickling them all first kept the GPU idle (~0.2 s before a 512-input request's first
        forward on an H100). The rest is taken one input message per step while the GPU runs; other messages
        (aborts, control) never stop the draining, so an abort queued behind k input messages waits k steps."""
        timeout = None if block else 0
        while True:
            events = dict(self.poller.poll(timeout))
            if self.recv_from_tokenizer not in events:
                return
            with self.profiler.annotate("sglx::recv"):  # (not around process_input: it may stop the profiler)
                msg = self.recv_from_tokenizer.recv_pyobj()
            self.process_input(msg)
            timeout = 0
            if isinstance(msg, BatchTokenizedEmbeddingReqInput) and \
                    self.queued_input_tokens() >= 2 * self.max_prefill_tokens:
                return  # (only after input: the aborts of a dropped request, one per input, come in a burst)

    def queued_input_tokens(self) -> int:
        return sum(len(r.origin_input_ids) for r in self.waiting_queue)

    def process_input(self, msg: Any) -> None:
        if isinstance(msg, TokenizedGenerateReqInput):
            self.handle_generate_request(msg)
        elif isinstance(msg, BatchTokenizedEmbeddingReqInput):
            for m in msg.reqs:
                self.handle_embedding_request(m)
        elif isinstance(msg, TokenizedEmbeddingReqInput):
            self.handle_embedding_request(msg)
        elif isinstance(msg, AbortReq):
            self.abort_request(msg)
        elif isinstance(msg, FlushCacheReqInput):
            self.send_to_tokenizer.send_pyobj(self.flush_cache())
        elif isinstance(msg, GetInternalStateReq):
            self.send_to_tokenizer.send_pyobj(GetInternalStateReqOutput(self.internal_state()))
        elif isinstance(msg, ProfileReq):
            self.send_to_tokenizer.send_pyobj(self.profiler.handle(msg))
        else:
            logger.error("scheduler got an unknown message %r", type(msg))

    def handle_generate_request(self, m: TokenizedGenerateReqInput) -> None:
        sp = m.sampling_params
        req = Req(m.rid, m.input_text, list(m.input_ids), sp, self.eos_token_ids, m.return_logprob,
                  m.top_logprobs_num, m.stream, max_seq_len=self.max_req_len, logprob_start_len=m.logprob_start_len)
        if self.is_embedding:
            req.finished_reason = finish_abort(EMBEDDING_ONLY)
        elif not req.origin_input_ids:
            req.finished_reason = finish_abort("the prompt is empty")
        elif len(req.origin_input_ids) >= self.max_req_len:
            req.finished_reason = finish_abort(
                f"the prompt has {len(req.origin_input_ids)} tokens; the limit is {self.max_req_len - 1}"
            )
        if req.finished():
            self.stream_output([req])
            return
        if sp.max_new_tokens is None or sp.max_new_tokens > self.max_req_len - len(req.origin_input_ids):
            # Leave room for the whole generation inside the context and the pool.
            sp.max_new_tokens = min(
                sp.max_new_tokens if sp.max_new_tokens is not None else 1 << 30,
                self.max_req_len - len(req.origin_input_ids),
            )
        key = grammar_key(sp)
        if key is not None:
            self.grammar_manager.submit(req, key)  # queued once its grammar is compiled (poll_grammar_queue)
            return
        self.waiting_queue.append(req)

    def handle_embedding_request(self, m: TokenizedEmbeddingReqInput) -> None:
        req = Req(m.rid, m.input_text, list(m.input_ids), SamplingParams(max_new_tokens=0), set(),
                  max_seq_len=self.max_req_len)
        req.token_type_ids = list(m.token_type_ids) if m.token_type_ids is not None else None
        if not self.is_embedding:
            req.finished_reason = finish_abort("this server serves a generation model; start it with --is-embedding")
        elif not req.origin_input_ids:
            req.finished_reason = finish_abort("the input is empty")
        elif len(req.origin_input_ids) > self.max_input_len:
            req.finished_reason = finish_abort(
                f"the input has {len(req.origin_input_ids)} tokens; the limit is {self.max_input_len}"
            )
        if req.finished():
            self.stream_embedding_output([req])
            return
        self.waiting_queue.append(req)

    def abort_request(self, m: AbortReq) -> None:
        if self.grammar_manager is not None:
            gone = self.grammar_manager.abort(m.matches)
            self.num_aborted += len(gone)
            if gone:
                self.stream_output(gone)
        for r in list(self.waiting_queue):
            if m.matches(r.rid):
                self.waiting_queue.remove(r)
                if r.req_pool_idx is not None:  # a retracted request holds nothing; be safe anyway
                    self.tree_cache.cache_finished_req(r, r.kv_token_ids())
                r.finished_reason = finish_abort("aborted by the client")
                self.num_aborted += 1
                self.stream_output([r])
        for r in self.running_reqs + ([self.chunked_req] if self.chunked_req else []):
            if m.matches(r.rid):
                r.to_abort = "aborted by the client"

    def flush_cache(self) -> FlushCacheReqOutput:
        if not self.is_idle():
            return FlushCacheReqOutput(False, "cache not flushed: requests are running or waiting")
        self.tree_cache.reset()
        self.runner.req_to_token_pool.clear()
        self.runner.token_to_kv_pool_allocator.clear()
        return FlushCacheReqOutput(True, "cache flushed")

    def check_memory(self) -> None:
        state = self.internal_state()
        if not state["kv_leak_free"]:
            logger.error("KV leak while idle: %s", state)
        if state["penalty_rows_live"]:
            logger.error("penalty count rows held while idle: %s", state)

    # ------------------------------------------------------------------ batching
    def get_next_batch_to_run(self) -> Optional[ScheduleBatch]:
        batch = self.get_new_batch_prefill()
        if batch is not None:
            return batch
        if not self.running_reqs:
            return None
        return self.prepare_decode_batch()

    def get_new_batch_prefill(self) -> Optional[ScheduleBatch]:
        if not self.waiting_queue and self.chunked_req is None:
            return None
        # An overlapped embedding batch still holds its rows until its results are processed.
        running = len(self.running_reqs) + (len(self.inflight[0].reqs) if self.inflight is not None else 0)
        if running >= self.max_running_requests and self.chunked_req is None:
            return None
        self.policy.sort(self.waiting_queue)
        reserved = sum(reserved_decode_tokens(r, self.new_token_ratio) for r in self.running_reqs)
        adder = PrefillAdder(
            self.tree_cache,
            rem_total_tokens=self.ctx.available_tokens() - reserved,
            rem_input_tokens=self.max_prefill_tokens,
            rem_chunk_tokens=self.chunked_prefill_size,
            rem_running_slots=self.max_running_requests - running,
            page_size=self.page_size,
            new_token_ratio=self.new_token_ratio,
            has_running=bool(self.running_reqs),
        )
        chunked = self.chunked_req
        if chunked is not None:
            self.chunked_req.init_next_round_input(self.tree_cache)
            adder.rem_running_slots += 1  # it is not counted among the running requests
            adder.add_one_req(self.chunked_req)
            if not adder.can_run:
                return None  # it goes first; wait until memory frees up
        matched = self.policy.policy == "lpm"
        for req in self.waiting_queue:
            if not matched:
                req.init_next_round_input(self.tree_cache)
            if not adder.add_one_req(req):
                break
        if not adder.can_run:
            return None
        admitted = set(id(r) for r in adder.can_run)
        self.waiting_queue = [r for r in self.waiting_queue if id(r) not in admitted]
        self.chunked_req = adder.new_chunked_req
        batch = ScheduleBatch(adder.can_run, ForwardMode.EXTEND, self.ctx)
        for r in batch.reqs:
            if r.num_prefills == 0:  # later chunks and resumes hit their own KV: not a cache hit for the user
                r.cached_tokens = len(r.prefix_indices)
            r.num_prefills += 1
        batch.prepare_for_extend()
        return batch

    def prepare_decode_batch(self) -> ScheduleBatch:
        batch = ScheduleBatch(list(self.running_reqs), ForwardMode.DECODE, self.ctx)
        while batch.decode_tokens_needed() > self.ctx.available_tokens():
            if len(batch.reqs) > 1:
                self.retract_one(batch)
            elif self.chunked_req is not None:
                self.retract_chunked_req()
            else:
                break
        self.new_token_ratio = max(self.new_token_ratio - self.new_token_ratio_decay, self.min_new_token_ratio)
        batch.prepare_for_decode()
        return batch

    def retract_one(self, batch: ScheduleBatch) -> None:
        """Give a running request's KV back (to the prefix cache, where it is evictable) and queue it again;
        it resumes later by re-prefilling its prompt plus what it generated so far."""
        victim = min(batch.reqs, key=lambda r: (len(r.output_ids), -len(r.origin_input_ids)))
        batch.reqs.remove(victim)
        self.running_reqs = list(batch.reqs)
        self.tree_cache.cache_finished_req(victim, victim.kv_token_ids())
        victim.reset_for_retract()
        self.waiting_queue.insert(0, victim)
        self.num_retracted += 1
        self.new_token_ratio = min(1.0, self.new_token_ratio + 0.1)
        logger.info("retracted %s (KV pool full); %d still running", victim.rid, len(batch.reqs))

    def retract_chunked_req(self) -> None:
        """A half-prefilled request holds locked KV that a lone decoding request may need: release it (its
        chunks stay in the prefix cache, evictable) and start it over later."""
        req, self.chunked_req = self.chunked_req, None
        self.tree_cache.cache_finished_req(req, req.kv_token_ids())
        req.reset_for_retract()
        self.waiting_queue.insert(0, req)
        self.num_retracted += 1

    # ------------------------------------------------------------------ running
    def run_batch(self, batch: ScheduleBatch) -> None:
        """Run one batch to the end: launch it, wait for its results, process them."""
        self.process_batch_result(batch, self.launch_batch(batch))

    def launch_batch(self, batch: ScheduleBatch, inflight_tokens: int = 0,
                     before_sampling: Optional[Callable[[], None]] = None) -> BatchResult:
        """Queue the batch's forward (and sampling) on the device; returns without waiting for them. With
        `before_sampling`, the forward is queued first, then that runs (the previous step's results are
        processed), then the sampling info is built from the requests' host state and sampling is queued."""
        with self.profiler.annotate("sglx::launch_batch"):
            mwb = batch.get_model_worker_batch(inflight_tokens, with_sampling_info=before_sampling is None)
            if self.is_embedding:
                result = self.runner.forward_batch_embedding_async(mwb)
            elif before_sampling is None:
                result = self.runner.forward_batch_generation(mwb)
            else:
                logits = self.runner.forward(mwb)
        if before_sampling is not None:
            before_sampling()
            with self.profiler.annotate("sglx::launch_batch"):
                mwb.sampling_info = batch.sampling_info()
                result = self.runner.sample(mwb, logits)
        self.forward_ct += 1
        return result



def run_scheduler_process(server_args: ServerArgs, port_args: PortArgs, pipe_writer: Any) -> None:
    from sglx.srt.utils import configure_logger, set_parent_death_signal

    set_parent_death_signal()
    configure_logger(server_args, prefix="scheduler")
    try:
        scheduler = Scheduler(server_args, port_args)
        pipe_writer.send({"status": "ready", **scheduler.ready_info()})
    except Exception as e:  # report start-up failures to the launcher instead of dying silently
        logger.exception("scheduler failed to start")
        pipe_writer.send({"status": "error", "error": f"{type(e).__name__}: {e}"})
        raise SystemExit(1)
    try:
        scheduler.event_loop()
    except Exception:
        logger.exception("scheduler crashed")
        raise SystemExit(1)

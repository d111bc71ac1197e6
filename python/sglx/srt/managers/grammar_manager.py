"""Compiles the grammars of constrained requests off the scheduler's thread (SGLang's grammar queue).

A request with a `json_schema`, `regex` or `ebnf` constraint waits here, not in the waiting queue, until its
grammar is compiled: compiling a large schema can take far longer than a decode step, and the scheduler must
not stall the running batch for it. Compiled grammars (and failures) are cached by spec, so a schema that
every request repeats compiles once. The backend itself is built on first use, on the worker thread.
"""

from __future__ import annotations

import concurrent.futures as cf
from collections import OrderedDict
from typing import Callable, List, Optional, Tuple

from sglx.srt.constrained.base_grammar_backend import (
    BaseGrammarBackend,
    BaseGrammarObject,
    GrammarError,
    GrammarKey,
    allocate_vocab_mask,
)
from sglx.srt.constrained.reasoner_grammar import ReasonerGrammarObject
from sglx.srt.managers.schedule_batch import Req, finish_abort
from sglx.srt.reasoning_parser import prompt_opens_reasoning

CACHE_SIZE = 1024  # distinct specs kept compiled


class GrammarManager:
    def __init__(self, make_backend: Callable[[], Optional[BaseGrammarBackend]],
                 reasoning_tags: Optional[Tuple[Optional[int], int]] = None) -> None:
        """`make_backend`: builds the backend (None: structured output is off, every constraint is refused).
        `reasoning_tags`: the (start, end) tokens of a reasoning model's thinking (reasoning_tag_ids), after
        which the grammar of a request with `constrain_after_reasoning` starts to hold."""
        self._make_backend = make_backend
        self.reasoning_tags = reasoning_tags
        self._backend: Optional[BaseGrammarBackend] = None
        self._pool = cf.ThreadPoolExecutor(1, thread_name_prefix="sglx-grammar")
        self._cache: "OrderedDict[GrammarKey, cf.Future]" = OrderedDict()
        self.queue: List[Tuple[Req, cf.Future]] = []

    @property
    def pending(self) -> int:
        return len(self.queue)

    def submit(self, req: Req, key: GrammarKey) -> None:
        fut = self._cache.get(key)
        if fut is None:
            fut = self._pool.submit(self._compile, key)
            self._cache[key] = fut
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(key)
        self.queue.append((req, fut))

    def _compile(self, key: GrammarKey) -> BaseGrammarObject:
        if self._backend is None:
            self._backend = self._make_backend()
            if self._backend is None:
                raise GrammarError("structured output is off on this server (--grammar-backend none)")
        grammar = self._backend.compile(key)
        mask = allocate_vocab_mask(1, self._backend.vocab_size)
        grammar.copy().fill_vocab_mask(mask, 0)
        if not mask.any():  # e.g. `root ::= root`: it compiles, but no output can ever match it
            raise GrammarError(f"the {key[0]} constraint matches no output: not even its first token is allowed")
        return grammar

    def take_ready(self, timeout: float = 0.0) -> Tuple[List[Req], List[Req]]:
        """Requests whose grammar is compiled (each with its own `req.grammar`) and requests whose constraint
        failed to compile (finished, aborted with the reason), in arrival order. With a timeout, wait that
        long for the oldest grammar first."""
        if timeout > 0 and self.queue:
            cf.wait([self.queue[0][1]], timeout=timeout)
        ready, failed, still = [], [], []
        for req, fut in self.queue:
            if not fut.done():
                still.append((req, fut))
                continue
            err = fut.exception()
            if err is None:
                req.grammar = self._request_grammar(req, fut.result())
                ready.append(req)
            else:
                msg = str(err) if isinstance(err, GrammarError) else f"grammar compilation failed: {err!r}"
                req.finished_reason = finish_abort(msg, 400 if isinstance(err, GrammarError) else 500)
                failed.append(req)
        self.queue = still
        return ready, failed

    def _request_grammar(self, req: Req, compiled: BaseGrammarObject) -> BaseGrammarObject:
        grammar = compiled.copy()
        if req.sampling_params.constrain_after_reasoning and self.reasoning_tags is not None:
            start, end = self.reasoning_tags
            opened = prompt_opens_reasoning(req.origin_input_ids, self.reasoning_tags)
            if opened is False:  # the prompt closed the reasoning: the output is all answer
                return grammar
            return ReasonerGrammarObject(grammar, end, None if opened else start)
        return grammar

    def abort(self, matches: Callable[[str], bool]) -> List[Req]:
        """Take the requests whose rid `matches` (AbortReq.matches) out of the queue, finished as aborted by the
        client."""
        gone = [req for req, _ in self.queue if matches(req.rid)]
        self.queue = [(req, fut) for req, fut in self.queue if not matches(req.rid)]
        for req in gone:
            req.finished_reason = finish_abort("aborted by the client")
        return gone


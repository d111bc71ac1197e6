"""Which waiting requests go into the next prefill batch, and how much of each."""

from __future__ import annotations

import random
from typing import List, Optional

from sglx.srt.managers.schedule_batch import Req
from sglx.srt.mem_cache.base_prefix_cache import BasePrefixCache

# Future decode tokens reserved per running request are capped so that one request with a huge
# max_new_tokens does not block admission; retraction covers the rare overflow.
CLIP_MAX_NEW_TOKENS = 4096


class SchedulePolicy:
    def __init__(self, policy: str, tree_cache: BasePrefixCache, seed: int = 0) -> None:
        self.policy = policy
        self.tree_cache = tree_cache
        self.rng = random.Random(seed)

    def sort(self, waiting: List[Req]) -> None:
        """Order the waiting queue in place. Only lpm needs every request's prefix match to sort; the other
        policies match a request when the PrefillAdder considers it (a long queue costs nothing per step)."""
        if self.policy == "lpm":
            for r in waiting:
                r.init_next_round_input(self.tree_cache)
            # Longest cached prefix first: requests sharing a hot prefix run together while it is cached.
            waiting.sort(key=lambda r: -len(r.prefix_indices))
        elif self.policy == "lof":
            waiting.sort(key=lambda r: -(r.sampling_params.max_new_tokens or 0))
        elif self.policy == "random":
            self.rng.shuffle(waiting)
        # fcfs: arrival order (a retracted request was put back at the front)


def reserved_decode_tokens(req: Req, new_token_ratio: float) -> int:
    max_new = req.sampling_params.max_new_tokens
    remaining = (max_new if max_new is not None else CLIP_MAX_NEW_TOKENS) - len(req.output_ids)
    return int(max(min(remaining, CLIP_MAX_NEW_TOKENS), 0) * new_token_ratio)


class PrefillAdder:
    """Admits requests while three budgets last: KV tokens (free + evictable, minus what running requests
    will still need), tokens per prefill batch, and the chunk size of chunked prefill."""

    def __init__(
        self,
        tree_cache: BasePrefixCache,
        rem_total_tokens: int,
        rem_input_tokens: int,
        rem_chunk_tokens: Optional[int],
        rem_running_slots: int,
        page_size: int,
        new_token_ratio: float,
        has_running: bool = False,
    ) -> None:
        self.has_running = has_running
        self.tree_cache = tree_cache
        self.rem_total_tokens = rem_total_tokens
        self.rem_input_tokens = rem_input_tokens
        self.rem_chunk_tokens = rem_chunk_tokens
        self.rem_running_slots = rem_running_slots
        self.page_size = page_size
        self.new_token_ratio = new_token_ratio
        self.can_run: List[Req] = []
        self.new_chunked_req: Optional[Req] = None

    def _page_up(self, n: int) -> int:
        return -(-n // self.page_size) * self.page_size

    def add_one_req(self, req: Req) -> bool:
        """Try to admit `req`; returns False when the batch is full (stop scanning the queue)."""
        if self.rem_running_slots <= 0 or self.new_chunked_req is not None:
            return False
        # A continuing chunked prefill already holds its lock from the previous chunk.
        lock = not req.is_chunked
        ext = req.extend_input_len
        # A page per request of slack: a continued partial page or a fresh one.
        ext_need = self._page_up(ext) + self.page_size
        need_total = ext_need + reserved_decode_tokens(req, self.new_token_ratio)
        # With nothing running and nothing admitted, only the prefill itself must fit: waiting for the
        # reservation would wait forever, and retraction covers decode growth.
        alone = not self.can_run and not self.has_running
        # Locking turns the matched prefix from evictable into protected, so it stops counting as memory:
        # lock first, then check what is left, and undo the lock if the request does not fit.
        locked = 0
        if lock and req.last_node is not None:
            before = self.tree_cache.evictable_size()
            self.tree_cache.inc_lock_ref(req.last_node)
            locked = before - self.tree_cache.evictable_size()
        budget = self.rem_total_tokens - locked
        chunk = self.rem_chunk_tokens is not None and ext > self.rem_chunk_tokens
        if chunk:
            ext = self.rem_chunk_tokens // self.page_size * self.page_size
            need = self._page_up(ext) + self.page_size
        else:
            need = ext_need if alone else need_total
        if ext <= 0 or need > budget or (not chunk and ext > self.rem_input_tokens and self.can_run):
            if lock and req.last_node is not None:
                self.tree_cache.dec_lock_ref(req.last_node)
            return False
        if chunk:
            # Page aligned, so the tree can cache the chunk and the next one continues from it.
            req.extend_input_len = ext
            req.fill_ids = req.fill_ids[: len(req.prefix_indices) + ext]
            req.is_chunked = True
            self.new_chunked_req = req
        self._admit(req, ext, locked + (need if chunk else need_total))
        return not chunk

    def _admit(self, req: Req, ext: int, used_tokens: int) -> None:
        self.can_run.append(req)
        self.rem_total_tokens -= used_tokens
        self.rem_input_tokens -= ext
        if self.rem_chunk_tokens is not None:
            self.rem_chunk_tokens -= ext
        self.rem_running_slots -= 1

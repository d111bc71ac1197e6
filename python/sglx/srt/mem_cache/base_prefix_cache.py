"""The interface between the scheduler and a prefix cache (RadixCache, or ChunkCache when disabled)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, List

import torch


@dataclass
class MatchResult:
    device_indices: torch.Tensor  # int64 KV slots of the matched prefix, on the pool's device
    last_node: Any  # the tree node where the match ends; lock it while the request runs


class BasePrefixCache(ABC):
    """Contract the scheduler relies on.

    Ownership of KV slots: a slot is either free (in the allocator), owned by the cache (in the tree),
    or owned by a running request (allocated for it and not yet in the tree). Tree slots a running
    request uses are *locked* through `inc_lock_ref(req.last_node)`; locked slots are never evicted.

      * `match_prefix(key)`: longest cached prefix of `key`, truncated to a multiple of page_size;
        bumps the LRU time of the matched path. Nothing is locked.
      * `insert(key, value)`: add `key` -> `value` (slots); returns how many leading tokens were already
        present. The tree keeps its own slots for those; the caller frees its duplicates.
      * `cache_finished_req(req, token_ids)`: the request is done. `token_ids` are its tokens whose KV is
        written, at `req_to_token[req.req_pool_idx, :len(token_ids)]`. Its page-aligned part moves into the
        tree; duplicates and the unaligned tail go back to the allocator; the lock on `req.last_node` is
        dropped; the request's ReqToTokenPool row is freed.
      * `cache_unfinished_req(req, token_ids)`: after a prefill chunk. Same insert, then the request keeps
        running with `req.prefix_indices` = slots of all `token_ids` (tree part + its own unaligned tail),
        `req.last_node` = the new (locked) node, and its req_to_token row pointing at the tree's slots.
      * `evict(num_tokens)`: free at least num_tokens slots (if possible) from unlocked leaves, LRU first.
      * `evictable_size() + protected_size() == total_size()`; protected = locked.
      * `reset()`: forget everything WITHOUT freeing slots: the caller clears the allocator and the
        ReqToTokenPool at the same time (flush_cache when idle).

    Invariant when idle: allocator.available_size() + evictable_size() == allocator.size and
    protected_size() == 0.
    """

    @abstractmethod
    def match_prefix(self, key: List[int]) -> MatchResult: ...

    @abstractmethod
    def insert(self, key: List[int], value: torch.Tensor) -> int: ...

    @abstractmethod
    def cache_finished_req(self, req: Any, token_ids: List[int]) -> None: ...

    @abstractmethod
    def cache_unfinished_req(self, req: Any, token_ids: List[int]) -> None: ...

    @abstractmethod
    def inc_lock_ref(self, node: Any) -> int: ...

    @abstractmethod
    def dec_lock_ref(self, node: Any) -> int: ...

    @abstractmethod
    def evict(self, num_tokens: int) -> None: ...

    @abstractmethod
    def evictable_size(self) -> int: ...

    @abstractmethod
    def protected_size(self) -> int: ...

    def total_size(self) -> int:
        return self.evictable_size() + self.protected_size()

    @abstractmethod
    def reset(self) -> None: ...

    @abstractmethod
    def pretty_print(self) -> str: ...

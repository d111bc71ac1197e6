"""Prefix cache used with --disable-radix-cache: caches nothing, only frees.

Chunked prefill still works: after a chunk, the request's own slots become its `prefix_indices`
so the next chunk continues after them.
"""

from __future__ import annotations

from typing import Any, List

import torch

from sglx.srt.mem_cache.base_prefix_cache import BasePrefixCache, MatchResult


class ChunkCache(BasePrefixCache):
    def __init__(self, req_to_token_pool: Any, token_to_kv_pool_allocator: Any, page_size: int):
        self.req_to_token_pool = req_to_token_pool
        self.allocator = token_to_kv_pool_allocator
        self.page_size = page_size
        self.device = token_to_kv_pool_allocator.device

    def _empty(self) -> torch.Tensor:
        return torch.empty(0, dtype=torch.int64, device=self.device)

    def match_prefix(self, key: List[int]) -> MatchResult:
        return MatchResult(device_indices=self._empty(), last_node=None)

    def insert(self, key: List[int], value: torch.Tensor) -> int:
        return 0

    def _req_slots(self, req: Any, n: int) -> torch.Tensor:
        return self.req_to_token_pool.req_to_token[req.req_pool_idx, :n].to(torch.int64)

    def cache_finished_req(self, req: Any, token_ids: List[int]) -> None:
        self.allocator.free(self._req_slots(req, len(token_ids)))
        self.req_to_token_pool.free(req.req_pool_idx)

    def cache_unfinished_req(self, req: Any, token_ids: List[int]) -> None:
        req.prefix_indices = self._req_slots(req, len(token_ids))

    def inc_lock_ref(self, node: Any) -> int:
        return 0

    def dec_lock_ref(self, node: Any) -> int:
        return 0

    def evict(self, num_tokens: int) -> None:
        return None

    def evictable_size(self) -> int:
        return 0

    def protected_size(self) -> int:
        return 0

    def reset(self) -> None:
        return None

    def pretty_print(self) -> str:
        return "ChunkCache (radix cache disabled: nothing cached)"

"""Radix tree over token ids, in page units, mapping prefixes to KV slots.

Every edge holds a key (token ids, a multiple of page_size long) and the int64 slots of those tokens.
A node's children are keyed by the first page of their key (an int for page_size 1, else a tuple), so
two children never share a first page. Lock counts mark nodes used by running requests; a lock on a
node covers the whole path to the root. evictable/protected sizes are kept incrementally.
"""

from __future__ import annotations

import heapq
import itertools
from typing import Any, Hashable, List, Optional

import torch

from sglx.srt.mem_cache.base_prefix_cache import BasePrefixCache, MatchResult


class TreeNode:
    __slots__ = ("id", "key", "value", "parent", "children", "lock_ref", "last_access_time")

    def __init__(self, node_id: int, key: List[int], value: Optional[torch.Tensor], parent: Optional["TreeNode"]):
        self.id = node_id
        self.key = key
        self.value = value
        self.parent = parent
        self.children: dict = {}
        self.lock_ref = 0
        self.last_access_time = 0

    def __repr__(self) -> str:
        return f"TreeNode(id={self.id}, len={len(self.key)}, lock={self.lock_ref})"


class RadixCache(BasePrefixCache):
    def __init__(self, req_to_token_pool: Any, token_to_kv_pool_allocator: Any, page_size: int):
        self.req_to_token_pool = req_to_token_pool
        self.allocator = token_to_kv_pool_allocator
        self.page_size = page_size
        self.device = token_to_kv_pool_allocator.device
        self.reset()

    # ------------------------------------------------------------------ bookkeeping
    def reset(self) -> None:
        # A logical clock, not wall time: strictly increasing, so LRU order is exact and deterministic.
        self._clock = itertools.count(1)
        self._ids = itertools.count(0)
        self.root = TreeNode(next(self._ids), [], torch.empty(0, dtype=torch.int64, device=self.device), None)
        self._evictable = 0
        self._protected = 0

    def evictable_size(self) -> int:
        return self._evictable

    def protected_size(self) -> int:
        return self._protected

    def _child_key(self, key: List[int], off: int = 0) -> Hashable:
        if self.page_size == 1:
            return key[off]
        return tuple(key[off : off + self.page_size])

    def _match_len(self, node_key: List[int], key: List[int], off: int) -> int:
        """Common prefix length of node_key and key[off:], rounded down to whole pages."""
        n = min(len(node_key), len(key) - off)
        if node_key[:n] == key[off : off + n]:  # fast path: the whole edge matches (C-speed compare)
            return n // self.page_size * self.page_size
        ps = self.page_size
        i = 0
        while i + ps <= n and node_key[i : i + ps] == key[off + i : off + i + ps]:
            i += ps
        return i

    def _split(self, child: TreeNode, n: int) -> TreeNode:
        """Cut child's edge after n tokens; returns the new upper node (same lock, same sizes)."""
        parent = child.parent
        upper = TreeNode(next(self._ids), child.key[:n], child.value[:n], parent)
        upper.lock_ref = child.lock_ref
        upper.last_access_time = child.last_access_time
        child.key = child.key[n:]
        child.value = child.value[n:]
        child.parent = upper
        upper.children[self._child_key(child.key)] = child
        parent.children[self._child_key(upper.key)] = upper
        return upper

    # ------------------------------------------------------------------ match / insert
    def match_prefix(self, key: List[int]) -> MatchResult:
        key_len = len(key) // self.page_size * self.page_size
        key = list(key[:key_len])  # a tuple would never compare equal to the stored lists
        now = next(self._clock)
        node = self.root
        node.last_access_time = now
        values: List[torch.Tensor] = []
        off = 0
        while off < key_len:
            child = node.children.get(self._child_key(key, off))
            if child is None:
                break
            child.last_access_time = now
            n = self._match_len(child.key, key, off)
            if n < len(child.key):
                node = self._split(child, n)
                values.append(node.value)
                break
            values.append(child.value)
            node = child
            off += n
        if values:
            indices = torch.cat(values)
        else:
            indices = torch.empty(0, dtype=torch.int64, device=self.device)
        return MatchResult(device_indices=indices, last_node=node)

    def insert(self, key: List[int], value: torch.Tensor) -> int:
        key_len = len(key) // self.page_size * self.page_size
        key = list(key[:key_len])
        now = next(self._clock)
        node = self.root
        node.last_access_time = now
        off = 0
        while off < key_len:
            ck = self._child_key(key, off)
            child = node.children.get(ck)
            if child is None:
                leaf = TreeNode(next(self._ids), key[off:], value[off:key_len].to(torch.int64).clone(), node)
                leaf.last_access_time = now
                node.children[ck] = leaf
                self._evictable += len(leaf.key)
                break
            child.last_access_time = now
            n = self._match_len(child.key, key, off)
            if n < len(child.key):
                child = self._split(child, n)
            node = child
            off += n
        # Everything walked before a new leaf (or all of key) was already present.
        return off

    # ------------------------------------------------------------------ requests
    def _req_slots(self, req: Any, n: int) -> torch.Tensor:
        return self.req_to_token_pool.req_to_token[req.req_pool_idx, :n].to(torch.int64)

    def _insert_and_free_dups(self, req: Any, token_ids: List[int], kv_indices: torch.Tensor) -> int:
        """Insert the aligned part; free the request's own pages the tree already had. Returns aligned len."""
        ps = self.page_size
        aligned = len(token_ids) // ps * ps
        present = self.insert(token_ids[:aligned], kv_indices[:aligned])
        # Below the (aligned) cached prefix the request's slots ARE the tree's slots: keep them.
        # From there up to `present`, another request inserted the same tokens first: ours are duplicates.
        prefix_len = 0 if req.prefix_indices is None else len(req.prefix_indices)
        own_start = prefix_len // ps * ps
        if present > own_start:
            self.allocator.free(kv_indices[own_start:present])
        return aligned

    def cache_finished_req(self, req: Any, token_ids: List[int]) -> None:
        kv_indices = self._req_slots(req, len(token_ids))
        self.allocator.free_group_begin()
        aligned = self._insert_and_free_dups(req, token_ids, kv_indices)
        if aligned < len(token_ids):
            self.allocator.free(kv_indices[aligned:])  # unaligned tail: its page is the request's alone
        self.allocator.free_group_end()
        self.dec_lock_ref(req.last_node)
        self.req_to_token_pool.free(req.req_pool_idx)

    def cache_unfinished_req(self, req: Any, token_ids: List[int]) -> None:
        kv_indices = self._req_slots(req, len(token_ids))
        aligned = self._insert_and_free_dups(req, token_ids, kv_indices)
        match = self.match_prefix(token_ids[:aligned])
        new_indices = match.device_indices
        assert new_indices.numel() == aligned, "tree lost a just-inserted prefix (was it evicted?)"
        # The row must point at the tree's slots where ours were duplicates and got freed.
        self.req_to_token_pool.write(req.req_pool_idx, 0, new_indices)
        self.inc_lock_ref(match.last_node)  # lock the new node before unlocking the old: no eviction gap
        self.dec_lock_ref(req.last_node)
        req.prefix_indices = torch.cat((new_indices, kv_indices[aligned:]))
        req.last_node = match.last_node

    # ------------------------------------------------------------------ locks / eviction
    def inc_lock_ref(self, node: Optional[TreeNode]) -> int:
        """Lock node and its ancestors; returns how many tokens moved from evictable to protected."""
        moved = 0
        while node is not None and node is not self.root:
            if node.lock_ref == 0:
                moved += len(node.key)
            node.lock_ref += 1
            node = node.parent
        self._evictable -= moved
        self._protected += moved
        return moved

    def dec_lock_ref(self, node: Optional[TreeNode]) -> int:
        """Unlock node and its ancestors; returns how many tokens moved from protected to evictable."""
        moved = 0
        while node is not None and node is not self.root:
            if node.lock_ref <= 0:
                raise RuntimeError(f"dec_lock_ref on unlocked {node}")
            node.lock_ref -= 1
            if node.lock_ref == 0:
                moved += len(node.key)
            node = node.parent
        self._evictable += moved
        self._protected -= moved
        return moved

    def _nodes(self) -> List[TreeNode]:
        out, stack = [], [self.root]
        while stack:
            node = stack.pop()
            out.append(node)
            stack.extend(node.children.values())
        return out

    def evict(self, num_tokens: int) -> None:
        heap = [
            (n.last_access_time, n.id, n)
            for n in self._nodes()
            if n is not self.root and not n.children and n.lock_ref == 0
        ]
        heapq.heapify(heap)
        evicted = 0
        self.allocator.free_group_begin()
        while evicted < num_tokens and heap:
            _, _, node = heapq.heappop(heap)
            self.allocator.free(node.value)
            evicted += len(node.key)
            self._evictable -= len(node.key)
            parent = node.parent
            del parent.children[self._child_key(node.key)]
            node.parent = None
            if parent is not self.root and not parent.children and parent.lock_ref == 0:
                heapq.heappush(heap, (parent.last_access_time, parent.id, parent))
        self.allocator.free_group_end()

    # ------------------------------------------------------------------ debugging
    def all_values(self) -> torch.Tensor:
        """Every slot the tree owns (for leak checks)."""
        vals = [n.value for n in self._nodes() if n is not self.root]
        return torch.cat(vals) if vals else torch.empty(0, dtype=torch.int64, device=self.device)

    def pretty_print(self) -> str:
        lines: List[str] = []

        def walk(node: TreeNode, depth: int) -> None:
            for child in node.children.values():
                head = child.key[:8]
                more = "..." if len(child.key) > 8 else ""
                lines.append(
                    f"{'  ' * depth}{head}{more} len={len(child.key)} lock={child.lock_ref} t={child.last_access_time}"
                )
                walk(child, depth + 1)

        walk(self.root, 0)
        lines.append(f"#tokens: {self.total_size()} evictable={self._evictable} protected={self._protected}")
        return "\n".join(lines)

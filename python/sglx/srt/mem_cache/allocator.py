"""Token-slot allocators for the KV pool.

Free lists are int64 tensors on the pool's device, so alloc/free are tensor slices and concatenations
(no host round trip per token). Slot 0 (page_size == 1) or page 0 (page_size > 1) is the padding
page of the KV pool and is never handed out.

Both allocators offer the same extend/decode API so the scheduler need not care about the page size:
  alloc_extend(prefix_lens, seq_lens, last_locs, extend_num_tokens) -> slots for the new tokens
  alloc_decode(seq_lens, last_locs) -> one slot per request
(last_locs: the KV slot of each request's newest token, a list or a device tensor; the page-1 allocator
ignores it.) Neither waits for the device: sizes come from the host lists.
  free(indices), available_size(), clear(), free_group_begin()/free_group_end()
"""

from __future__ import annotations

from typing import List, Optional, Union

import torch

LastLocs = Union[List[int], torch.Tensor]


class _FreeListBase:
    """Free list of units (slots or pages) numbered from 1, plus batched frees."""

    def __init__(self, num_units: int, device: str):
        self.num_units = num_units
        self.device = device
        self._group_depth = 0
        self._group: List[torch.Tensor] = []
        self.clear()

    def clear(self) -> None:
        self.free_units = torch.arange(1, self.num_units + 1, dtype=torch.int64, device=self.device)
        self._group = []
        self._group_depth = 0

    def _take(self, n: int) -> Optional[torch.Tensor]:
        if n > self.free_units.numel():
            return None
        out = self.free_units[:n]
        self.free_units = self.free_units[n:]
        return out

    def _release(self, units: torch.Tensor) -> None:
        if units.numel() == 0:
            return
        if self._group_depth > 0:
            self._group.append(units)
        else:
            self.free_units = torch.cat((self.free_units, units))

    def free_group_begin(self) -> None:
        """Batch the frees until free_group_end (one concatenation instead of one per request)."""
        self._group_depth += 1

    def free_group_end(self) -> None:
        self._group_depth -= 1
        if self._group_depth == 0 and self._group:
            self.free_units = torch.cat([self.free_units] + self._group)
            self._group = []


class TokenToKVPoolAllocator(_FreeListBase):
    """page_size == 1: one slot per token, slots [1, size]."""

    def __init__(self, size: int, device: str, page_size: int = 1):
        if page_size != 1:
            raise ValueError("TokenToKVPoolAllocator is for page_size == 1; use PagedTokenToKVPoolAllocator")
        self.size = size
        self.page_size = 1
        super().__init__(size, device)

    def available_size(self) -> int:
        return self.free_units.numel()

    def alloc(self, need_size: int) -> Optional[torch.Tensor]:
        return self._take(need_size)

    def alloc_extend(
        self,
        prefix_lens: List[int],
        seq_lens: List[int],
        last_locs: List[int],
        extend_num_tokens: int,
    ) -> Optional[torch.Tensor]:
        # With one-token pages there is no partial page to continue: any free slots do.
        return self._take(extend_num_tokens)

    def alloc_decode(self, seq_lens: List[int], last_locs: Optional[LastLocs]) -> Optional[torch.Tensor]:
        return self._take(len(seq_lens))

    def free(self, indices: torch.Tensor) -> None:
        self._release(indices.to(torch.int64))


def _on_device(vals: Union[List[int], torch.Tensor], device: str) -> torch.Tensor:
    """int64 on the pool's device without waiting for it (host lists go over as a non-blocking copy)."""
    if isinstance(vals, torch.Tensor):
        return vals.to(device=device, dtype=torch.int64)
    return torch.tensor(vals, dtype=torch.int64).to(device, non_blocking=True)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


class PagedTokenToKVPoolAllocator(_FreeListBase):
    """page_size > 1: pages [1, size // page_size]; token slot = page * page_size + offset.

    A request's tokens fill its pages in order, so the slot of position p is in the request's
    page p // page_size at offset p % page_size. alloc_extend/alloc_decode rely on that: a request whose
    last page is partly filled continues in it (last_loc + 1, ...) before taking fresh pages.
    """

    def __init__(self, size: int, page_size: int, device: str):
        if page_size < 1 or size % page_size != 0:
            raise ValueError(f"size ({size}) must be a positive multiple of page_size ({page_size})")
        self.size = size
        self.page_size = page_size
        super().__init__(size // page_size, device)

    def available_size(self) -> int:
        return self.free_units.numel() * self.page_size

    def _pages_to_slots(self, pages: torch.Tensor) -> torch.Tensor:
        offs = torch.arange(self.page_size, dtype=torch.int64, device=self.device)
        return (pages[:, None] * self.page_size + offs[None, :]).reshape(-1)

    def alloc(self, need_size: int) -> Optional[torch.Tensor]:
        if need_size % self.page_size != 0:
            raise ValueError(f"alloc({need_size}): need a multiple of page_size {self.page_size}")
        pages = self._take(need_size // self.page_size)
        return None if pages is None else self._pages_to_slots(pages)

    def alloc_extend(
        self,
        prefix_lens: List[int],
        seq_lens: List[int],
        last_locs: List[int],
        extend_num_tokens: int,
    ) -> Optional[torch.Tensor]:
        ps = self.page_size
        # Page counts from the host lists: no device sync to decide whether we fit.
        new_pages_per_req = [_ceil_div(s, ps) - _ceil_div(p, ps) for p, s in zip(prefix_lens, seq_lens)]
        total_pages = sum(new_pages_per_req)
        if total_pages > self.free_units.numel():
            return None
        pages = self._take(total_pages)
        assert pages is not None
        if extend_num_tokens == 0:
            return torch.empty(0, dtype=torch.int64, device=self.device)

        dev = self.device
        prefix, seq, last, n_pages = (_on_device(x, dev) for x in (prefix_lens, seq_lens, last_locs, new_pages_per_req))
        ext = seq - prefix
        # Per token: which request, and its absolute position.
        req = torch.repeat_interleave(torch.arange(len(seq_lens), device=dev), ext, output_size=extend_num_tokens)
        start_of_req = torch.cumsum(ext, 0) - ext
        pos = prefix[req] + torch.arange(extend_num_tokens, dtype=torch.int64, device=dev) - start_of_req[req]

        # Tokens before the first page boundary at/after the prefix continue the partial last page.
        boundary = (prefix + ps - 1) // ps * ps
        in_partial = pos < boundary[req]
        partial_slot = last[req] + 1 + (pos - prefix[req])
        # Later tokens go to this request's fresh pages, handed out in request order.
        first_page_of_req = torch.cumsum(n_pages, 0) - n_pages
        page_idx = first_page_of_req[req] + (pos - boundary[req]).clamp(min=0) // ps
        page_idx = page_idx.clamp(max=max(total_pages - 1, 0))  # only read where in_partial is False
        fresh_slot = (pages[page_idx] * ps + pos % ps) if total_pages > 0 else partial_slot
        return torch.where(in_partial, partial_slot, fresh_slot)

    def alloc_decode(self, seq_lens: List[int], last_locs: LastLocs) -> Optional[torch.Tensor]:
        prefix_lens = [s - 1 for s in seq_lens]
        return self.alloc_extend(prefix_lens, seq_lens, last_locs, len(seq_lens))

    def free(self, indices: torch.Tensor) -> None:
        """`indices`: a request's slots in position order, from a page boundary on (every caller frees whole
        pages, the last one possibly partly filled), so each page is named by its first slot. This avoids
        torch.unique, which waits for the device (and would stall the overlap schedule); on the CPU the
        contract is checked against it."""
        if indices.numel() == 0:
            return
        pages = indices[:: self.page_size].to(torch.int64) // self.page_size
        if not indices.is_cuda:
            unique = torch.unique(indices.to(torch.int64) // self.page_size)
            if not torch.equal(torch.sort(pages).values, unique):
                raise ValueError("PagedTokenToKVPoolAllocator.free: slots do not start at a page boundary")
        self._release(pages)


def make_token_allocator(
    size: int, page_size: int, device: str
) -> Union[TokenToKVPoolAllocator, PagedTokenToKVPoolAllocator]:
    if page_size == 1:
        return TokenToKVPoolAllocator(size, device)
    return PagedTokenToKVPoolAllocator(size, page_size, device)

"""Device memory pools: request -> token-slot map, and the KV cache itself.

Two levels of indirection, as in SGLang:
  * `ReqToTokenPool.req_to_token[req_pool_idx, pos]` is the KV slot of token `pos` of a running request.
  * A `KVCache` stores, per layer, the keys and values of every slot.
Slots are handed out by the allocators in `allocator.py`; the pools here only hold the memory.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import List, Optional, Tuple

import torch

# FP8 kv dtypes: stored as uint8 because index_put_ (buffer[loc] = x) is not implemented for float8 on
# every device/torch version, while uint8 works everywhere; the bytes are identical.
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


class ReqToTokenPool:
    """Maps (request slot, token position) to a KV slot.

    Row 0 is reserved: CUDA-graph padding requests point at it, so it is never handed out.
    """

    def __init__(self, size: int, max_context_len: int, device: str):
        self.size = size
        self.max_context_len = max_context_len
        self.device = device
        self.req_to_token = torch.zeros((size + 1, max_context_len), dtype=torch.int32, device=device)
        self.clear()

    def alloc(self) -> Optional[int]:
        if not self._free:
            return None
        idx = self._free.pop()
        self._free_set.discard(idx)
        return idx

    def free(self, idx: int) -> None:
        # A double free would hand one row to two requests later: fail loudly instead.
        if idx <= 0 or idx > self.size or idx in self._free_set:
            raise ValueError(f"ReqToTokenPool.free: bad or double free of row {idx}")
        self._free.append(idx)
        self._free_set.add(idx)

    def available_size(self) -> int:
        return len(self._free)

    def clear(self) -> None:
        # Popped from the end, so rows come out in ascending order (stable, easy to debug).
        self._free: List[int] = list(range(self.size, 0, -1))
        self._free_set = set(self._free)

    def write(self, idx: int, start: int, values: torch.Tensor) -> None:
        n = values.numel()
        self.req_to_token[idx, start : start + n] = values


class KVCache(ABC):
    """Per-layer key/value storage indexed by token slot.

    Contract:
      * `size` usable slots, numbered [page_size, size + page_size); the first page [0, page_size) is
        padding: padded tokens (CUDA-graph batches, dummy writes) write to slot 0 and nobody reads it.
      * `dtype` is the logical kv dtype callers see; buffers may be stored in another dtype
        (`store_dtype`, e.g. uint8 for FP8) and are viewed back on get.
      * `set_kv_buffer(layer, loc, k, v)` writes k[i], v[i] to slot loc[i] (loc int64 on `device`),
        casting from the model's dtype to `dtype`.
      * `get_*_buffer(layer)` returns the whole layer buffer (slot-major) in `dtype`, no copy.
    """

    size: int
    page_size: int
    dtype: torch.dtype
    device: str

    @abstractmethod
    def get_key_buffer(self, layer_id: int) -> torch.Tensor: ...

    @abstractmethod
    def get_value_buffer(self, layer_id: int) -> torch.Tensor: ...

    def get_kv_buffer(self, layer_id: int) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.get_key_buffer(layer_id), self.get_value_buffer(layer_id)

    @abstractmethod
    def set_kv_buffer(
        self, layer_id: int, loc: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor
    ) -> None: ...

    @abstractmethod
    def mem_usage_bytes(self) -> int: ...


class MHATokenToKVPool(KVCache):
    """K and V per layer, [size + page_size, head_num, head_dim] each (MHA and GQA alike)."""

    def __init__(
        self,
        size: int,
        page_size: int,
        dtype: torch.dtype,
        head_num: int,
        head_dim: int,
        layer_num: int,
        device: str,
        v_head_dim: Optional[int] = None,
    ):
        self.size = size
        self.page_size = page_size
        self.dtype = dtype
        self.store_dtype = torch.uint8 if dtype in FP8_DTYPES else dtype
        self.head_num = head_num
        self.head_dim = head_dim
        self.v_head_dim = head_dim if v_head_dim is None else v_head_dim
        self.layer_num = layer_num
        self.device = device
        rows = size + page_size
        self.k_buffer: List[torch.Tensor] = [
            torch.zeros((rows, head_num, head_dim), dtype=self.store_dtype, device=device)
            for _ in range(layer_num)
        ]
        self.v_buffer: List[torch.Tensor] = [
            torch.zeros((rows, head_num, self.v_head_dim), dtype=self.store_dtype, device=device)
            for _ in range(layer_num)
        ]

    @staticmethod
    def cell_size_bytes(
        head_num: int, head_dim: int, layer_num: int, dtype: torch.dtype, v_head_dim: Optional[int] = None
    ) -> int:
        """Bytes one token slot costs across all layers (for sizing the pool from free memory)."""
        v_dim = head_dim if v_head_dim is None else v_head_dim
        elem = torch.empty((), dtype=dtype).element_size()
        return layer_num * head_num * (head_dim + v_dim) * elem

    def _view(self, buf: torch.Tensor) -> torch.Tensor:
        return buf.view(self.dtype) if self.store_dtype != self.dtype else buf

    def get_key_buffer(self, layer_id: int) -> torch.Tensor:
        return self._view(self.k_buffer[layer_id])

    def get_value_buffer(self, layer_id: int) -> torch.Tensor:
        return self._view(self.v_buffer[layer_id])

    def _to_store(self, x: torch.Tensor, scale: Optional[float]) -> torch.Tensor:
        if x.dtype != self.dtype:
            if scale is not None:
                # FP8 with a per-tensor scale: store x / scale so the range fits; readers multiply back.
                x = x / scale
            x = x.to(self.dtype)
        if self.store_dtype != self.dtype:
            x = x.view(self.store_dtype)
        return x

    def set_kv_buffer(
        self,
        layer_id: int,
        loc: torch.Tensor,
        cache_k: torch.Tensor,
        cache_v: torch.Tensor,
        k_scale: Optional[float] = None,
        v_scale: Optional[float] = None,
    ) -> None:
        self.k_buffer[layer_id][loc] = self._to_store(cache_k, k_scale)
        self.v_buffer[layer_id][loc] = self._to_store(cache_v, v_scale)

    def mem_usage_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.k_buffer + self.v_buffer)


class NoOpKVPool(KVCache):
    """For prefill-only (embedding) serving: reserves nothing; writes are dropped, reads are a bug."""

    def __init__(
        self, size: int = 0, page_size: int = 1, dtype: torch.dtype = torch.float16, device: str = "cpu"
    ):
        self.size = size
        self.page_size = page_size
        self.dtype = dtype
        self.store_dtype = dtype
        self.device = device

    def get_key_buffer(self, layer_id: int) -> torch.Tensor:
        raise RuntimeError("NoOpKVPool holds no KV: nothing may read it (embedding models only)")

    def get_value_buffer(self, layer_id: int) -> torch.Tensor:
        raise RuntimeError("NoOpKVPool holds no KV: nothing may read it (embedding models only)")

    def set_kv_buffer(
        self,
        layer_id: int,
        loc: torch.Tensor,
        cache_k: torch.Tensor,
        cache_v: torch.Tensor,
        k_scale: Optional[float] = None,
        v_scale: Optional[float] = None,
    ) -> None:
        return None

    def mem_usage_bytes(self) -> int:
        return 0


def profile_max_num_tokens(cell_size_bytes: int, available_bytes: int) -> int:
    """How many token slots fit in `available_bytes` (never negative)."""
    if cell_size_bytes <= 0:
        raise ValueError("cell_size_bytes must be positive")
    return max(0, int(available_bytes) // int(cell_size_bytes))

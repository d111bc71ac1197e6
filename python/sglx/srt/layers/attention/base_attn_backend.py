"""The attention backend contract."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from sglx.srt.layers.radix_attention import RadixAttention
    from sglx.srt.model_executor.forward_batch import ForwardBatch


class AttentionBackend(ABC):
    """Computes attention for one layer of one batch.

    Contract:
    - `init_forward_metadata(fb)` is called once per forward, before any layer runs; per-batch index work
      (page tables, cumulative lengths, plans) belongs there, not in `forward`.
    - `forward(q, k, v, layer, fb, out=..., save_kv_cache=...)`: q is [num_tokens, heads * head_dim], k/v are
      [num_tokens, kv_heads * head_dim] for the new tokens (or None when the caller already stored them). When
      `save_kv_cache`, the backend stores k/v at `fb.out_cache_loc` in the layer's KV pool. The result is written
      into `out` ([num_tokens, heads * v_head_dim], allocated by the caller) and `out` is returned: a backend must
      never allocate its own result and copy it into `out` afterwards.
    - CUDA-graph hooks (`init_cuda_graph_state`, `init_forward_metadata_capture_cuda_graph`,
      `init_forward_metadata_replay_cuda_graph`) are optional; a backend without them runs eagerly only.
    """

    @abstractmethod
    def init_forward_metadata(self, fb: "ForwardBatch") -> None: ...

    @abstractmethod
    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layer: "RadixAttention",
        fb: "ForwardBatch",
        *,
        out: torch.Tensor,
        save_kv_cache: bool = True,
    ) -> torch.Tensor: ...

    supports_cuda_graph: bool = False


class HybridAttnBackend(AttentionBackend):
    """Routes extend batches to one backend and decode batches to another (--prefill/--decode-attention-backend)."""

    def __init__(self, prefill: AttentionBackend, decode: AttentionBackend) -> None:
        self.prefill = prefill
        self.decode = decode

    def _pick(self, fb: "ForwardBatch") -> AttentionBackend:
        return self.decode if fb.forward_mode.is_decode() else self.prefill

    def init_forward_metadata(self, fb: "ForwardBatch") -> None:
        self._pick(fb).init_forward_metadata(fb)

    def forward(self, q, k, v, layer, fb, *, out, save_kv_cache=True):
        return self._pick(fb).forward(q, k, v, layer, fb, out=out, save_kv_cache=save_kv_cache)

    # CUDA graphs capture decode batches only, so the hooks go to the decode backend.
    @property
    def supports_cuda_graph(self) -> bool:  # type: ignore[override]
        return self.decode.supports_cuda_graph

    def init_cuda_graph_state(self, max_bs: int, max_num_tokens: int = 0) -> None:
        self.decode.init_cuda_graph_state(max_bs, max_num_tokens)

    def init_forward_metadata_capture_cuda_graph(self, *args, **kwargs) -> None:
        self.decode.init_forward_metadata_capture_cuda_graph(*args, **kwargs)

    def init_forward_metadata_replay_cuda_graph(self, *args, **kwargs) -> None:
        self.decode.init_forward_metadata_replay_cuda_graph(*args, **kwargs)

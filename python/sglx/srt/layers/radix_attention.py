"""RadixAttention: the attention layer every model calls; the backend does the work."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch
from torch import nn

if TYPE_CHECKING:
    from sglx.srt.model_executor.forward_batch import ForwardBatch


class RadixAttention(nn.Module):
    # Test-only: make the backend write into a scratch tensor that is then copied into the layer's output,
    # i.e. the one device-to-device copy per layer that `out=` removes (the profiler test's contrast case).
    force_output_copy: bool = False

    def __init__(
        self,
        num_heads: int,
        head_dim: int,
        scaling: float,
        num_kv_heads: int,
        layer_id: int,
        logit_cap: float = 0.0,
        v_head_dim: Optional[int] = None,
        sliding_window_size: int = -1,
        is_causal: bool = True,
    ) -> None:
        super().__init__()
        self.tp_q_head_num = num_heads
        self.tp_k_head_num = num_kv_heads
        self.tp_v_head_num = num_kv_heads
        self.head_dim = head_dim
        self.qk_head_dim = head_dim
        self.v_head_dim = v_head_dim or head_dim
        self.scaling = scaling
        self.layer_id = layer_id
        self.logit_cap = logit_cap
        self.sliding_window_size = sliding_window_size
        self.is_causal = is_causal

    def forward(
        self,
        q: torch.Tensor,
        k: Optional[torch.Tensor],
        v: Optional[torch.Tensor],
        forward_batch: "ForwardBatch",
        save_kv_cache: bool = True,
    ) -> torch.Tensor:
        # The output is allocated here, once, and the backend writes into it (no copy afterwards).
        out = q.new_empty(q.shape[0], self.tp_q_head_num * self.v_head_dim)
        if self.force_output_copy:
            scratch = forward_batch.attn_backend.forward(
                q, k, v, self, forward_batch, out=torch.empty_like(out), save_kv_cache=save_kv_cache
            )
            return out.copy_(scratch)
        return forward_batch.attn_backend.forward(
            q, k, v, self, forward_batch, out=out, save_kv_cache=save_kv_cache
        )

"""Reference attention on plain torch ops (SDPA); runs on CPU and CUDA.

Extend batches loop over requests (each attends to its cached prefix plus its own new tokens, causally);
decode batches gather every request's KV into one padded tensor and run a single masked SDPA call.
With `fb.skip_kv_cache` (prefill-only embedding serving) extend batches attend over the batch's raw k/v,
request by request, and never touch the KV pool (it is a NoOpKVPool then).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch
import torch.nn.functional as F

from sglx.srt.layers.attention.base_attn_backend import AttentionBackend
from sglx.srt.layers.attention.registry import register_attention_backend

if TYPE_CHECKING:
    from sglx.srt.layers.radix_attention import RadixAttention
    from sglx.srt.model_executor.forward_batch import ForwardBatch


def attention_mask(q_pos: torch.Tensor, kv_len: int, causal: bool, window: int) -> Optional[torch.Tensor]:
    """Boolean mask [len(q_pos), kv_len], True where a query at absolute position q_pos may see a key."""
    if not causal and window <= 0:
        return None
    k_pos = torch.arange(kv_len, device=q_pos.device)
    mask = torch.ones(q_pos.shape[0], kv_len, dtype=torch.bool, device=q_pos.device)
    if causal:
        mask &= k_pos[None, :] <= q_pos[:, None]
    if window > 0:
        mask &= k_pos[None, :] > q_pos[:, None] - window
    return mask


def sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor], scale: float, logit_cap: float
) -> torch.Tensor:
    """q [B, H, Lq, D], k/v [B, Hkv, Lk, D]; mask broadcastable to [B, H, Lq, Lk] (True = keep)."""
    if logit_cap <= 0:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale
    scores = logit_cap * torch.tanh(scores / logit_cap)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(-1) @ v.float()).to(q.dtype)


DECODE_LEN_BUCKET = 256


class TorchNativeAttnBackend(AttentionBackend):
    # Implements the raw-K/V extend path of ForwardBatch.skip_kv_cache (see model_runner.decide_skip_kv_cache).
    supports_skip_kv_cache = True

    def __init__(self, runner) -> None:
        self.device = runner.device

    def init_forward_metadata(self, fb: "ForwardBatch") -> None:
        pass  # everything is derived per call; this backend is the reference, not the fast path

    def forward(self, q, k, v, layer: "RadixAttention", fb: "ForwardBatch", *, out, save_kv_cache=True):
        if fb.skip_kv_cache:
            return self._extend_raw(q, k, v, layer, fb, out)
        if save_kv_cache and k is not None:
            fb.token_to_kv_pool.set_kv_buffer(
                layer.layer_id,
                fb.out_cache_loc,
                k.view(-1, layer.tp_k_head_num, layer.qk_head_dim),
                v.view(-1, layer.tp_v_head_num, layer.v_head_dim),
            )
        if fb.forward_mode.is_decode():
            return self._decode(q, layer, fb, out)
        return self._extend(q, layer, fb, out)

    def _kv(self, layer: "RadixAttention", fb: "ForwardBatch"):
        k_buf, v_buf = fb.token_to_kv_pool.get_kv_buffer(layer.layer_id)
        return k_buf, v_buf

    def _extend(self, q, layer, fb, out):
        k_buf, v_buf = self._kv(layer, fb)
        q3 = q.view(-1, layer.tp_q_head_num, layer.qk_head_dim)
        o3 = out.view(-1, layer.tp_q_head_num, layer.v_head_dim)
        req_to_token = fb.req_to_token_pool.req_to_token
        start = 0
        for i in range(fb.batch_size):
            prefix, ext = fb.extend_prefix_lens_cpu[i], fb.extend_seq_lens_cpu[i]
            seq = prefix + ext
            idx = req_to_token[fb.req_pool_indices[i], :seq].long()
            qi = q3[start : start + ext].transpose(0, 1).unsqueeze(0)
            ki = k_buf[idx].transpose(0, 1).unsqueeze(0).to(q.dtype)
            vi = v_buf[idx].transpose(0, 1).unsqueeze(0).to(q.dtype)
            q_pos = torch.arange(prefix, seq, device=q.device)
            mask = attention_mask(q_pos, seq, layer.is_causal, layer.sliding_window_size)
            res = sdpa(qi, ki, vi, mask, layer.scaling, layer.logit_cap)
            o3[start : start + ext] = res.squeeze(0).transpose(0, 1)
            start += ext
        return out

    def _extend_raw(self, q, k, v, layer, fb, out):
        """Varlen attention on the new tokens' own k/v: request i's queries and keys are the same rows
        [start_i, start_i + len_i) (no prefix exists on this path); causal or not as the layer says."""
        q3 = q.view(-1, layer.tp_q_head_num, layer.qk_head_dim)
        k3 = k.view(-1, layer.tp_k_head_num, layer.qk_head_dim)
        v3 = v.view(-1, layer.tp_v_head_num, layer.v_head_dim)
        o3 = out.view(-1, layer.tp_q_head_num, layer.v_head_dim)
        start = 0
        for n in fb.extend_seq_lens_cpu:
            rows = slice(start, start + n)
            qi, ki, vi = (x[rows].transpose(0, 1).unsqueeze(0) for x in (q3, k3, v3))
            mask = attention_mask(torch.arange(n, device=q.device), n, layer.is_causal, layer.sliding_window_size)
            o3[rows] = sdpa(qi, ki, vi, mask, layer.scaling, layer.logit_cap).squeeze(0).transpose(0, 1)
            start += n
        return out

    def _decode(self, q, layer, fb, out):
        k_buf, v_buf = self._kv(layer, fb)
        bs, max_len = fb.batch_size, max(fb.seq_lens_cpu)
        if q.is_cuda:
            # cuDNN's SDPA plans per shape: a new length each step cost ~40 ms on an H200. Bucketing the padded
            # length reuses plans; the mask hides the padding (see docs/benchmarks.md).
            max_len = min(-(-max_len // DECODE_LEN_BUCKET) * DECODE_LEN_BUCKET,
                          fb.req_to_token_pool.req_to_token.shape[1])
        idx = fb.req_to_token_pool.req_to_token[fb.req_pool_indices, :max_len].long()  # [bs, L]
        k = k_buf[idx].transpose(1, 2).to(q.dtype)  # [bs, Hkv, L, D]
        v = v_buf[idx].transpose(1, 2).to(q.dtype)
        qb = q.view(bs, layer.tp_q_head_num, 1, layer.qk_head_dim)
        k_pos = torch.arange(max_len, device=q.device)
        mask = k_pos[None, :] < fb.seq_lens[:, None]
        if layer.sliding_window_size > 0:
            mask &= k_pos[None, :] >= fb.seq_lens[:, None] - layer.sliding_window_size
        res = sdpa(qb, k, v, mask[:, None, None, :], layer.scaling, layer.logit_cap)
        out.view(bs, layer.tp_q_head_num, layer.v_head_dim).copy_(res.squeeze(2))
        return out


@register_attention_backend("torch_native")
def _create(runner) -> AttentionBackend:
    return TorchNativeAttnBackend(runner)

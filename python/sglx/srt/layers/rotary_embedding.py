"""Rotary position embeddings with a precomputed cos/sin cache indexed by position.

On CUDA the rotation runs as one fused Triton kernel, in place (see layernorm.fused_ops for the switch); the
torch code below is the CPU path and the reference. `qk_norm_rope` is Qwen3's per-head q/k RMSNorm followed by
the rotation: one fused in-place kernel on CUDA, the two layers one after the other elsewhere.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Optional, Tuple

import torch
from torch import nn

from sglx.srt.layers.layernorm import RMSNorm, fused_ops


def rope_config(hf_config: Any) -> Tuple[float, Optional[Dict[str, Any]]]:
    """(rope_theta, scaling dict or None) from either the transformers-5 `rope_parameters` or the older
    `rope_theta` + `rope_scaling` attributes."""
    params = getattr(hf_config, "rope_parameters", None)
    if isinstance(params, dict) and "rope_theta" in params:
        theta = float(params["rope_theta"])
        scaling = dict(params)
    else:
        theta = float(getattr(hf_config, "rope_theta", 10000.0))
        scaling = getattr(hf_config, "rope_scaling", None)
        scaling = dict(scaling) if scaling else None
    if scaling is not None:
        rope_type = scaling.get("rope_type", scaling.get("type", "default"))
        if rope_type == "default":
            scaling = None
        else:
            scaling["rope_type"] = rope_type
    return theta, scaling


def _llama3_inv_freq(inv_freq: torch.Tensor, s: Dict[str, Any]) -> torch.Tensor:
    factor = s["factor"]
    low, high = s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
    old_ctx = s.get("original_max_position_embeddings", 8192)
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
    return torch.where(is_medium, smoothed, scaled)


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 0.1 * mscale * math.log(factor) + 1.0 if factor > 1.0 else 1.0


def _yarn_inv_freq(base: float, rotary_dim: int, max_position: int, s: Dict[str, Any]) -> Tuple[torch.Tensor, float]:
    """YaRN (arXiv 2309.00071): (inverse frequencies, factor applied to cos and sin).

    Dimensions that rotate fewer than `beta_slow` times over the original context are interpolated (divided
    by `factor`), those rotating more than `beta_fast` times keep their frequency, and a linear ramp blends the
    ones between; the attention factor is 0.1 ln(factor) + 1 unless the config gives it (or DeepSeek's
    mscale / mscale_all_dim pair)."""
    factor = float(s["factor"])
    old_ctx = s.get("original_max_position_embeddings") or max_position
    beta_fast, beta_slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1

    def dim_of(rotations: float) -> float:  # the dimension that rotates `rotations` times over old_ctx
        return rotary_dim * math.log(old_ctx / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = dim_of(beta_fast), dim_of(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, rotary_dim - 1)
    if low == high:
        high += 0.001  # a ramp of zero width would divide by zero
    ramp = ((torch.arange(rotary_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolated = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim))
    inv_freq = extrapolated / factor * ramp + extrapolated * (1 - ramp)
    attention = s.get("attention_factor")
    if attention is None:
        mscale, mscale_all_dim = s.get("mscale"), s.get("mscale_all_dim")
        attention = (_yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
                     if mscale and mscale_all_dim else _yarn_mscale(factor))
    return inv_freq, float(attention)


class RotaryEmbedding(nn.Module):
    def __init__(
        self,
        head_size: int,
        rotary_dim: int,
        max_position: int,
        base: float,
        is_neox_style: bool = True,
        scaling: Optional[Dict[str, Any]] = None,
    ) -> None:
        super().__init__()
        self.head_size = head_size
        self.rotary_dim = rotary_dim
        self.is_neox_style = is_neox_style
        inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim))
        rope_type = (scaling or {}).get("rope_type", "default")
        attention_factor = 1.0
        if rope_type == "llama3":
            inv_freq = _llama3_inv_freq(inv_freq, scaling)
        elif rope_type == "linear":
            inv_freq = inv_freq / scaling["factor"]
        elif rope_type == "yarn":
            inv_freq, attention_factor = _yarn_inv_freq(base, rotary_dim, max_position, scaling)
        elif rope_type != "default":
            raise NotImplementedError(f"rope scaling type {rope_type!r} is not supported yet")
        t = torch.arange(max_position, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)
        # [max_position, rotary_dim]: cos | sin halves, kept fp32 and cast at use. YaRN's attention factor is
        # folded in (it scales q.k by its square, as transformers and SGLang apply it).
        cache = torch.cat([freqs.cos(), freqs.sin()], dim=-1) * attention_factor
        self.register_buffer("cos_sin_cache", cache, persistent=False)

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """q: [n, heads * head_size], k: [n, kv_heads * head_size]; returns (q, k) rotated.

        On the fused (CUDA) path q and k are rotated IN PLACE, in fp32 and rounded once, and the returned
        tensors are q and k themselves (views such as column slices of a qkv tensor included); on the torch
        path they are new tensors and q, k are left unchanged. Callers must use the returned tensors and not
        rely on the inputs either way.
        """
        ops = fused_ops(q)
        if ops is not None and k.dtype == q.dtype:
            return ops.rotary_embedding_(positions, q, k, self.head_size, self.cos_sin_cache, self.is_neox_style)
        cos, sin = self.cos_sin_cache[positions].to(q.dtype).chunk(2, dim=-1)
        return self._rotate(q, cos, sin), self._rotate(k, cos, sin)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        x = x.view(n, -1, self.head_size)
        rot, rest = x[..., : self.rotary_dim], x[..., self.rotary_dim :]
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        if self.is_neox_style:
            x1, x2 = rot.chunk(2, dim=-1)
            out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
        else:
            x1, x2 = rot[..., 0::2], rot[..., 1::2]
            out = torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).flatten(-2)
        if rest.shape[-1]:
            out = torch.cat([out, rest], dim=-1)
        return out.reshape(n, -1)


def qk_norm_rope(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, q_norm: RMSNorm, k_norm: RMSNorm, rope: RotaryEmbedding
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-head RMSNorm of q [n, heads * head_size] and k (q_norm / k_norm over head_size), then `rope`.

    Fused into one in-place kernel on q and k themselves (column slices of the qkv tensor included) when the
    fused ops are on and every piece is the plain kind that kernel implements; otherwise the norms then the
    rotation, as separate layers (on CPU: new tensors, q and k untouched). Use the returned tensors either way.
    """
    ops = fused_ops(q)
    if (
        ops is not None
        and type(rope) is RotaryEmbedding
        and type(q_norm) is RMSNorm
        and type(k_norm) is RMSNorm
        and q_norm.variance_epsilon == k_norm.variance_epsilon
        and k.dtype == q.dtype
        and torch.result_type(q_norm.weight, q) == q.dtype
        and torch.result_type(k_norm.weight, k) == q.dtype
    ):
        return ops.qk_norm_rope_(positions, q, k, q_norm.weight, k_norm.weight, q_norm.variance_epsilon,
                                 rope.head_size, rope.cos_sin_cache, rope.is_neox_style)  # fmt: skip
    d = rope.head_size
    q = q_norm(q.view(q.shape[0], -1, d)).view(q.shape)  # per-head views (no copy); the norms return new tensors
    k = k_norm(k.view(k.shape[0], -1, d)).view(k.shape)
    return rope(positions, q, k)


def get_rope(hf_config: Any, head_dim: int, max_position: int, is_neox_style: bool = True) -> RotaryEmbedding:
    theta, scaling = rope_config(hf_config)
    # transformers 5 moves partial_rotary_factor into rope_parameters; older configs keep it at the top.
    params = getattr(hf_config, "rope_parameters", None)
    partial = getattr(hf_config, "partial_rotary_factor", None)
    if partial is None and isinstance(params, dict):
        partial = params.get("partial_rotary_factor")
    partial = partial or 1.0
    return RotaryEmbedding(head_dim, int(head_dim * partial), max_position, theta, is_neox_style, scaling)

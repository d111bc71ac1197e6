"""Triton kernels of the `triton` attention backend (importing this module imports triton)."""

from sglx.srt.layers.attention.triton_ops.decode_attention import (
    DecodeLaunchConfig,
    choose_num_kv_splits,
    decode_attention_fwd,
    decode_scratch,
)
from sglx.srt.layers.attention.triton_ops.extend_attention import ExtendLaunchConfig, extend_attention_fwd
from sglx.srt.layers.attention.triton_ops.kv_store import can_fuse_store, fill_kv_indices, store_kv_cache

__all__ = [
    "DecodeLaunchConfig",
    "ExtendLaunchConfig",
    "can_fuse_store",
    "choose_num_kv_splits",
    "decode_attention_fwd",
    "decode_scratch",
    "extend_attention_fwd",
    "fill_kv_indices",
    "store_kv_cache",
]

"""Attention backends by name (--attention-backend and friends)."""

from __future__ import annotations

from typing import Any, Callable, Dict

from sglx.srt.layers.attention.base_attn_backend import AttentionBackend, HybridAttnBackend

ATTENTION_BACKENDS: Dict[str, Callable[[Any], AttentionBackend]] = {}


def register_attention_backend(name: str):
    def deco(factory: Callable[[Any], AttentionBackend]):
        ATTENTION_BACKENDS[name] = factory
        return factory

    return deco


def _load_builtin() -> None:
    # Imported for their registration side effect; GPU-only backends register themselves lazily and
    # raise a clear error from their factory when the hardware or library is missing.
    from sglx.srt.layers.attention import torch_native_backend  # noqa: F401
    from sglx.srt.layers.attention import triton_backend  # noqa: F401  (imports triton lazily, in its factory)
    from sglx.srt.layers.attention import flashinfer_backend  # noqa: F401  (flashinfer and fa3; lazy imports)


def attention_backend_names() -> list:
    _load_builtin()
    return sorted(ATTENTION_BACKENDS)


def create_attention_backend(name: str, runner: Any) -> AttentionBackend:
    if name not in attention_backend_names():
        raise ValueError(f"unknown attention backend {name!r}; available: {attention_backend_names()}")
    return ATTENTION_BACKENDS[name](runner)


def create_model_attention_backend(server_args: Any, runner: Any) -> AttentionBackend:
    prefill, decode = server_args.prefill_attention_backend, server_args.decode_attention_backend
    if prefill == decode:
        return create_attention_backend(prefill, runner)
    return HybridAttnBackend(create_attention_backend(prefill, runner), create_attention_backend(decode, runner))

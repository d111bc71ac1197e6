"""Attention backends by name (--attention-backend and friends).

Outside code adds backends through plugins: SGLX_PLUGINS names modules (comma-separated, importable in every
process: the launcher checks names at parse time, the scheduler builds the backend) that register their own with
`register_attention_backend`, as vLLM's general plugins do.
"""

from __future__ import annotations

import importlib
import os
from typing import Any, Callable, Dict, Union

from sglx.srt.layers.attention.base_attn_backend import AttentionBackend, HybridAttnBackend

ATTENTION_BACKENDS: Dict[str, Callable[[Any], AttentionBackend]] = {}
# Whether a backend runs only on a CUDA GPU: a bool, or a function asked at the time (triton under its
# interpreter also runs on the CPU).
_NEEDS_CUDA: Dict[str, Union[bool, Callable[[], bool]]] = {}


def register_attention_backend(name: str, needs_cuda: Union[bool, Callable[[], bool]] = False):
    def deco(factory: Callable[[Any], AttentionBackend]):
        ATTENTION_BACKENDS[name] = factory
        _NEEDS_CUDA[name] = needs_cuda
        return factory

    return deco


def attention_backend_needs_cuda(name: str) -> bool:
    """Whether backend `name` can only run on a CUDA GPU (ServerArgs.check_launchable refuses it on the CPU
    before any model loads; its factory would fail only after)."""
    attention_backend_names()
    needs = _NEEDS_CUDA.get(name, False)
    return bool(needs() if callable(needs) else needs)


def _load_builtin() -> None:
    # Imported for their registration side effect; GPU-only backends register themselves lazily and
    # raise a clear error from their factory when the hardware or library is missing.
    from sglx.srt.layers.attention import torch_native_backend  # noqa: F401
    from sglx.srt.layers.attention import triton_backend  # noqa: F401  (imports triton lazily, in its factory)
    from sglx.srt.layers.attention import flashinfer_backend  # noqa: F401  (flashinfer and fa3; lazy imports)


def load_plugins() -> None:
    """Import the modules SGLX_PLUGINS names (once each; Python caches the import)."""
    for name in filter(None, (n.strip() for n in os.environ.get("SGLX_PLUGINS", "").split(","))):
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise ImportError(f"SGLX_PLUGINS: cannot import plugin module {name!r}: {e}") from e


def attention_backend_names() -> list:
    _load_builtin()
    load_plugins()
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

"""GPU tests: skipped without CUDA (CI has no GPU), and skipped when Triton runs in interpreter mode."""

from __future__ import annotations

import gc
import os
from pathlib import Path

import pytest

_HERE = Path(__file__).resolve().parent


def _skip_reason() -> str | None:
    try:
        import torch
    except ImportError:  # pragma: no cover
        return "torch is not installed"
    if not torch.cuda.is_available():
        return "needs a CUDA GPU"
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        # test/unit/test_triton_attention.py turns the interpreter on for the whole process.
        return "Triton is in interpreter mode: run test/gpu in its own pytest process"
    return None


def pytest_collection_modifyitems(config, items):
    reason = _skip_reason()
    if reason is None:
        return
    marker = pytest.mark.skip(reason=reason)
    for item in items:
        if _HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(marker)


@pytest.fixture(autouse=True)
def _release_gpu_memory():
    """Each test's runners and tensors go before the next test sizes its KV pool from the free memory."""
    yield
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()

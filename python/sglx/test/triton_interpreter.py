"""Unit tests run sglx's Triton kernels on the CPU through Triton's interpreter.

TRITON_INTERPRET must be set before the kernels are decorated, i.e. before their module is first imported, and it
then holds for the whole process. So a test module calls `use_triton_interpreter` at its very top, before
importing any kernel module; it skips the module where that cannot work.
"""

from __future__ import annotations

import os
import sys
from types import ModuleType

import pytest


def use_triton_interpreter(kernel_module: str, kernel_name: str) -> ModuleType:
    """Turn the interpreter on (unless something chose otherwise) and return triton. Skips the calling module
    when triton is missing, TRITON_INTERPRET was set to something else, or `kernel_module` was already
    imported in this process with `kernel_name` compiled for a GPU."""
    os.environ.setdefault("TRITON_INTERPRET", "1")
    triton = pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("TRITON_INTERPRET was set to something else before this module", allow_module_level=True)
    mod = sys.modules.get(kernel_module)
    if mod is not None and not type(getattr(mod, kernel_name)).__name__.startswith("Interpreted"):
        pytest.skip(f"{kernel_module} was compiled for the GPU earlier in this process", allow_module_level=True)
    return triton

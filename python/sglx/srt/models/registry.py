"""Model classes by architecture name (the `architectures` entry of a config)."""

from __future__ import annotations

import importlib
from typing import Dict, Type

from torch import nn

_MODEL_MODULES = ["llama", "qwen3", "bert"]


def _collect() -> Dict[str, Type[nn.Module]]:
    registry: Dict[str, Type[nn.Module]] = {}
    for mod_name in _MODEL_MODULES:
        mod = importlib.import_module(f"sglx.srt.models.{mod_name}")
        for cls in mod.EntryClass:
            registry[cls.__name__] = cls
    return registry


def get_model_class(architecture: str) -> Type[nn.Module]:
    registry = _collect()
    if architecture not in registry:
        raise ValueError(f"model architecture {architecture!r} is not supported; supported: {sorted(registry)}")
    return registry[architecture]


def supported_architectures() -> list:
    return sorted(_collect())

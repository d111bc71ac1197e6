"""Copying checkpoint tensors (transformers names) into a model whose q/k/v or gate/up are fused."""

from __future__ import annotations

from typing import Callable, Collection, Iterable, Optional, Set, Tuple

import torch
from torch import nn

# name -> (fused module path, shard name, "weight" | "bias"), or None for a plain parameter
ShardRoute = Callable[[str], Optional[Tuple[str, str, str]]]


@torch.no_grad()
def load_named_weights(model: nn.Module, weights: Iterable[Tuple[str, torch.Tensor]], route: ShardRoute,
                       optional: Collection[str] = ()) -> Set[str]:
    """Copy every tensor into its parameter (or fused shard); fail loudly on an unknown name, a shape mismatch
    or a parameter the checkpoint never provided (random weights must never be served by accident), unless it
    is named in `optional`: the caller then learns from the returned loaded names that it is missing."""
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    loaded = set()
    for name, tensor in weights:
        shard = route(name)
        if shard is not None:
            fused, shard_name, kind = shard
            modules[fused].load_shard(shard_name, kind, tensor)
            loaded.add(f"{fused}.{kind}")
            continue
        if name not in params:
            raise KeyError(f"checkpoint tensor {name!r} has no parameter in {type(model).__name__}")
        if params[name].shape != tensor.shape:
            raise ValueError(f"{name}: shape {tuple(tensor.shape)} != parameter {tuple(params[name].shape)}")
        if (params[name].dtype == torch.float8_e4m3fn) != (tensor.dtype == torch.float8_e4m3fn):
            # An FP8 layer filled from full-precision data (or the reverse) would be silently wrong by its scale.
            raise ValueError(f"{name}: checkpoint dtype {tensor.dtype} into parameter of {params[name].dtype}")
        params[name].copy_(tensor)
        loaded.add(name)
    missing = set(params) - loaded - set(optional)
    if missing:
        raise ValueError(f"checkpoint is missing parameters: {sorted(missing)[:8]}")
    return loaded

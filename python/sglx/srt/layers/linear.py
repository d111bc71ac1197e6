"""Linear layers whose weights are several checkpoint tensors stacked along the output dimension.

Fusing q/k/v (and gate/up) into one matmul saves kernel launches; the checkpoint still names them apart, so
each layer knows where each named shard goes.
"""

from __future__ import annotations

from typing import Dict, Sequence, Tuple

import torch
from torch import nn


class StackedLinear(nn.Linear):
    """nn.Linear whose output rows are the concatenation of named shards, e.g. ("q", "k", "v")."""

    def __init__(self, in_features: int, shard_sizes: Sequence[Tuple[str, int]], bias: bool = False) -> None:
        super().__init__(in_features, sum(n for _, n in shard_sizes), bias=bias)
        self.shard_offsets: Dict[str, Tuple[int, int]] = {}
        off = 0
        for name, n in shard_sizes:
            self.shard_offsets[name] = (off, n)
            off += n

    def load_shard(self, shard: str, param_kind: str, tensor: torch.Tensor) -> None:
        off, n = self.shard_offsets[shard]
        target = self.weight if param_kind == "weight" else self.bias
        if tensor.shape[0] != n:
            raise ValueError(f"shard {shard!r} expects {n} rows, checkpoint has {tuple(tensor.shape)}")
        with torch.no_grad():
            target[off : off + n].copy_(tensor)

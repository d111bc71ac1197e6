"""Weights from a HF checkpoint directory: *.safetensors (lazily, one tensor at a time), else PyTorch *.bin."""

from __future__ import annotations

import glob
import json
import os
from typing import Iterator, List, Tuple

import torch

# *.bin files in HF repos that are not model weights.
_NON_WEIGHT_BINS = frozenset({"training_args.bin", "optimizer.bin", "scheduler.bin", "rng_state.bin"})


def _files_from_index(model_dir: str, index_name: str) -> List[str]:
    """Shards named by an index file: repos sometimes hold both consolidated and sharded copies, and the
    index says which set transformers would load."""
    with open(os.path.join(model_dir, index_name)) as f:
        weight_map = json.load(f)["weight_map"]
    return [os.path.join(model_dir, name) for name in sorted(set(weight_map.values()))]


def safetensors_files(model_dir: str) -> List[str]:
    if os.path.isfile(os.path.join(model_dir, "model.safetensors.index.json")):
        return _files_from_index(model_dir, "model.safetensors.index.json")
    return sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))


def bin_files(model_dir: str) -> List[str]:
    if os.path.isfile(os.path.join(model_dir, "pytorch_model.bin.index.json")):
        return _files_from_index(model_dir, "pytorch_model.bin.index.json")
    paths = sorted(glob.glob(os.path.join(model_dir, "*.bin")))
    return [p for p in paths if os.path.basename(p) not in _NON_WEIGHT_BINS]


def iterate_safetensors_weights(model_dir: str) -> Iterator[Tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    files = safetensors_files(model_dir)
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {model_dir}")
    for path in files:
        with safe_open(path, framework="pt", device="cpu") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def iterate_bin_weights(model_dir: str) -> Iterator[Tuple[str, torch.Tensor]]:
    files = bin_files(model_dir)
    if not files:
        raise FileNotFoundError(f"no *.bin weight files in {model_dir}")
    for path in files:
        # weights_only: a pickle from the internet must not run code; mmap keeps peak memory to one tensor.
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        for name, tensor in state.items():
            yield name, tensor
        del state


def iterate_hf_dir_weights(model_dir: str) -> Iterator[Tuple[str, torch.Tensor]]:
    """safetensors when there are any (the safe format wins), else *.bin."""
    if safetensors_files(model_dir):
        return iterate_safetensors_weights(model_dir)
    if bin_files(model_dir):
        return iterate_bin_weights(model_dir)
    raise FileNotFoundError(
        f"no weights (*.safetensors or *.bin) in {model_dir}; use --load-format dummy for random weights"
    )

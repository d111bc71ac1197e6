"""Quantization methods, chosen by name (`--quantization`).

Each entry converts a loaded model in place (online quantization: the checkpoint holds full-precision weights)
and says which devices can run it. The registry is the one place a new method is added.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict

import torch
from torch import nn


@dataclass(frozen=True)
class QuantizationMethod:
    name: str
    convert: Callable[[nn.Module], int]  # in place; returns how many layers were converted
    min_cuda_capability: tuple  # a CUDA device below this cannot run the method's kernels


def _fp8_convert(model: nn.Module) -> int:
    from sglx.srt.layers.quantization.fp8 import quantize_model_fp8

    return quantize_model_fp8(model)


QUANTIZATION_METHODS: Dict[str, QuantizationMethod] = {
    "fp8": QuantizationMethod("fp8", _fp8_convert, (8, 9)),
}


def get_quantization_method(name: str) -> QuantizationMethod:
    if name not in QUANTIZATION_METHODS:
        raise ValueError(f"--quantization must be one of {', '.join(QUANTIZATION_METHODS)}; got {name!r}")
    return QUANTIZATION_METHODS[name]


def check_device_support(name: str, device: torch.device) -> None:
    """Fail at start-up, naming the need, where the method's kernels cannot run (the CPU runs the torch
    reference of every method)."""
    method = get_quantization_method(name)
    if device.type == "cuda":
        cap = torch.cuda.get_device_capability(device)
        if cap < method.min_cuda_capability:
            need = ".".join(map(str, method.min_cuda_capability))
            raise RuntimeError(f"--quantization {name} needs a GPU of compute capability {need} or newer "
                               f"(Ada, Hopper); this one is {cap[0]}.{cap[1]}")


def apply_quantization(model: nn.Module, name: str) -> int:
    return get_quantization_method(name).convert(model)


__all__ = ["QUANTIZATION_METHODS", "QuantizationMethod", "apply_quantization", "check_device_support",
           "get_quantization_method"]

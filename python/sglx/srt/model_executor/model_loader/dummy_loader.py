"""Random weights for `--load-format dummy`: benchmarking and tests without a checkpoint.

Values are small (uniform in [-1e-3, 1e-3]) so activations stay finite through many layers, norm scales are
1 (and norm biases 0) so normalization behaves as at init, and the seed is fixed so two runs (and two TP
ranks) build the same model. Numbers are drawn on the CPU so they do not depend on the device.
"""

from __future__ import annotations

import torch

DUMMY_SEED = 1234
DUMMY_RANGE = 1e-3


def _is_norm(module: torch.nn.Module, module_name: str) -> bool:
    leaf = module_name.rsplit(".", 1)[-1]
    return "norm" in type(module).__name__.lower() or "norm" in leaf.lower()


@torch.no_grad()
def init_dummy_weights(model: torch.nn.Module, seed: int = DUMMY_SEED, low: float = -DUMMY_RANGE,
                       high: float = DUMMY_RANGE) -> None:
    generator = torch.Generator(device="cpu").manual_seed(seed)
    for module_name, module in model.named_modules():
        norm = _is_norm(module, module_name)
        for param_name, param in module.named_parameters(recurse=False):
            if norm:
                param.fill_(1.0 if param_name == "weight" else 0.0)
                continue
            values = torch.empty(param.shape, dtype=torch.float32)
            values.uniform_(low, high, generator=generator)
            param.copy_(values)

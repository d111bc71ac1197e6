"""Random weights for `--load-format dummy`: benchmarking and tests without a checkpoint.

Values are small (uniform in [-1e-3, 1e-3]) so activations stay finite through many layers, norm scales are
1 (and norm biases 0) so normalization behaves as at init, and the seed is fixed so two runs (and two TP
ranks) build the same model. Numbers are drawn where each parameter lives, with one seeded generator per
device: drawing 8B parameters on the CPU took minutes, on a GPU it takes seconds.
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
    generators = {}
    for module_name, module in model.named_modules():
        norm = _is_norm(module, module_name)
        for param_name, param in module.named_parameters(recurse=False):
            if norm:
                param.fill_(1.0 if param_name == "weight" else 0.0)
                continue
            if param.device not in generators:
                generators[param.device] = torch.Generator(device=param.device).manual_seed(seed)
            param.uniform_(low, high, generator=generators[param.device])

"""An SGLX_PLUGINS module (see layers/attention/registry.py) that rebuilds seed 000's and seed 003's baselines as
attention backends, so the whole engine can serve through them (bench_embedding.py's encode modes pool-read and
pre-seeds); not for serving.

  fa3_pool_read   the fa3 backend with prefix-free batches attended from the KV pool through the page table,
                  as SGLang's FA backend did before seed 000 (the K/V are stored first, as on the cache path);
  fa3_pre_seeds   that, plus a device-to-device copy of every attention output into the layer's buffer, as
                  before seed 003 (`RadixAttention.force_output_copy`).
"""

from __future__ import annotations

from typing import Any

from sglx.srt.layers.attention.registry import ATTENTION_BACKENDS, register_attention_backend
from sglx.srt.layers.radix_attention import RadixAttention

POOL_READ_BACKEND = "fa3_pool_read"
PRE_SEEDS_BACKEND = "fa3_pre_seeds"


@register_attention_backend(POOL_READ_BACKEND, needs_cuda=True)
def pool_read_backend(runner: Any):
    backend = ATTENTION_BACKENDS["fa3"](runner)
    backend.ragged_prefix_free = False
    return backend


@register_attention_backend(PRE_SEEDS_BACKEND, needs_cuda=True)
def pre_seeds_backend(runner: Any):
    layers = [m for m in runner.model.modules() if isinstance(m, RadixAttention)]
    if not layers:
        raise ValueError("the model has no RadixAttention layer")
    for layer in layers:
        layer.force_output_copy = True
    return pool_read_backend(runner)

"""flashinfer's sampling kernels for `Sampler(backend="flashinfer")`: the only module that imports flashinfer.sampling.

flashinfer samples by rejection from a probability row without sorting it. Its kernels keep the same tokens
as sampler.py's `filter_probs` where they are used here (ties at a threshold aside, which sort order decides
there and value here):

* top-k: a token is kept when fewer than k tokens are more probable than it;
* top-p: when the tokens more probable than it hold less than top_p of the row's mass (the row must sum to
  1, which a softmax row and flashinfer's renormalized top-k rows do); `top_k_top_p_sampling_from_probs`
  with `filter_apply_order="top_k_first"` renormalizes the top-k survivors first, so top-p is relative to
  the mass top-k kept, as in filter_probs ("joint", SGLang's choice, would measure it on the whole row);
* min-p: when its probability is at least min_p times the row's largest.

Neutral rows of a filtering batch (top_k = vocab, top_p = 1, min_p = 0) go through the same kernel. top_k =
vocab and min_p = 0 keep every token; top_p = 1 keeps every token whose probability exceeds the rounding error
of flashinfer's float32 sum of the others (filter_probs exempts such rows from the test, the kernel has no
such exemption), so a far tail can be cut in a batch where other rows use top-p.

API used, the same from flashinfer 0.2.3 (before, the kernels took uniform samples and returned a success
mask) to the 0.7 source read when writing this: `sampling_from_probs(probs)`, `top_k_sampling_from_probs(probs,
top_k)`, `top_p_sampling_from_probs(probs, top_p)`, `top_k_top_p_sampling_from_probs(probs, top_k, top_p,
filter_apply_order=...)`, `min_p_sampling_from_probs(probs, min_p)`; per-row parameters as device tensors
(int32 top_k, float32 top_p / min_p), int32 token ids back. Their random numbers come from Philox offsets
taken from torch's default CUDA generator on the host: no device sync.
"""

from __future__ import annotations

from types import ModuleType
from typing import Optional

import torch

from sglx.srt.sampling.sampling_batch_info import SamplingBatchInfo

FLASHINFER_KERNELS = ("sampling_from_probs", "top_k_sampling_from_probs", "top_p_sampling_from_probs",
                      "top_k_top_p_sampling_from_probs", "min_p_sampling_from_probs")


def import_flashinfer_sampling() -> ModuleType:
    """`flashinfer.sampling`, imported on first use so that CPU installs never import flashinfer."""
    try:
        import flashinfer.sampling as flashinfer_sampling
    except ImportError as e:
        raise RuntimeError("--sampling-backend flashinfer needs the `flashinfer-python` package") from e
    return flashinfer_sampling


def flashinfer_kernel_for(info: SamplingBatchInfo) -> Optional[str]:
    """The flashinfer kernel that draws this batch's unseeded rows from the same filtered distribution as the
    torch path, or None when the whole batch takes the torch path. Reads host-side flags and shapes only.

    None when:
    * min-p comes with top-k or top-p: flashinfer has no kernel applying all three in sampler.py's order (a
      chain of its renorm kernels could, but it is neither verified nor measured here);
    * seeded rows are all there is (flashinfer's draw would be thrown away), or the seeds came without
      `seeded_rows` (finding them would need a device sync).
    Seeded rows of any other batch are re-drawn on the torch path by the caller: their tokens depend only on
    their seed and position, never on which backend served their batch neighbours. Greedy rows are ignored
    (the need_* flags leave them out; the caller overwrites them with argmax).
    """
    if info.seeds is not None and (info.seeded_rows is None or info.seeded_rows.numel() == info.batch_size):
        return None
    top_k_or_p = info.need_top_k or info.need_top_p
    if info.need_min_p:
        return None if top_k_or_p else "min_p_sampling_from_probs"
    if info.need_top_k and info.need_top_p:
        return "top_k_top_p_sampling_from_probs"
    if info.need_top_k:
        return "top_k_sampling_from_probs"
    if info.need_top_p:
        return "top_p_sampling_from_probs"
    return "sampling_from_probs"


def flashinfer_sample(
    flashinfer_sampling: ModuleType, kernel: str, probs: torch.Tensor, info: SamplingBatchInfo
) -> torch.Tensor:
    """[bs] int64 token ids drawn by `kernel` (one of FLASHINFER_KERNELS) from `probs` [bs, vocab] float32, a
    softmax row per request, filtered by the rows' own top_ks / top_ps / min_ps."""
    fn = getattr(flashinfer_sampling, kernel)
    if kernel == "sampling_from_probs":
        ids = fn(probs)
    elif kernel == "top_k_sampling_from_probs":
        ids = fn(probs, info.top_ks)
    elif kernel == "top_p_sampling_from_probs":
        ids = fn(probs, info.top_ps)
    elif kernel == "top_k_top_p_sampling_from_probs":
        ids = fn(probs, info.top_ks, info.top_ps, filter_apply_order="top_k_first")
    elif kernel == "min_p_sampling_from_probs":
        ids = fn(probs, info.min_ps)
    else:
        raise ValueError(f"unknown flashinfer sampling kernel {kernel!r}")
    return ids.to(torch.int64)

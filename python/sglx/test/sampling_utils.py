"""Requests and reference distributions for sampler tests and benchmarks (no scheduler, no model).

`req(...)` builds the smallest object `SamplingBatchInfo.from_reqs` accepts; `reference_probs` is the filtered
distribution written independently of sampler.py's sorted-mask code, for statistical checks of any backend.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Set

import torch

from sglx.srt.sampling.sampling_params import SamplingParams


@dataclass
class FakeReq:
    sampling_params: SamplingParams
    origin_input_ids: List[int] = field(default_factory=list)
    output_ids: List[int] = field(default_factory=list)
    eos_token_ids: Set[int] = field(default_factory=set)
    grammar: Any = None


def params(**kw) -> SamplingParams:
    """SamplingParams verified and normalized, as the tokenizer manager hands them to the scheduler."""
    sp = SamplingParams(**kw)
    sp.verify()
    sp.normalize()
    return sp


def req(prompt=(), output=(), eos=(), **kw) -> FakeReq:
    return FakeReq(params(**kw), list(prompt), list(output), set(eos))


def reference_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, min_p: float) -> torch.Tensor:
    """float64 distribution of one row after temperature, top-k, top-p, min-p, each filter acting on what the
    previous ones kept, renormalized: top-p keeps the smallest most-probable prefix reaching top_p of the
    top-k mass, min-p keeps what reaches min_p times the largest kept probability. A python loop over the
    sorted row rather than sampler.py's masks."""
    p = torch.softmax(logits.double() / temperature, dim=-1)
    keep = torch.zeros_like(p, dtype=torch.bool)
    keep[torch.topk(p, min(top_k, p.numel())).indices] = True
    p = torch.where(keep, p, 0.0)
    p = p / p.sum()
    total = 0.0
    kept = torch.zeros_like(keep)
    for i in torch.argsort(p, descending=True).tolist():
        kept[i] = True
        total += p[i].item()
        if total >= top_p:
            break
    p = torch.where(kept, p, 0.0)
    p = p / p.sum()
    p = torch.where(p >= min_p * p.max(), p, 0.0)
    return p / p.sum()

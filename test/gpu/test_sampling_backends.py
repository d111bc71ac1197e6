"""Both sampling backends on the GPU against the exact filtered distribution (sglx.test.sampling_utils.
reference_probs, float64 on the CPU), plus the rows whose tokens must not depend on the backend.

Distribution check: N draws of one fixed 32-token row; the empirical distribution's total-variation distance
to the reference must stay below  b = 1/2 sum_i sqrt(p_i (1 - p_i) / N) + sqrt(ln(1e6) / (2N))  (the first
term bounds its mean, the second is McDiarmid's deviation at probability 1e-6; about 0.03 here), and no token
the reference removes may appear at all. A wrong filter order fails both: the top-k-then-top-p case is built
so that "joint" filtering (top-p over the whole row's mass) is more than 3b away and keeps three more tokens.
"""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

from sglx.srt.layers.flashinfer_sampling import flashinfer_kernel_for
from sglx.srt.layers.sampler import Sampler
from sglx.srt.sampling.sampling_batch_info import SamplingBatchInfo
from sglx.test.sampling_utils import reference_probs, req

DEVICE = torch.device("cuda")
VOCAB = 32
N_DRAWS = 20000
# Distinct logits 5/31 apart in a fixed shuffled order (so sorted order is not index order).
LOGITS = torch.linspace(2.5, -2.5, VOCAB)[torch.randperm(VOCAB, generator=torch.Generator().manual_seed(0))]

needs_flashinfer = pytest.mark.skipif(importlib.util.find_spec("flashinfer") is None,
                                      reason="flashinfer-python is not installed")
BACKENDS = ["pytorch", pytest.param("flashinfer", marks=needs_flashinfer)]

# name -> (sampling params, the kernel the flashinfer backend uses for it; None: the torch path)
CASES = {
    "temperature": (dict(temperature=0.7), "sampling_from_probs"),
    "top_k": (dict(top_k=6), "top_k_sampling_from_probs"),
    "top_p": (dict(top_p=0.8), "top_p_sampling_from_probs"),
    # top-k keeps 6; top-p over their renormalized mass keeps 3 (joint filtering would keep all 6).
    "top_k_then_top_p": (dict(top_k=6, top_p=0.6), "top_k_top_p_sampling_from_probs"),
    "min_p": (dict(min_p=0.15), "min_p_sampling_from_probs"),
    "combined": (dict(temperature=1.3, top_k=10, top_p=0.9, min_p=0.1), None),
    "top_k_min_p": (dict(temperature=0.9, top_k=8, min_p=0.2), None),
}


def info_for(reqs, vocab: int = VOCAB) -> SamplingBatchInfo:
    return SamplingBatchInfo.from_reqs(reqs, vocab, DEVICE)


def tv_bound(p: torch.Tensor, n: int, false_alarm: float = 1e-6) -> float:
    mean = 0.5 * float(torch.sqrt(p * (1 - p) / n).sum())
    return mean + math.sqrt(math.log(1 / false_alarm) / (2 * n))


def joint_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """The wrong order: top-k and top-p both measured on the unfiltered row."""
    p = torch.softmax(logits.double(), -1)
    sorted_p, order = torch.sort(p, descending=True)
    keep = (torch.arange(p.numel()) < top_k) & (torch.cumsum(sorted_p, 0) - sorted_p < top_p)
    out = torch.zeros_like(p).scatter_(0, order, torch.where(keep, sorted_p, 0.0))
    return out / out.sum()


def test_the_order_case_can_tell_the_orders_apart():
    """Precondition of the distribution test's power (CPU arithmetic, but part of this file's claim)."""
    right = reference_probs(LOGITS, 1.0, 6, 0.6, 0.0)
    wrong = joint_top_k_top_p(LOGITS, 6, 0.6)
    assert 0.5 * float((right - wrong).abs().sum()) > 3 * tv_bound(right, N_DRAWS)
    assert int((right > 0).sum()) == 3 and int((wrong > 0).sum()) == 6


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(CASES))
def test_sampling_distribution_matches_reference(backend, name):
    kw, kernel = CASES[name]
    torch.manual_seed(1234)
    reqs = [req(**kw)] * N_DRAWS  # one verified SamplingParams shared by every row
    info = info_for(reqs)
    assert flashinfer_kernel_for(info) == kernel
    ids = Sampler(backend=backend)(LOGITS.to(DEVICE).expand(N_DRAWS, -1).contiguous(), info).next_token_ids
    counts = torch.bincount(ids.cpu(), minlength=VOCAB).double()
    sp = reqs[0].sampling_params
    expected = reference_probs(LOGITS, sp.temperature, sp.top_k, sp.top_p, sp.min_p)
    assert counts[expected == 0].sum() == 0, f"{backend}: a filtered-out token was sampled"
    tv = 0.5 * float((counts / N_DRAWS - expected).abs().sum())
    assert tv < tv_bound(expected, N_DRAWS), f"{backend}/{name}: total variation {tv:.4f}"


def _mixed_batch(n_groups: int = 16):
    """Every CASES setting seeded (several seeds and positions), unseeded, and greedy, interleaved."""
    reqs = []
    for g in range(n_groups):
        for kw, _ in CASES.values():
            reqs.append(req(sampling_seed=1000 * g + len(reqs), output=[0] * (g % 5), **kw))
            reqs.append(req(**kw))
        reqs.append(req(temperature=0.0))
    return reqs


def _kinds(reqs):
    seeded = [i for i, r in enumerate(reqs) if r.sampling_params.sampling_seed is not None]
    greedy = [i for i, r in enumerate(reqs) if r.sampling_params.top_k == 1]
    return seeded, greedy


@needs_flashinfer
@pytest.mark.parametrize("vocab", [VOCAB, 32000])
def test_seeded_and_greedy_rows_identical_across_backends(vocab):
    reqs = _mixed_batch()
    seeded, greedy = _kinds(reqs)
    logits = torch.randn(len(reqs), vocab, device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(7)) * 3
    torch.manual_seed(1)
    by_torch = Sampler(backend="pytorch")(logits, info_for(reqs, vocab)).next_token_ids
    torch.manual_seed(2)  # different unseeded draws: the seeded rows must not care
    by_flashinfer = Sampler(backend="flashinfer")(logits, info_for(reqs, vocab)).next_token_ids
    assert torch.equal(by_torch[seeded], by_flashinfer[seeded])
    assert torch.equal(by_flashinfer[greedy], logits[greedy].argmax(-1))
    assert by_flashinfer.dtype == torch.int64 and ((by_flashinfer >= 0) & (by_flashinfer < vocab)).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_greedy_rows_are_exact_argmax(backend):
    vocab = 32000
    reqs = [req(temperature=0.0), req(top_k=20, top_p=0.9), req(top_k=1, temperature=1.5), req(min_p=0.3)] * 32
    logits = torch.randn(len(reqs), vocab, device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(3)) * 0.01
    ids = Sampler(backend=backend)(logits, info_for(reqs, vocab)).next_token_ids
    greedy = [i for i, r in enumerate(reqs) if r.sampling_params.top_k == 1]
    assert torch.equal(ids[greedy], logits[greedy].argmax(-1))


@pytest.mark.parametrize("backend", BACKENDS)
def test_sampling_adds_no_host_sync(backend):
    """The overlap scheduler runs CPU work while the GPU samples: the sampler must never wait for the GPU."""
    vocab = 32000
    reqs = _mixed_batch(4)
    logits = torch.randn(len(reqs), vocab, device=DEVICE)
    sampler = Sampler(backend=backend)
    for group in (reqs, [r for r in reqs if r.sampling_params.sampling_seed is None]):
        info = info_for(group, vocab)
        rows = logits[: len(group)].contiguous()
        sampler(rows, info)  # first call: flashinfer's JIT load and caches
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            sampler(rows, info)
        finally:
            torch.cuda.set_sync_debug_mode("default")

"""Sampler(backend=...): which batches and rows take flashinfer's kernels, checked on CPU with a fake
`flashinfer.sampling` that records its calls and answers a token the torch path can never draw."""

from __future__ import annotations

import sys
import types
from typing import List, Optional, Tuple

import pytest
import torch

from sglx.srt.layers import flashinfer_sampling as fs
from sglx.srt.layers.sampler import Sampler, temperature_probs
from sglx.srt.sampling.sampling_batch_info import SamplingBatchInfo
from sglx.test.sampling_utils import req

VOCAB = 16
SENTINEL = VOCAB - 1  # the fake kernels' answer; its logit is -inf, so the torch path never draws it


class FakeFlashinferSampling(types.ModuleType):
    """The five kernels Sampler may call, each recording (name, args, kwargs) and returning int32 SENTINELs."""

    def __init__(self) -> None:
        super().__init__("flashinfer.sampling")
        self.calls: List[Tuple[str, tuple, dict]] = []
        for name in fs.FLASHINFER_KERNELS:
            setattr(self, name, self._kernel(name))

    def _kernel(self, name: str):
        def run(probs: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            self.calls.append((name, (probs, *args), kwargs))
            return torch.full((probs.shape[0],), SENTINEL, dtype=torch.int32)

        return run


def install_fake_flashinfer(monkeypatch) -> FakeFlashinferSampling:
    """Put a fake `flashinfer` package with the fake `flashinfer.sampling` into sys.modules (undone by monkeypatch)."""
    fake = FakeFlashinferSampling()
    parent = types.ModuleType("flashinfer")
    parent.sampling = fake
    monkeypatch.setitem(sys.modules, "flashinfer", parent)
    monkeypatch.setitem(sys.modules, "flashinfer.sampling", fake)
    return fake


@pytest.fixture
def fake_flashinfer(monkeypatch) -> FakeFlashinferSampling:
    return install_fake_flashinfer(monkeypatch)


def info_for(reqs) -> SamplingBatchInfo:
    return SamplingBatchInfo.from_reqs(reqs, VOCAB, torch.device("cpu"))


def logits_for(n: int, seed: int = 0) -> torch.Tensor:
    logits = torch.randn(n, VOCAB, generator=torch.Generator().manual_seed(seed)) * 2
    logits[:, SENTINEL] = float("-inf")
    return logits


# ------------------------------------------------------------------------------------------ construction
def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="unknown sampling backend 'torch'"):
        Sampler(backend="torch")


def test_flashinfer_backend_without_flashinfer_fails_at_construction(monkeypatch):
    monkeypatch.setitem(sys.modules, "flashinfer", None)  # makes `import flashinfer...` raise ImportError
    with pytest.raises(RuntimeError, match="--sampling-backend flashinfer needs the `flashinfer-python` package"):
        Sampler(backend="flashinfer")


def test_pytorch_backend_never_imports_flashinfer(monkeypatch):
    monkeypatch.setitem(sys.modules, "flashinfer", None)
    sampler = Sampler()
    assert sampler.backend == "pytorch" and sampler.flashinfer is None
    reqs = [req(top_k=4), req(top_p=0.5), req(temperature=0.0)]
    assert sampler(logits_for(3), info_for(reqs)).next_token_ids.shape == (3,)


# ------------------------------------------------------------------------------------------ which kernel
KERNEL_CASES = [
    ([req(temperature=0.7)], "sampling_from_probs"),
    ([req(top_k=4)], "top_k_sampling_from_probs"),
    ([req(top_p=0.8)], "top_p_sampling_from_probs"),
    ([req(top_k=4, top_p=0.8)], "top_k_top_p_sampling_from_probs"),
    ([req(top_k=4), req(top_p=0.8)], "top_k_top_p_sampling_from_probs"),  # rows differ: one kernel for both
    ([req(min_p=0.1)], "min_p_sampling_from_probs"),
    ([req(min_p=0.1), req(temperature=0.0)], "min_p_sampling_from_probs"),  # greedy rows don't count
    ([req(min_p=0.1, top_k=4)], None),  # no flashinfer kernel applies top-k, top-p and min-p in our order
    ([req(min_p=0.1), req(top_p=0.8)], None),
    ([req(top_k=4, sampling_seed=1), req(top_k=4)], "top_k_sampling_from_probs"),  # seeded row re-drawn
    ([req(top_k=4, sampling_seed=1), req(sampling_seed=2)], None),  # every row seeded
]


@pytest.mark.parametrize("reqs,kernel", KERNEL_CASES)
def test_flashinfer_kernel_for(reqs, kernel):
    assert fs.flashinfer_kernel_for(info_for(reqs)) == kernel


def test_hand_built_seeds_without_seeded_rows_take_the_torch_path():
    info = info_for([req(top_k=4, sampling_seed=1), req(top_k=4)])
    info.seeded_rows = None  # finding the seeded rows would take a device sync
    assert fs.flashinfer_kernel_for(info) is None


# ------------------------------------------------------------------------------------------ dispatch
def _run(reqs, fake: FakeFlashinferSampling, seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor, Optional[tuple]]:
    logits = logits_for(len(reqs), seed)
    info = info_for(reqs)
    fake.calls.clear()
    ids = Sampler(backend="flashinfer")(logits, info).next_token_ids
    assert len(fake.calls) <= 1
    return logits, ids, fake.calls[0] if fake.calls else None


def test_mixed_batch_rows_take_their_paths(fake_flashinfer):
    reqs = [
        req(top_k=5, top_p=0.9, temperature=0.8),  # unseeded: flashinfer
        req(temperature=0.0),  # greedy: argmax
        req(top_k=3, sampling_seed=11, output=[1, 2]),  # seeded: torch counter-hash race
        req(top_p=0.7, logit_bias={"3": 4.0}),  # unseeded, processed logits
        req(top_k=1, temperature=1.3),  # greedy through top_k=1
        req(top_p=0.95, sampling_seed=12),  # seeded
    ]
    logits, ids, call = _run(reqs, fake_flashinfer)
    assert ids.dtype == torch.int64
    assert ids[[0, 3]].tolist() == [SENTINEL, SENTINEL]
    assert ids[1] == logits[1].argmax() and ids[4] == logits[4].argmax()
    # Seeded rows: the very tokens the pytorch backend draws, whatever their neighbours did.
    want = Sampler(backend="pytorch")(logits, info_for(reqs)).next_token_ids
    assert ids[[2, 5]].tolist() == want[[2, 5]].tolist()
    assert SENTINEL not in ids[[1, 2, 4, 5]].tolist()

    name, args, kwargs = call
    info = info_for(reqs)
    assert name == "top_k_top_p_sampling_from_probs" and kwargs == {"filter_apply_order": "top_k_first"}
    probs, top_ks, top_ps = args
    biased = logits.clone()
    biased[3, 3] += 4.0
    torch.testing.assert_close(probs, temperature_probs(biased, info))  # logit bias, then temperature
    assert torch.equal(top_ks, info.top_ks) and top_ks.dtype == torch.int32
    assert torch.equal(top_ps, info.top_ps) and top_ps.dtype == torch.float32


@pytest.mark.parametrize("reqs,kernel", [c for c in KERNEL_CASES if c[1] is not None])
def test_each_kernel_gets_the_rows_parameters(fake_flashinfer, reqs, kernel):
    _, ids, (name, args, kwargs) = _run(reqs, fake_flashinfer)
    info = info_for(reqs)
    assert name == kernel
    params = {"sampling_from_probs": [], "top_k_sampling_from_probs": [info.top_ks],
              "top_p_sampling_from_probs": [info.top_ps], "min_p_sampling_from_probs": [info.min_ps],
              "top_k_top_p_sampling_from_probs": [info.top_ks, info.top_ps]}[kernel]
    assert len(args) == 1 + len(params) and all(torch.equal(a, b) for a, b in zip(args[1:], params))
    torch.testing.assert_close(args[0].sum(-1), torch.ones(len(reqs)))  # a softmax row each


@pytest.mark.parametrize("reqs", [c[0] for c in KERNEL_CASES if c[1] is None])
def test_fallback_batches_never_call_flashinfer(fake_flashinfer, reqs):
    _, ids, call = _run(reqs, fake_flashinfer)
    assert call is None and SENTINEL not in ids.tolist()


def test_all_greedy_batch_never_calls_flashinfer(fake_flashinfer):
    logits, ids, call = _run([req(temperature=0.0), req(top_k=1)], fake_flashinfer)
    assert call is None and torch.equal(ids, logits.argmax(-1))


def test_seeded_sub_batch_gathers_every_row_field():
    reqs = [req(top_k=3, sampling_seed=5, output=[1], frequency_penalty=0.5), req(top_p=0.5, output=[2, 2]),
            req(min_p=0.2, sampling_seed=7, logit_bias={"4": 1.0})]
    info = info_for(reqs)
    sub = info.seeded_sub_batch()
    assert sub.seeded_rows.tolist() == [0, 1] and sub.batch_size == 2
    assert torch.equal(sub.seeds, info.seeds[[0, 2]]) and torch.equal(sub.positions, info.positions[[0, 2]])
    assert torch.equal(sub.top_ks, info.top_ks[[0, 2]]) and torch.equal(sub.min_ps, info.min_ps[[0, 2]])
    assert torch.equal(sub.temperatures, info.temperatures[[0, 2]])
    assert torch.equal(sub.output_token_counts, info.output_token_counts[[0, 2]])
    assert torch.equal(sub.logit_bias, info.logit_bias[[0, 2]]) and sub.presence_penalties is None
    assert (sub.need_top_k, sub.need_top_p, sub.need_min_p) == (info.need_top_k, info.need_top_p, info.need_min_p)
    with pytest.raises(ValueError, match="seeded_rows"):
        info_for([req(top_k=3)]).seeded_sub_batch()

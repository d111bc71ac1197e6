"""Sampler and SamplingBatchInfo against hand-written references (plain torch / python loops)."""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import pytest
import torch

from sglx.srt.layers.sampler import (
    Sampler,
    apply_logits_processing,
    seeded_exponential,
    seeded_uniform_bits,
    top_logprobs_to_lists,
)
from sglx.srt.sampling.sampling_batch_info import SamplingBatchInfo
from sglx.srt.sampling.sampling_params import TOP_K_ALL
from sglx.test.sampling_utils import FakeReq, params, reference_probs, req

CPU = torch.device("cpu")
M64 = (1 << 64) - 1


def info_for(reqs, vocab: int) -> SamplingBatchInfo:
    return SamplingBatchInfo.from_reqs(reqs, vocab, CPU)


# ---------------------------------------------------------------- seeded hash vs a python uint64 reference


def _splitmix_fin(z: int) -> int:
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def _ref_bits(seed: int, pos: int, v: int) -> int:
    g = 0x9E3779B97F4A7C15
    stream = _splitmix_fin((seed + g) & M64)
    key = _splitmix_fin((stream + (pos + 1) * g) & M64)
    return _splitmix_fin((key + (v + 1) * g) & M64)


def test_seeded_hash_matches_uint64_reference():
    seeds = [0, 1, 42, (1 << 63) - 1, 123456789012345]
    positions = [0, 7, 1000, 3, (1 << 40)]
    bits = seeded_uniform_bits(torch.tensor(seeds), torch.tensor(positions), 17)
    for r, (s, p) in enumerate(zip(seeds, positions)):
        got = [b & M64 for b in bits[r].tolist()]
        assert got == [_ref_bits(s, p, v) for v in range(17)]
    noise = seeded_exponential(torch.tensor(seeds), torch.tensor(positions), 4096)
    assert torch.isfinite(noise).all() and (noise > 0).all()


# ---------------------------------------------------------------- distribution checks


def _chi2_limit(df: int, z: float = 4.75) -> float:
    """Wilson-Hilferty upper quantile of chi-square (z=4.75: about a one-in-a-million false alarm)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def _chi2(counts: torch.Tensor, expected_p: torch.Tensor, n: int) -> float:
    support = expected_p > 0
    exp = expected_p[support] * n
    return float((((counts[support].double() - exp) ** 2) / exp).sum())


LOGITS8 = torch.tensor([2.0, 1.5, 1.2, 0.6, 0.1, -0.4, -1.0, -2.5])
CASES = {
    "temperature": dict(temperature=0.7),
    "top_k": dict(top_k=3),
    "top_p": dict(top_p=0.6),
    "min_p": dict(min_p=0.2),
    # top-p measured on the renormalized top-k mass: keeps 2 tokens here, "joint" filtering would keep 3.
    "top_k_then_top_p": dict(top_k=3, top_p=0.7),
    "combined": dict(temperature=1.3, top_k=5, top_p=0.75, min_p=0.1),
    "top_k_min_p": dict(top_k=4, min_p=0.4),
}
N_DRAWS = 20000


def _draw(reqs, logits_row: torch.Tensor, positions: Optional[torch.Tensor] = None) -> torch.Tensor:
    logits = logits_row.expand(len(reqs), -1).contiguous()
    info = info_for(reqs, logits.shape[1])
    if positions is not None:  # cheaper than building requests with thousands of output ids
        info.positions = positions
    out = Sampler()(logits, info)
    return torch.bincount(out.next_token_ids, minlength=logits.shape[1])


# Filtering is shared by all rows; the seeded modes check that the hashed noise is a fair Exp(1) race.
DIST_CASES = [(n, "unseeded") for n in CASES] + [
    (n, m) for n in ("temperature", "combined") for m in ("seeds", "positions")
]


@pytest.mark.parametrize("name,mode", DIST_CASES)
def test_sampling_distribution_matches_reference(name, mode):
    kw = CASES[name]
    torch.manual_seed(1234)
    positions = None
    # Requests share one verified SamplingParams (verify/normalize per request would dominate the run time).
    if mode == "unseeded":
        reqs = [req(**kw)] * N_DRAWS
    elif mode == "seeds":  # many seeds at one position
        base = req(output=[0] * 3, **kw)
        reqs = [dataclasses.replace(base, sampling_params=dataclasses.replace(base.sampling_params, sampling_seed=s))
                for s in range(N_DRAWS)]
    else:  # one seed, many positions
        reqs = [req(sampling_seed=7, **kw)] * N_DRAWS
        positions = torch.arange(N_DRAWS, dtype=torch.int64)
    n = len(reqs)
    counts = _draw(reqs, LOGITS8, positions)
    sp = reqs[0].sampling_params
    expected = reference_probs(LOGITS8, sp.temperature, sp.top_k, sp.top_p, sp.min_p)
    assert counts[expected == 0].sum() == 0, "a filtered-out token was sampled"
    df = int((expected > 0).sum()) - 1
    if df > 0:
        assert _chi2(counts, expected, n) < _chi2_limit(df)
        # Power check: the plain softmax (no filters, T=1) must be rejected whenever the filters change it.
        wrong = torch.softmax(LOGITS8.double(), -1)
        if (wrong - expected).abs().max() > 0.05:
            assert _chi2(counts, wrong, n) > _chi2_limit(df)


def test_seeded_rows_independent_of_batch_neighbours():
    torch.manual_seed(0)
    vocab = 1000
    base = torch.randn(vocab) * 2
    targets = [req(sampling_seed=s, output=[1] * (s % 13), top_p=0.9) for s in range(64)]
    alone = Sampler()(base.expand(64, -1).contiguous(), info_for(targets, vocab)).next_token_ids
    # Interleave unseeded, greedy and differently-seeded neighbours with other logits and params.
    mixed, rows = [], []
    for t in targets:
        mixed += [req(temperature=0.5), req(temperature=0.0, top_k=3), req(sampling_seed=999, top_k=50)]
        rows.append(len(mixed))
        mixed.append(t)
    logits = torch.randn(len(mixed), vocab) * 3
    logits[rows] = base
    got = Sampler()(logits, info_for(mixed, vocab)).next_token_ids[rows]
    assert torch.equal(alone, got)
    # And repeated runs with different torch RNG state agree as well.
    torch.manual_seed(99)
    assert torch.equal(alone, Sampler()(base.expand(64, -1).contiguous(), info_for(targets, vocab)).next_token_ids)


def test_seeded_draws_differ_across_positions_and_seeds():
    vocab = 1000
    flat = torch.zeros(40, vocab)  # uniform distribution: the token is decided by the noise alone
    by_pos = Sampler()(flat, info_for([req(sampling_seed=5, output=[0] * i) for i in range(40)], vocab))
    by_seed = Sampler()(flat, info_for([req(sampling_seed=s, output=[0] * 3) for s in range(40)], vocab))
    assert len(set(by_pos.next_token_ids.tolist())) > 30
    assert len(set(by_seed.next_token_ids.tolist())) > 30
    a = seeded_exponential(torch.tensor([5, 5]), torch.tensor([0, 1]), vocab)
    assert not torch.allclose(a[0], a[1])


# ---------------------------------------------------------------- greedy


def test_greedy_rows_are_argmax_in_mixed_batch():
    torch.manual_seed(3)
    vocab = 50
    reqs = [
        req(temperature=0.0),
        req(temperature=1.5, top_p=0.3),
        req(top_k=1, temperature=0.9),
        req(temperature=0.0, logit_bias={"7": 100.0}),
        req(sampling_seed=3, min_p=0.5),
    ]
    info = info_for(reqs, vocab)
    assert not info.is_all_greedy
    for _ in range(20):
        logits = torch.randn(len(reqs), vocab) * 0.01  # near-ties: sampling would scatter, argmax can't
        ids = Sampler()(logits, info).next_token_ids
        assert ids[0] == logits[0].argmax() and ids[2] == logits[2].argmax()
        assert ids[3] == 7
    all_greedy = info_for([req(temperature=0.0), req(top_k=1)], vocab)
    assert all_greedy.is_all_greedy
    logits = torch.randn(2, vocab)
    assert torch.equal(Sampler()(logits, all_greedy).next_token_ids, logits.argmax(-1))


# ---------------------------------------------------------------- penalties, bias, min_new_tokens


def _reference_processing(logits: torch.Tensor, r: FakeReq) -> torch.Tensor:
    sp, out = r.sampling_params, logits.clone().tolist()
    vocab = len(out)
    for k, v in (sp.logit_bias or {}).items():
        out[int(k)] += v
    if len(r.output_ids) < sp.min_new_tokens:
        stops = set(sp.stop_token_ids or []) | (set() if sp.ignore_eos else r.eos_token_ids)
        for t in stops:
            out[t] = float("-inf")
    for t in set(r.origin_input_ids) | set(r.output_ids):
        out[t] = out[t] / sp.repetition_penalty if out[t] > 0 else out[t] * sp.repetition_penalty
    for t in range(vocab):
        c = r.output_ids.count(t)
        out[t] -= sp.frequency_penalty * c + (sp.presence_penalty if c > 0 else 0.0)
    return torch.tensor(out)


def test_penalties_bias_and_min_tokens_match_reference_loop():
    torch.manual_seed(5)
    vocab = 40
    reqs = [
        req(prompt=[1, 2, 3, 3], output=[3, 4, 4, 4, 9], frequency_penalty=0.7, presence_penalty=0.3),
        req(prompt=[5, 6, 7], output=[7, 8, 8], repetition_penalty=1.8),
        req(prompt=[10, 11], output=[11, 12, 12, 12], repetition_penalty=0.6, frequency_penalty=-0.5),
        req(prompt=[1], output=[], presence_penalty=-1.2, logit_bias={"4": 2.5, "39": -3.0}),
        req(output=[0, 1], eos=[2, 30], min_new_tokens=4, stop_token_ids=[20]),
        req(output=[0, 1], eos=[2, 30], min_new_tokens=4, stop_token_ids=[20], ignore_eos=True),
        req(output=[0, 1, 2, 3], eos=[2, 30], min_new_tokens=4, stop_token_ids=[20]),
        req(temperature=0.0),
    ]
    logits = torch.randn(len(reqs), vocab) * 3
    before = logits.clone()
    info = info_for(reqs, vocab)
    got = apply_logits_processing(logits, info)
    want = torch.stack([_reference_processing(logits[i], r) for i, r in enumerate(reqs)])
    assert torch.equal(logits, before), "input logits must not be modified in place"
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    fin = torch.isfinite(want)
    torch.testing.assert_close(got[fin], want[fin], rtol=1e-6, atol=1e-5)
    assert torch.isinf(got[4, [2, 30, 20]]).all() and torch.isinf(got[5, 20])
    assert torch.isfinite(got[5, [2, 30]]).all() and torch.isfinite(got[6]).all()


def test_min_new_tokens_blocks_stop_ids_when_sampling():
    vocab = 10
    # Stop tokens dominate the logits; until min_new_tokens is reached they must never come out.
    logits = torch.full((1, vocab), -5.0)
    logits[0, [2, 3]] = 20.0
    early = info_for([req(output=[1], eos=[2], stop_token_ids=[3], min_new_tokens=2)], vocab)
    late = info_for([req(output=[1, 1], eos=[2], stop_token_ids=[3], min_new_tokens=2)], vocab)
    for _ in range(50):
        assert Sampler()(logits, early).next_token_ids.item() not in (2, 3)
    assert Sampler()(logits, late).next_token_ids.item() in (2, 3)


def test_extreme_values_keep_the_model_s_choice():
    """Values at the edge of float32 must not turn a row into NaN or all zeros (either samples token 0)."""
    torch.manual_seed(7)
    vocab = 30
    logits = torch.randn(4, vocab)
    logits[:, 0] = -10.0  # token 0 is the least likely: picking it means the row was destroyed
    logits[:, 17] = 8.0
    logits[:, 5] = 2.0
    logits[:, 3] = 1.0
    reqs = [
        req(top_p=1e-300, temperature=1.0),  # rounds to 0 in float32: only the top token may remain
        # A penalty below 1 boosts the seen tokens; one that rounds to 0 boosts them to the cap (ties).
        req(prompt=[17, 5, 9], repetition_penalty=1e-300, temperature=1.0, top_k=1),  # x/0 = inf: softmax of inf - inf
        req(prompt=[17, 5, 9], repetition_penalty=1e-300, temperature=0.5),
        req(prompt=[3], repetition_penalty=1e-40, temperature=1e-5),  # denormal penalty, near-greedy temperature
    ]
    logits[1:3, 9] = 0.0  # a seen zero logit takes the multiply branch: stays 0
    info = info_for(reqs, vocab)
    processed = apply_logits_processing(logits, info)
    assert not torch.isnan(processed).any()
    for _ in range(20):
        ids = Sampler()(logits, info).next_token_ids.tolist()
        assert ids[0] == 17 and ids[1] in (17, 5) and ids[2] in (17, 5) and ids[3] == 3, ids
    with pytest.raises(ValueError, match="logit_bias"):
        req(logit_bias={"3": 1e308})
    with pytest.raises(ValueError, match="logit_bias"):
        req(logit_bias={"3": -100.5})
    req(logit_bias={"3": -100.0, "4": 100})
    for key in (" 5 ", "1_000", "\uff11\uff12", "5.0", "x"):  # int() takes the first three
        with pytest.raises(ValueError, match="not a token id"):
            req(logit_bias={key: 1.0})
    req(logit_bias={"-0": 1.0, 7: 2.0})


@pytest.mark.parametrize("name", ["temperature", "top_p", "min_p", "frequency_penalty", "repetition_penalty"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_sampling_values_are_refused(name, value):
    """NaN passes every `<` range check (a NaN temperature once sampled token 0 every step): refused by name."""
    with pytest.raises(ValueError, match=f"{name} must be a finite number"):
        req(**{name: value})


# ---------------------------------------------------------------- logprobs


def test_logprobs_and_top_logprobs_are_raw_log_softmax():
    torch.manual_seed(11)
    vocab = 64
    reqs = [
        req(temperature=0.0, frequency_penalty=1.0, output=[1, 2]),
        req(temperature=0.6, top_k=5, repetition_penalty=1.5, prompt=[3]),
        req(sampling_seed=1, logit_bias={"9": 50.0}),
    ]
    logits = torch.randn(len(reqs), vocab) * 2
    out = Sampler()(logits, info_for(reqs, vocab), return_logprob=True, top_logprobs_nums=[0, 3, 5])
    ref = torch.log_softmax(logits.double(), dim=-1)
    assert out.next_token_ids[2] == 9
    torch.testing.assert_close(
        out.next_token_logprobs.double(), ref.gather(1, out.next_token_ids.view(-1, 1)).squeeze(1), atol=1e-5, rtol=0
    )
    top_val, top_idx = top_logprobs_to_lists(
        out.top_logprobs_val.tolist(), out.top_logprobs_idx.tolist(), [0, 3, 5])
    assert top_val[0] == [] and top_idx[0] == []
    for i, k in [(1, 3), (2, 5)]:
        vals, idx = torch.topk(ref[i], k)
        assert top_idx[i] == idx.tolist()
        assert top_val[i] == pytest.approx(vals.tolist(), abs=1e-5)
    plain = Sampler()(logits, info_for(reqs, vocab))
    assert plain.next_token_logprobs is None and plain.top_logprobs_val is None


# ---------------------------------------------------------------- batch info construction


def test_from_reqs_fields():
    vocab = 100
    reqs = [
        req(temperature=0.0, output=[1, 2, 3]),
        req(top_k=500, top_p=0.9, sampling_seed=-3),
        req(top_k=20, min_p=0.1, prompt=[4, 200]),
    ]
    info = info_for(reqs, vocab)
    assert info.top_ks.tolist() == [1, vocab, 20] and info.top_ks.dtype == torch.int32
    assert info.temperatures.shape == (3, 1) and info.positions.tolist() == [3, 0, 0]
    assert info.need_top_k and info.need_top_p and info.need_min_p and not info.is_all_greedy
    assert info.seeds.tolist()[0] == -1 and info.seeds.tolist()[1] >= 0 and info.seeded_rows.tolist() == [1]
    assert info.output_token_counts is None and info.logit_bias is None and info.min_new_tokens_mask is None
    # Only greedy rows ask for top-k: the sampling path need not filter.
    plain = info_for([req(temperature=0.0), req(top_k=-1)], vocab)
    assert not plain.need_top_k and plain.seeds is None and plain.top_ks.tolist() == [1, vocab]
    assert reqs[0].sampling_params.top_k == 1 and params().top_k == TOP_K_ALL
    # Out-of-vocab prompt ids are dropped instead of spilling into the next row.
    rep = info_for([req(prompt=[4, 200], repetition_penalty=1.2), req(output=[5, 5], frequency_penalty=0.5)], vocab)
    assert rep.prompt_token_mask.sum().item() == 1 and rep.prompt_token_mask[0, 4]
    assert rep.output_token_counts[1, 5] == 2 and rep.output_token_counts.sum() == 2

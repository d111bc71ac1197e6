"""Penalty counts kept on the device (sampling/penalty_counts.py) against counts rebuilt from the streamed ids.

The pool alone: rows filled from host ids, advanced by `accumulate`, taken back when their request finishes and
filled afresh for the next owner. Through the scheduler: under the overlap schedule, memory pressure
(retraction) and chunked prefill, every batch's counts and prompt masks equal those computed from what each
request streamed up to that step, penalized decode steps overlap instead of being split, and the tokens equal
the synchronous schedule's. Beside grammars, whose steps are still split, the counts hold too.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from types import SimpleNamespace
from typing import Dict, List

import pytest
import torch

from sglx.srt.managers.io_struct import TokenizedGenerateReqInput
from sglx.srt.managers.schedule_batch import ScheduleBatch
from sglx.srt.sampling.penalty_counts import ZERO_ROW, PenaltyCounts
from sglx.srt.sampling.sampling_params import SamplingParams
from sglx.test.scheduler_utils import make_scheduler, run_until_idle

VOCAB = 50
CPU = torch.device("cpu")


def fake_req(prompt, output=(), **sp):
    params = SamplingParams(**sp)
    r = SimpleNamespace(origin_input_ids=list(prompt), output_ids=list(output), sampling_params=params,
                        finished_reason=None, rid="r")
    r.finished = lambda: r.finished_reason is not None
    return r


def bincount(ids) -> torch.Tensor:
    return torch.bincount(torch.tensor(list(ids), dtype=torch.int64), minlength=VOCAB).to(torch.int32)


def test_rows_fill_accumulate_release_and_reuse():
    pool = PenaltyCounts(VOCAB, CPU)
    a = fake_req([1, 2, 2], [3, 3, 4], frequency_penalty=0.5)
    b = fake_req([5], [], temperature=0.7)  # no penalty: the zero row
    c = fake_req([6, 7], [7, 49, 50, -1], repetition_penalty=1.2)  # out-of-vocab ids are dropped
    rows = pool.rows([a, b, c])
    assert rows[1] == ZERO_ROW and len({int(rows[0]), int(rows[2]), ZERO_ROW}) == 3
    assert torch.equal(pool.counts[rows[0]], bincount([3, 3, 4]))
    assert torch.equal(pool.counts[rows[2]], bincount([7, 49]))
    assert pool.prompt_mask[rows[2]].nonzero().flatten().tolist() == [6, 7]
    pool.accumulate(rows[[0, 2]], torch.tensor([4, 0]))
    a.output_ids.append(4)
    c.output_ids.append(0)
    again = pool.rows([c, a])  # same rows, not refilled
    assert again.tolist() == [int(rows[2]), int(rows[0])]
    assert torch.equal(pool.counts[rows[0]], bincount(a.output_ids))
    assert torch.equal(pool.counts[rows[2]], bincount([7, 49, 0]))
    assert not pool.counts[ZERO_ROW].any() and not pool.prompt_mask[ZERO_ROW].any()

    assert pool.live_rows == 2
    a.finished_reason = {"type": "length"}
    assert pool.live_rows == 1
    d = fake_req([9], [8], presence_penalty=1.0)
    (row_d,) = pool.rows([d]).tolist()
    assert row_d == int(rows[0]) and pool.rows_in_use == 2  # a's row, refilled for d: no stale counts
    assert torch.equal(pool.counts[row_d], bincount([8]))
    assert pool.prompt_mask[row_d].nonzero().flatten().tolist() == [9]


def test_growth_keeps_rows_and_a_new_request_needs_its_ids_on_the_host():
    pool = PenaltyCounts(VOCAB, CPU)
    reqs = [fake_req([i], [i, i + 1], frequency_penalty=1.0) for i in range(9)]
    rows = pool.rows(reqs[:3])
    pool.accumulate(rows, torch.tensor([0, 1, 2]))
    rows_all = pool.rows(reqs)  # grows twice; the first three keep their rows and counts
    assert rows_all[:3].tolist() == rows.tolist() and pool.counts.shape[0] >= 10
    for i, r in enumerate(reqs):
        extra = [i] if i < 3 else []
        assert torch.equal(pool.counts[rows_all[i]], bincount([i, i + 1] + extra)), i
    with pytest.raises(ValueError, match="inflight"):
        pool.rows([fake_req([1], [2], frequency_penalty=1.0)], inflight_tokens=1)
    assert pool.rows(reqs, inflight_tokens=1).tolist() == rows_all.tolist()  # known rows need no host ids


def penalty_workload(s, rng: random.Random, n: int = 60) -> Dict[str, SamplingParams]:
    """Penalized requests of every kind beside plain ones; greedy or seeded, so both schedules must agree."""
    params = {}
    for i in range(n):
        kind = i % 5
        sp = SamplingParams(
            max_new_tokens=rng.choice([1, 6, 24, 60]), ignore_eos=True,
            temperature=0.0 if i % 2 else 0.9, sampling_seed=None if i % 2 else i,
            frequency_penalty=1.5 if kind in (0, 3) else 0.0, presence_penalty=1.0 if kind == 1 else 0.0,
            repetition_penalty={2: 1.8, 3: 0.7}.get(kind, 1.0),
        )
        sp.verify()
        sp.normalize()
        # A small vocabulary slice makes repeats (and so the penalties) matter.
        ids = [rng.randrange(100, 160) for _ in range(rng.choice([5, 40, 300]))]
        s.process_input(TokenizedGenerateReqInput(str(i), None, ids, sp))
        params[str(i)] = sp
    return params


def record_sampling(monkeypatch) -> List[tuple]:
    """Each sampling info built, with its requests' rids and host state at that moment."""
    seen = []
    original = ScheduleBatch.sampling_info

    def spy(self, inflight_tokens: int = 0):
        info = original(self, inflight_tokens)
        seen.append(([r.rid for r in self.reqs], [list(r.origin_input_ids) for r in self.reqs],
                     [r.mid_prompt_chunk for r in self.reqs], info))
        return info

    monkeypatch.setattr(ScheduleBatch, "sampling_info", spy)
    return seen


def run(tmp_path, monkeypatch, overlap: bool, **kw):
    """penalty_workload through a scheduler (make_scheduler's keywords `kw`), every sampling info recorded."""
    kw = {"max_total_tokens": 1024, "page_size": 4, "chunked_prefill_size": 128, "max_running_requests": 16,
          **kw}
    s = make_scheduler(tmp_path, disable_overlap_schedule=not overlap, **kw)
    params = penalty_workload(s, random.Random(3))
    seen = record_sampling(monkeypatch)
    launches = []
    original_launch = s.launch_batch

    def launch(batch, inflight_tokens=0, before_sampling=None):
        launches.append((inflight_tokens, before_sampling is not None,
                         any(r.sampling_params.uses_penalties for r in batch.reqs)))
        return original_launch(batch, inflight_tokens, before_sampling)

    s.launch_batch = launch
    outputs: Dict[str, List[int]] = {}
    finished = run_until_idle(s, outputs=outputs)
    monkeypatch.undo()
    return s, params, seen, launches, finished, outputs


def check_counts(seen, params: Dict[str, SamplingParams], outputs: Dict[str, List[int]]) -> tuple:
    """Every recorded batch's counts and prompt masks against the ids each request streamed before that step;
    returns (rows checked, rows that were a mid-prompt chunk)."""
    checked = chunks = 0
    for rids, prompts, chunked, info in seen:
        if info.output_token_counts is None:
            continue
        counts = info.output_token_counts.cpu().to(torch.int64)
        masks = None if info.prompt_token_mask is None else info.prompt_token_mask.cpu()
        for i, rid in enumerate(rids):
            if not params[rid].uses_penalties:
                assert not counts[i].any()
                continue
            k = int(info.positions[i])  # outputs sampled before this step's token
            want = torch.bincount(torch.tensor(outputs[rid][:k], dtype=torch.int64), minlength=info.vocab_size)
            assert torch.equal(counts[i], want), (rid, k)
            if masks is not None:
                assert set(masks[i].nonzero().flatten().tolist()) == set(prompts[i]), rid
            checked += 1
            chunks += chunked[i]
    return checked, chunks


@pytest.mark.parametrize("overlap", [True, False])
def test_device_counts_equal_the_streamed_ids_at_every_step(tmp_path, monkeypatch, overlap):
    s, params, seen, launches, finished, outputs = run(tmp_path, monkeypatch, overlap)
    assert {rid: n for rid, (_, n) in finished.items()} == {rid: sp.max_new_tokens for rid, sp in params.items()}
    assert s.internal_state()["num_retracted_reqs"] > 0 and s.internal_state()["kv_leak_free"]
    checked, chunks = check_counts(seen, params, outputs)
    assert checked > 300 and chunks > 0
    if overlap:  # penalized decode steps overlap like any other (no split, one token in flight)
        assert not any(split for _, split, _ in launches)
        assert sum(1 for inflight, _, pen in launches if inflight and pen) > 20
    pool = s.runner.penalty_counts
    assert s.internal_state()["penalty_rows_live"] == 0 and pool.rows_in_use > 0  # finished, not yet swept
    assert pool.counts.shape[0] > 8 and pool.rows([]).numel() == 0
    assert pool.rows_in_use == 0 and pool.counts.shape[0] == 1  # every row taken back, the memory too


def test_penalized_tokens_are_the_same_under_both_schedules(tmp_path, monkeypatch):
    (tmp_path / "sync").mkdir()
    (tmp_path / "ovl").mkdir()
    _, params, _, _, fin_sync, out_sync = run(tmp_path / "sync", monkeypatch, False)
    _, _, _, _, fin_ovl, out_ovl = run(tmp_path / "ovl", monkeypatch, True)
    assert out_sync == out_ovl and fin_sync == fin_ovl
    # The penalties did act: a frequency-penalized greedy request repeats far less than an unpenalized one.
    def repeats(rids):
        return sum(len(out_sync[r]) - len(set(out_sync[r])) for r in rids)
    greedy_long = [r for r, sp in params.items() if sp.max_new_tokens == 60 and sp.is_greedy]
    freq = [r for r in greedy_long if params[r].frequency_penalty > 0]
    plain = [r for r in greedy_long if not params[r].uses_penalties]
    assert freq and plain and repeats(freq) / len(freq) < repeats(plain) / len(plain)
    assert Counter(len(out_sync[r]) for r in freq) == Counter({60: len(freq)})


def test_penalized_grammar_requests_in_split_steps(tmp_path, monkeypatch):
    """A request with a grammar samples in a split step (after the previous step's ids reach the host): its
    penalty counts, and those of the penalized free requests batched with it, still follow the streamed ids."""
    pytest.importorskip("xgrammar")
    s = make_scheduler(tmp_path, max_total_tokens=4096, chunked_prefill_size=64)
    params = {}
    for i in range(8):
        constraint = {"regex": r"[0-9]{2,12}(yes|no)"} if i % 2 else {"ignore_eos": True}
        sp = SamplingParams(max_new_tokens=24, temperature=0.0 if i % 4 < 2 else 0.8, sampling_seed=i,
                            frequency_penalty=1.0, repetition_penalty=1.3 if i % 3 else 1.0, **constraint)
        sp.verify()
        sp.normalize()
        s.process_input(TokenizedGenerateReqInput(str(i), None, list(range(100, 130 + 40 * (i % 3))), sp))
        params[str(i)] = sp
    seen = record_sampling(monkeypatch)
    split = []
    real_launch = s.launch_batch
    s.launch_batch = lambda batch, *a, **kw: split.append(kw.get("before_sampling")) or real_launch(batch, *a, **kw)
    outputs: Dict[str, List[int]] = {}
    finished = run_until_idle(s, outputs=outputs)
    assert len(finished) == 8 and s.internal_state()["kv_leak_free"]
    assert sum(f is not None for f in split) > 5  # the grammar's steps were split
    checked, _ = check_counts(seen, params, outputs)
    assert checked > 100
    for rid, sp in params.items():
        if sp.regex:  # at most 14 tokens: every one ends on the grammar's stop token, its text matching
            assert finished[rid][0]["type"] == "stop", (rid, finished[rid])
            assert re.fullmatch(r"[0-9]{2,12}(yes|no)", s.tokenizer.decode(outputs[rid][:-1])), rid

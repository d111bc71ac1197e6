"""The overlap schedule on CUDA: a real asynchronous device, pinned host copies behind events, decode input
ids read on the device inside CUDA graphs.

  * The same requests give the same tokens with and without overlap (greedy and seeded rows), with each
    default-sized backend, nothing is streamed twice and no KV leaks.
  * Forming and launching an overlapped decode step never waits for the device: it runs under
    torch.cuda.set_sync_debug_mode("error"), which raises on any synchronizing call.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from benchmark.engine_utils import synthetic_tokenizer

from sglx.test.scheduler_utils import TINY_LLAMA, make_scheduler, run_both_schedules, submit

LLAMA = {**TINY_LLAMA, "hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4,
         "num_key_value_heads": 2, "head_dim": 64, "torch_dtype": "float32"}


def _make(tmp_path, backend, page_size, **kw):
    # The GPU host has no default model: a word-level tokenizer over the ids stands in (no stop strings here).
    return make_scheduler(tmp_path, LLAMA, device="cuda", attention_backend=backend, page_size=page_size,
                          tokenizer_path=synthetic_tokenizer(LLAMA["vocab_size"]),
                          max_total_tokens=8192, max_running_requests=16, cuda_graph_max_bs=16,
                          mem_fraction_static=0.5, **kw)


@pytest.mark.parametrize("backend,page_size", [(None, 1), ("triton", 16), ("flashinfer", 16)])
def test_overlap_matches_sync_on_cuda(tmp_path, backend, page_size):
    results = run_both_schedules(lambda **kw: _make(tmp_path, backend, page_size, **kw))
    (fin_sync, out_sync, deterministic, _), (fin_ovl, out_ovl, _, s) = results[False], results[True]
    assert s.enable_overlap and s.runner.cuda_graph_runner is not None
    for finished, sched in ((fin_sync, results[False][3]), (fin_ovl, s)):
        assert len(finished) == 40 and sched.internal_state()["kv_leak_free"]
    mismatched = [rid for rid in sorted(deterministic) if out_ovl[rid] != out_sync[rid]]
    assert not mismatched, {rid: (out_sync[rid], out_ovl[rid]) for rid in mismatched}


@pytest.mark.parametrize("backend,page_size", [(None, 1), ("triton", 16), ("flashinfer", 16)])
def test_overlapped_launch_never_syncs(tmp_path, backend, page_size, monkeypatch):
    s = _make(tmp_path, backend, page_size)
    checked = {"steps": 0}
    real_can_overlap, real_next, real_launch = s.can_overlap, s.get_next_batch_to_run, s.launch_batch
    state = {"overlapping": False}

    def can_overlap(prev):
        state["overlapping"] = real_can_overlap(prev)
        return state["overlapping"]

    def guarded(fn):
        def wrapper(*a, **kw):
            ctx = _sync_errors() if state["overlapping"] else contextlib.nullcontext()
            with ctx:
                return fn(*a, **kw)
        return wrapper

    def launch(batch, inflight_tokens=0, **kw):
        out = guarded(real_launch)(batch, inflight_tokens, **kw)
        if state["overlapping"]:
            checked["steps"] += 1
        state["overlapping"] = False
        return out

    monkeypatch.setattr(s, "can_overlap", can_overlap)
    monkeypatch.setattr(s, "get_next_batch_to_run", guarded(real_next))
    monkeypatch.setattr(s, "launch_batch", launch)
    for i in range(8):  # admitted in one prefill, then decoding together
        submit(s, str(i), list(range(100 + i, 140 + 7 * i)), 24)
    while not s.is_idle():
        s.step()
        s.send_to_detokenizer.msgs.clear()
    assert checked["steps"] > 10  # the steady-state decode steps did overlap, and none of them synced


@contextlib.contextmanager
def _sync_errors():
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_penalty_counts_on_cuda(tmp_path, monkeypatch):
    """Penalized requests under both schedules on CUDA (chunked prefill, CUDA graphs): the device counts equal
    the streamed ids at every step, penalized decode steps overlap, and both schedules give the same tokens."""
    from test.unit.test_penalty_counts import check_counts, run

    outputs = {}
    for overlap in (False, True):
        (tmp_path / str(overlap)).mkdir()
        s, params, seen, launches, finished, outputs[overlap] = run(
            tmp_path / str(overlap), monkeypatch, overlap, config=LLAMA, device="cuda", max_total_tokens=8192,
            tokenizer_path=synthetic_tokenizer(LLAMA["vocab_size"]), mem_fraction_static=0.5,
            cuda_graph_max_bs=16)
        assert s.runner.cuda_graph_runner is not None and s.internal_state()["kv_leak_free"]
        checked, chunks = check_counts(seen, params, outputs[overlap])
        assert checked > 300 and chunks > 0
        if overlap:
            assert not any(split for _, split, _ in launches)
            assert sum(1 for inflight, _, pen in launches if inflight and pen) > 20
    assert outputs[True] == outputs[False]

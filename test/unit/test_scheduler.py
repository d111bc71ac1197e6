"""The scheduler under memory pressure, in-process, on a tiny random-weight Llama (fast).

200 mixed requests (shared prefixes, long prompts, chunked prefill) against a 1536-token pool: every request
finishes with exactly its max_new_tokens, requests get retracted and resumed, and once idle every KV slot is
free or held by the prefix cache. The overlap schedule (the default, driven through Scheduler.step) gives the
synchronous schedule's tokens.
"""

from __future__ import annotations

import random

import pytest

from sglx.srt.managers.io_struct import AbortReq
from sglx.test.scheduler_utils import make_scheduler, run_both_schedules, run_until_idle, submit


@pytest.mark.parametrize("page_size,radix,chunk", [(1, True, 256), (16, True, 256), (4, False, 128), (1, True, -1)])
def test_pressure_completes_everything_without_leaks(tmp_path, page_size, radix, chunk):
    s = make_scheduler(tmp_path, max_total_tokens=1536, page_size=page_size, chunked_prefill_size=chunk,
                       max_running_requests=24, schedule_policy="lpm", disable_radix_cache=not radix)
    rng = random.Random(page_size)
    shared = [rng.randrange(100, 40000) for _ in range(150)]
    want = {}
    for i in range(200):
        ids = (shared if i % 3 == 0 else []) + [rng.randrange(100, 40000) for _ in range(rng.choice([3, 20, 150, 500]))]
        want[str(i)] = rng.choice([1, 8, 32, 96])
        submit(s, str(i), ids, want[str(i)])
    finished = run_until_idle(s)
    assert {rid: n for rid, (_, n) in finished.items()} == want
    assert all(fr["type"] == "length" for fr, _ in finished.values())
    state = s.internal_state()
    assert state["num_retracted_reqs"] > 0
    assert state["kv_leak_free"] and state["protected_kv_tokens"] == 0
    assert state["available_kv_tokens"] + state["evictable_kv_tokens"] == state["max_total_num_tokens"]


def test_schedule_conservativeness_scales_the_decode_reservation(tmp_path):
    """--schedule-conservativeness scales the share of max_new_tokens that admission reserves for decoding:
    below 1 the scheduler admits more and retracts more, above 1 fewer. The ratio decays as decode runs and
    starts over once the scheduler is idle (SGLang's scheme)."""
    retracted = {}
    for c in (0.3, 1.0, 3.0):
        (tmp_path / str(c)).mkdir()
        s = make_scheduler(tmp_path / str(c), max_total_tokens=1536, page_size=4, max_running_requests=24,
                           schedule_conservativeness=c)
        assert s.new_token_ratio == pytest.approx(min(0.7 * c, 1.0)) == s.init_new_token_ratio
        rng = random.Random(5)
        for i in range(60):
            submit(s, str(i), [rng.randrange(100, 40000) for _ in range(rng.choice([10, 40]))], rng.choice([32, 96]))
        for _ in range(40):
            s.step()
        assert s.new_token_ratio != s.init_new_token_ratio  # decayed, or raised by a retraction
        run_until_idle(s)
        assert s.new_token_ratio == s.init_new_token_ratio  # idle: back to the start
        state = s.internal_state()
        assert state["kv_leak_free"]
        retracted[c] = state["num_retracted_reqs"]
    assert retracted[0.3] > retracted[1.0] >= retracted[3.0], retracted


def test_prefix_reuse_and_abort(tmp_path):
    s = make_scheduler(tmp_path, max_total_tokens=4096, page_size=16, chunked_prefill_size=64)
    prefix = list(range(1000, 1500))
    submit(s, "a", prefix + [7, 8, 9], 4)
    run_until_idle(s)
    submit(s, "b", prefix + [10, 11], 4)
    run_until_idle(s)
    submit(s, "c", prefix + [12], 2)
    batch = s.get_next_batch_to_run()
    assert batch.reqs[0].cached_tokens == 496  # the 500-token prefix, page aligned (16)
    s.run_batch(batch)
    run_until_idle(s)
    # Abort a long request mid-decode: it finishes as aborted and its KV is released.
    submit(s, "d", list(range(2000, 2100)), 1000)
    for _ in range(5):
        s.run_batch(s.get_next_batch_to_run())
    s.process_input(AbortReq(rids=["d"]))
    finished = run_until_idle(s)
    assert finished["d"][0]["type"] == "abort" and finished["d"][1] < 1000
    assert s.internal_state()["kv_leak_free"]
    # A queued request aborted before it ran counts too; finished ones do not.
    submit(s, "e", [5, 6, 7], 4)
    s.process_input(AbortReq(rids=["e"]))
    (msg,) = s.send_to_detokenizer.msgs
    assert msg.rids == ["e"] and msg.finished_reasons[0]["type"] == "abort" and s.is_idle()
    assert s.internal_state()["num_aborted_reqs"] == 2
    # An abort names its rids exactly (the tokenizer manager resolved "f" to the samples made from it); other
    # rids, even ones that start the same way, run on.
    s.send_to_detokenizer.msgs.clear()
    for rid in ("f-0", "f-1", "f2", "g"):
        submit(s, rid, [5, 6, 7], 4)
    s.process_input(AbortReq(rids=["f", "f-0", "f-1"]))
    assert sorted(r for m in s.send_to_detokenizer.msgs for r in m.rids) == ["f-0", "f-1"]
    assert sorted(r.rid for r in s.waiting_queue) == ["f2", "g"]
    run_until_idle(s)


def test_prefill_batch_respects_max_prefill_tokens(tmp_path):
    """Many long prompts: a prefill batch stays within --max-prefill-tokens (a longer prompt runs alone)."""
    s = make_scheduler(tmp_path, max_prefill_tokens=256, max_total_tokens=8192)
    submit(s, "long", list(range(1, 601)), 2)  # longer than the budget: admitted alone, not chunked
    for i in range(5):
        submit(s, f"r{i}", list(range(1 + i, 201 + i)), 2)
    sizes = []
    while not s.is_idle():
        batch = s.get_next_batch_to_run()
        if batch.forward_mode.is_extend():
            sizes.append(sum(len(r.fill_ids) - len(r.prefix_indices) for r in batch.reqs))
        s.run_batch(batch)
        s.send_to_detokenizer.msgs.clear()
    assert sizes[0] == 600 and all(n <= 256 for n in sizes[1:]), sizes


def test_overlap_schedule_matches_the_synchronous_one(tmp_path):
    """The same requests give the same tokens with and without the overlap schedule (greedy and seeded rows;
    the unseeded sampled rows depend on the batch's random draws), nothing is streamed twice, no KV leaks."""
    results = run_both_schedules(lambda **kw: make_scheduler(tmp_path, max_total_tokens=4096, page_size=4,
                                                              max_running_requests=16, **kw))
    (fin_sync, out_sync, deterministic, _), (fin_ovl, out_ovl, _, s) = results[False], results[True]
    assert s.enable_overlap and len(deterministic) > 20
    for finished, sched in ((fin_sync, results[False][3]), (fin_ovl, s)):
        assert len(finished) == 40 and sched.internal_state()["kv_leak_free"]
    for rid in sorted(deterministic):
        assert fin_ovl[rid] == fin_sync[rid], rid
        assert out_ovl[rid] == out_sync[rid], rid

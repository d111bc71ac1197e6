"""sglx.Engine: the same scheduler in-process (no HTTP), against the HTTP server's outputs."""

from __future__ import annotations

import pytest
import requests

import sglx

PROMPTS = ["The capital of France is", "def add(a, b):", "Once upon a time"]
SP = {"max_new_tokens": 12, "temperature": 0}


def test_engine_generate_matches_server(server):
    want = [requests.post(server.url("/generate"), json={"text": p, "sampling_params": SP}, timeout=120).json()
            for p in PROMPTS]
    engine = sglx.Engine(max_total_tokens=4096)
    try:
        single = engine.generate(PROMPTS[0], SP)
        assert single["output_ids"] == want[0]["output_ids"] and single["text"] == want[0]["text"]
        batch = engine.generate(PROMPTS, SP)
        assert [b["output_ids"] for b in batch] == [w["output_ids"] for w in want]
        chunks = list(engine.generate(PROMPTS[2], SP, stream=True))
        assert chunks[-1]["text"] == want[2]["text"] and len(chunks) > 1
        assert chunks[-1]["meta_info"]["finish_reason"]["type"] == "length"
        info = engine.get_server_info()
        assert info["internal_state"]["kv_leak_free"]
    finally:
        engine.shutdown()
    assert all(not p.is_alive() for p in engine.procs)


def test_engine_raises_instead_of_hanging_when_the_scheduler_dies(caplog):
    import os
    import signal
    import time

    import pytest

    engine = sglx.Engine(max_total_tokens=4096)
    try:
        sched = next(p for p in engine.procs if p.name == "sglx::scheduler")
        stream = engine.generate("Count to one thousand:", {"max_new_tokens": 2000, "temperature": 0,
                                                              "ignore_eos": True}, stream=True)
        next(stream)
        os.kill(sched.pid, signal.SIGKILL)
        t0 = time.time()
        with pytest.raises(RuntimeError, match="died"):
            for _ in stream:
                pass
        assert time.time() - t0 < 30
    finally:
        engine.shutdown()
    assert all(not p.is_alive() for p in engine.procs)


def test_engine_shutdown_is_not_reported_as_a_death(caplog):
    import time

    engine = sglx.Engine(max_total_tokens=4096)
    engine.shutdown()
    time.sleep(1.5)  # three watchdog periods
    assert "died" not in caplog.text
    # Its zmq context is terminated at shutdown, not left to a garbage-collector pass (where it can hang).
    assert engine.tokenizer_manager.zmq_ctx.closed
    engine.shutdown()  # twice is harmless
    # Use after shutdown says so, before any work is queued (it was "Event loop is closed", and coroutines
    # never awaited).
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a coroutine never awaited would warn
        for call in (lambda: engine.generate("hi", {"max_new_tokens": 2}), engine.flush_cache,
                     engine.get_server_info, lambda: engine.encode("hi")):
            with pytest.raises(RuntimeError, match="has been shut down"):
                call()

"""The scheduler's torch profiler (/start_profile, /stop_profile) on an in-process CPU scheduler."""

from __future__ import annotations

import gzip
import json

import pytest

from sglx.srt.managers.io_struct import ProfileReq, ProfileReqOutput
from sglx.srt.managers.scheduler_profiler import PROFILER_DIR_ENV
from sglx.test.scheduler_utils import make_scheduler, run_until_idle, submit


@pytest.fixture(scope="module")
def sched(tmp_path_factory):
    return make_scheduler(tmp_path_factory.mktemp("model"))


def _control(s, req: ProfileReq) -> ProfileReqOutput:
    s.process_input(req)
    out = s.send_to_tokenizer.msgs.pop()
    assert isinstance(out, ProfileReqOutput)
    return out


def _trace_names(path) -> set:
    with gzip.open(path, "rt") as f:
        return {e.get("name") for e in json.load(f)["traceEvents"]}


def _work(s, n: int = 3) -> None:
    for i in range(n):
        submit(s, f"r{i}", [5 + i, 6, 7, 8], 4)
    s.send_to_detokenizer.msgs.clear()
    run_until_idle(s)


def test_a_span_of_num_steps_stops_by_itself_and_writes_a_trace(sched, tmp_path):
    start = _control(sched, ProfileReq("start", output_dir=str(tmp_path), num_steps=2))
    assert start.success and start.trace_path.startswith(str(tmp_path)) and sched.profiler.active
    submit(sched, "a", [5, 6, 7, 8], 6)
    steps = 0
    while sched.profiler.active:  # the event loop's bookkeeping, as Scheduler.event_loop does it
        assert sched.step()
        sched.profiler.step()
        steps += 1
    assert steps == 2 and sched.profiler.active is False
    names = _trace_names(start.trace_path)
    assert {"sglx::get_next_batch", "sglx::launch_batch"} <= names
    run_until_idle(sched)
    assert not _control(sched, ProfileReq("stop")).success  # nothing left to stop


def test_start_then_stop_covers_the_work_between(sched, tmp_path, monkeypatch):
    monkeypatch.setenv(PROFILER_DIR_ENV, str(tmp_path / "env-dir"))
    start = _control(sched, ProfileReq("start", activities=["cpu"]))
    assert start.success and start.trace_path.startswith(str(tmp_path / "env-dir"))
    assert not _control(sched, ProfileReq("start")).success  # one span at a time
    _work(sched)
    stop = _control(sched, ProfileReq("stop"))
    assert stop.success and stop.trace_path == start.trace_path
    assert {"sglx::launch_batch", "sglx::wait_result", "sglx::process_result"} <= _trace_names(stop.trace_path)
    assert sched.internal_state()["kv_leak_free"]


@pytest.mark.parametrize("req", [
    ProfileReq("start", activities=["TPU"]), ProfileReq("start", activities=[]), ProfileReq("start", num_steps=0),
    ProfileReq("start", activities=["GPU"]),  # a CPU scheduler
    ProfileReq("pause"),
])
def test_bad_requests_are_refused_and_nothing_starts(sched, req):
    res = _control(sched, req)
    assert not res.success and res.message and not sched.profiler.active


def test_an_unwritable_output_dir_is_refused(sched, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    res = _control(sched, ProfileReq("start", output_dir=str(blocker / "sub")))
    assert not res.success and "output directory" in res.message and not sched.profiler.active

"""Process lifecycle: signals stop everything with no orphan; a dying child takes the server down loudly."""

from __future__ import annotations

import os
import signal
import time

import pytest

from test.e2e.conftest import start_server, stop_server


def children(pid: int):
    out = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            out += [int(c) for c in f.read().split()]
    return out


def engine_children(pid: int):
    """The scheduler and detokenizer (multiprocessing spawn children), not helpers like the resource tracker."""
    out = []
    for c in children(pid):
        with open(f"/proc/{c}/cmdline", "rb") as f:
            if b"spawn_main" in f.read():
                out.append(c)
    return out


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def wait_dead(pids, timeout=30.0) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if not any(alive(p) for p in pids):
            return True
        time.sleep(0.2)
    return False


SMALL = ["--max-total-tokens", "2048"]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_everything(tmp_path, sig):
    h = start_server(SMALL, tmp_path, f"sig{int(sig)}")
    try:
        kids = children(h.proc.pid)
        assert len(engine_children(h.proc.pid)) == 2  # scheduler + detokenizer
        h.proc.send_signal(sig)
        h.proc.wait(60)
        assert wait_dead(kids), "a child process outlived the server"
    finally:
        stop_server(h)


def test_dead_child_takes_server_down(tmp_path):
    h = start_server(SMALL, tmp_path, "childdeath")
    try:
        kids = children(h.proc.pid)
        os.kill(engine_children(h.proc.pid)[0], signal.SIGKILL)
        rc = h.proc.wait(60)
        assert rc != 0
        assert "died with exit code" in h.log()
        assert wait_dead(kids)
    finally:
        stop_server(h)


@pytest.mark.parametrize("flags,rc,needle", [
    (["--max-running-requests", "0"], 2, "--max-running-requests must be >= 1"),  # once: a server that hung
    (["--context-length", "0"], 2, "--context-length must be >= 2"),
    (["--attention-backend", "fa3"], 1, "needs a CUDA GPU"),  # once: a traceback after the model had loaded
    (["--tokenizer-path", "/nonexistent/tok"], 1, "no such file or directory"),
])
def test_bad_launches_fail_fast_and_plainly(flags, rc, needle):
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(["python", os.environ.get("PYTHONPATH", "")])}
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "sglx.launch_server", "--device", "cpu", "--port", "30999", *flags],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == rc, proc.stderr[-2000:]
    assert needle in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert time.time() - t0 < 60  # before any model loads (a load takes ~15 s here; import alone a few)

"""Real sglx servers on the real default model, shared across e2e tests.

Every test that uses a server is followed by a check of the memory invariant: once the server is idle,
every KV slot is free or held by the prefix cache (`kv_leak_free` in /get_server_info).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional

import pytest
import requests

from sglx.srt.utils import free_port

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 300


@dataclass
class ServerHandle:
    base_url: str
    proc: subprocess.Popen
    log_path: Path

    def url(self, path: str) -> str:
        return self.base_url + path

    def server_info(self) -> dict:
        r = requests.get(self.url("/get_server_info"), timeout=30)
        r.raise_for_status()
        return r.json()

    def wait_idle(self, timeout: float = 60.0) -> dict:
        deadline = time.time() + timeout
        state = self.server_info()["internal_state"]
        while not state["is_idle"] and time.time() < deadline:
            time.sleep(0.2)
            state = self.server_info()["internal_state"]
        return state

    def assert_no_leak(self) -> None:
        state = self.wait_idle()
        assert state["is_idle"], state
        assert state["kv_leak_free"], state
        assert state["available_kv_tokens"] + state["evictable_kv_tokens"] == state["max_total_num_tokens"], state
        assert state["protected_kv_tokens"] == 0, state
        assert state["penalty_rows_live"] == 0, state
        deadline = time.time() + 10  # an aborted request's last message may still be on its way
        while state["tokenizer_reqs"] and time.time() < deadline:
            time.sleep(0.1)
            state = self.server_info()["internal_state"]
        assert state["tokenizer_reqs"] == 0, state  # every rid, abandoned ones too, released

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def start_server(extra_args: List[str], tmp_dir: Path, name: str) -> ServerHandle:
    port = free_port()
    log_path = tmp_dir / f"{name}.log"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = str(REPO / "python") + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "sglx.launch_server", "--port", str(port), *extra_args]
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    handle = ServerHandle(f"http://127.0.0.1:{port}", proc, log_path)
    deadline = time.time() + START_TIMEOUT_S
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{handle.log()[-4000:]}")
        try:
            if requests.get(handle.url("/health_generate"), timeout=30).status_code == 200:
                return handle
        except requests.RequestException:
            pass
        time.sleep(1)
    stop_server(handle)
    raise RuntimeError(f"server did not become healthy in {START_TIMEOUT_S}s:\n{handle.log()[-4000:]}")


def stop_server(handle: ServerHandle) -> Optional[int]:
    if handle.proc.poll() is None:
        handle.proc.terminate()
        try:
            handle.proc.wait(30)
        except subprocess.TimeoutExpired:
            handle.proc.kill()
            handle.proc.wait(10)
    return handle.proc.returncode


@pytest.fixture(scope="session")
def server(tmp_path_factory) -> Iterator[ServerHandle]:
    handle = start_server(["--max-total-tokens", "16384", "--chunked-prefill-size", "512", "--enable-metrics"],
                          tmp_path_factory.mktemp("server"), "default")
    yield handle
    stop_server(handle)


@pytest.fixture(autouse=True)
def _no_kv_leak(request):
    yield
    if "server" in request.fixturenames:
        request.getfixturevalue("server").assert_no_leak()

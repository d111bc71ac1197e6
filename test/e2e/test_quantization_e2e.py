"""`--quantization fp8` through the real server on the CPU (the torch reference path): the flag reaches the
scheduler, /get_server_info reports it, and greedy first tokens equal the unquantized server's on prompts
whose next token is clear; a method that does not exist stops the launch with a message naming the choices."""

from __future__ import annotations

import pytest
import requests

from test.e2e.conftest import start_server, stop_server  # noqa: E402

PROMPTS = ["The capital of France is", "def fibonacci(n):\n    if n < 2:\n        return", "1, 2, 3, 4, 5,"]


@pytest.fixture(scope="module")
def fp8_server(tmp_path_factory):
    handle = start_server(["--quantization", "fp8", "--max-total-tokens", "4096"],
                          tmp_path_factory.mktemp("fp8"), "fp8")
    yield handle
    stop_server(handle)


def first_tokens(url: str) -> list:
    out = []
    for p in PROMPTS:
        r = requests.post(url, json={"text": p, "sampling_params": {"max_new_tokens": 1, "temperature": 0}},
                          timeout=300)
        r.raise_for_status()
        out.append(r.json()["text"])
    return out


def test_fp8_server_reports_the_method_and_keeps_greedy_first_tokens(fp8_server, server):
    info = requests.get(fp8_server.url("/get_server_info"), timeout=30).json()
    assert info["quantization"] == "fp8" and info["max_prefill_tokens"] == 16384
    assert requests.get(server.url("/get_server_info"), timeout=30).json()["quantization"] is None
    assert first_tokens(fp8_server.url("/generate")) == first_tokens(server.url("/generate"))


def test_unknown_method_stops_the_launch(tmp_path):
    with pytest.raises(RuntimeError, match="--quantization must be one of fp8"):
        start_server(["--quantization", "awq"], tmp_path, "awq")

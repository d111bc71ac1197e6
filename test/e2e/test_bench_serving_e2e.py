"""bench_serving against a live sglx server on the default model (the `server` fixture is in conftest.py)."""

from __future__ import annotations

from typing import Any

import pytest

from sglx import bench_serving

N_PROMPTS, IN_LEN, OUT_LEN = 8, 32, 16


@pytest.mark.parametrize("backend", ["sglx", "openai-chat"])
def test_bench_serving_live(server: Any, backend: str) -> None:
    args = bench_serving.parse_args([
        "--backend", backend, "--base-url", server.base_url, "--dataset-name", "random-ids",
        "--num-prompts", str(N_PROMPTS), "--random-input-len", str(IN_LEN), "--random-output-len", str(OUT_LEN),
        "--random-range-ratio", "1.0", "--seed", "0", "--disable-tqdm", "--output-details"])
    m = bench_serving.run_benchmark(args)

    assert m["completed"] == N_PROMPTS and m["failed"] == 0, m["failure_messages"]
    assert m["total_input_tokens"] == N_PROMPTS * IN_LEN
    # ignore_eos is on by default, so the server must produce exactly max_new_tokens per request.
    assert m["total_output_tokens"] == N_PROMPTS * OUT_LEN
    assert m["output_lens"] == [OUT_LEN] * N_PROMPTS
    assert m["total_output_tokens_retokenized"] > 0
    assert all(text for text in m["generated_texts"])

    dur = m["duration"]
    assert dur > 0
    assert m["request_throughput"] == pytest.approx(N_PROMPTS / dur)
    assert m["output_throughput"] == pytest.approx(N_PROMPTS * OUT_LEN / dur)
    assert m["input_throughput"] == pytest.approx(N_PROMPTS * IN_LEN / dur)
    assert 0 < m["max_output_tokens_per_s"] <= N_PROMPTS * OUT_LEN
    assert 1 <= m["max_concurrent_requests"] <= N_PROMPTS
    assert 0 < m["concurrency"] <= N_PROMPTS

    # Latencies: positive, ordered, and each request fits in the run.
    assert 0 < m["mean_ttft_ms"] <= m["mean_e2e_latency_ms"] <= dur * 1000
    assert m["max_e2e_latency_ms"] <= dur * 1000 + 1
    # Every request has OUT_LEN tokens, so mean TPOT is exactly (mean e2e - mean ttft) / (OUT_LEN - 1).
    assert m["mean_tpot_ms"] > 0
    assert m["mean_tpot_ms"] == pytest.approx((m["mean_e2e_latency_ms"] - m["mean_ttft_ms"]) / (OUT_LEN - 1))
    assert m["mean_itl_ms"] > 0 and m["max_itl_ms"] >= m["median_itl_ms"]
    for ttft, itls, e2e in zip(m["ttfts"], m["itls"], m["latencies"]):
        assert 0 < ttft <= e2e
        assert 0 < len(itls) <= OUT_LEN - 1  # streamed: several chunks, never more gaps than tokens after the 1st
        assert sum(itls) <= e2e - ttft + 1e-6

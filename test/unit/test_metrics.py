"""The /metrics text (--enable-metrics), read back with prometheus_client's own parser (the reference for the
exposition format), against values computed here from the observations."""

from __future__ import annotations

import math

import pytest
from prometheus_client.parser import text_string_to_metric_families

from sglx.srt.metrics.collector import Histogram, TokenizerMetricsCollector

STATE = {"num_running_reqs": 3, "num_waiting_reqs": 5, "max_total_num_tokens": 1000, "available_kv_tokens": 600,
         "evictable_kv_tokens": 150, "num_retracted_reqs": 2}


def parse(text: str) -> dict:
    """{sample name + sorted labels: value} and the family types."""
    samples, types = {}, {}
    for fam in text_string_to_metric_families(text):
        types[fam.name] = fam.type
        for s in fam.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return {"samples": samples, "types": types}


def value(parsed: dict, name: str, **labels) -> float:
    return parsed["samples"][(name, tuple(sorted({"model_name": 'my "model"', **labels}.items())))]


def test_requests_render_as_prometheus_reads_them():
    m = TokenizerMetricsCollector('my "model"')  # a name that needs escaping
    # Request A, streamed: first token after 0.3 s, then 4 tokens in one message 0.2 s later, then 1 more 0.05 s
    # after that.
    m.observe_output(0.3, 0.0, 0)
    m.observe_output(None, 0.2, 4)
    m.observe_output(None, 0.05, 1)
    m.observe_finished(0.6, prompt_tokens=10, completion_tokens=6, cached_tokens=4, aborted=False)
    # Request B, not streamed: its one message brings 3 tokens, the first made at 2.0 s, the message 0.4 s later;
    # then its client goes away.
    m.observe_output(2.0, 0.4, 2)
    m.observe_finished(2.5, prompt_tokens=30, completion_tokens=3, cached_tokens=0, aborted=True)
    p = parse(m.render(STATE))
    assert p["types"]["sglx:time_to_first_token_seconds"] == "histogram"
    assert p["types"]["sglx:prompt_tokens"] == "counter" and p["types"]["sglx:token_usage"] == "gauge"
    assert value(p, "sglx:prompt_tokens_total") == 40 and value(p, "sglx:generation_tokens_total") == 9
    assert value(p, "sglx:cached_tokens_total") == 4
    assert value(p, "sglx:num_requests_total") == 2 and value(p, "sglx:num_aborted_requests_total") == 1
    # TTFT: 0.3 and 2.0.
    assert value(p, "sglx:time_to_first_token_seconds_count") == 2
    assert value(p, "sglx:time_to_first_token_seconds_sum") == pytest.approx(2.3)
    assert value(p, "sglx:time_to_first_token_seconds_bucket", le="0.25") == 0
    assert value(p, "sglx:time_to_first_token_seconds_bucket", le="0.5") == 1
    assert value(p, "sglx:time_to_first_token_seconds_bucket", le="2.5") == 2
    assert value(p, "sglx:time_to_first_token_seconds_bucket", le="+Inf") == 2
    # ITL: A's 4 tokens 0.05 apart and 1 more 0.05 after; B's 2 later tokens 0.2 apart: 7 gaps, 0.65 s.
    assert value(p, "sglx:inter_token_latency_seconds_count") == 7
    assert value(p, "sglx:inter_token_latency_seconds_sum") == pytest.approx(0.65)
    assert value(p, "sglx:inter_token_latency_seconds_bucket", le="0.04") == 0
    assert value(p, "sglx:inter_token_latency_seconds_bucket", le="0.05") == 5
    assert value(p, "sglx:inter_token_latency_seconds_bucket", le="0.2") == 7
    assert value(p, "sglx:e2e_request_latency_seconds_sum") == pytest.approx(3.1)
    # Gauges from the scheduler's state: used = total - free - evictable.
    assert value(p, "sglx:num_running_reqs") == 3 and value(p, "sglx:num_queue_reqs") == 5
    assert value(p, "sglx:num_used_tokens") == 250 and value(p, "sglx:token_usage") == pytest.approx(0.25)
    assert value(p, "sglx:cache_hit_rate") == pytest.approx(4 / 40)  # (both ended within the window)
    assert value(p, "sglx:num_retracted_reqs") == 2


def test_throughput_and_hit_rate_cover_the_recent_window():
    now = [100.0]
    m = TokenizerMetricsCollector('my "model"', clock=lambda: now[0], window_s=30.0)
    now[0] = 110.0
    m.observe_output(0.5, 0.0, 0)  # 1 token
    m.observe_output(None, 1.0, 9)  # 9 more
    m.observe_finished(2.0, prompt_tokens=100, completion_tokens=10, cached_tokens=0, aborted=False)
    p = parse(m.render({**STATE, "num_grammar_queue_reqs": 4}))
    assert value(p, "sglx:gen_throughput") == pytest.approx(10 / 10)  # 10 tokens in the 10 s since start
    assert value(p, "sglx:cache_hit_rate") == 0 and value(p, "sglx:num_grammar_queue_reqs") == 4
    now[0] = 135.0
    m.observe_output(0.2, 0.5, 4)  # 5 tokens
    m.observe_finished(1.0, prompt_tokens=100, completion_tokens=5, cached_tokens=80, aborted=False)
    p = parse(m.render(STATE))
    assert value(p, "sglx:gen_throughput") == pytest.approx(15 / 30)
    assert value(p, "sglx:cache_hit_rate") == pytest.approx(80 / 200)
    now[0] = 141.0  # the first request's events are more than 30 s old now
    p = parse(m.render(STATE))
    assert value(p, "sglx:gen_throughput") == pytest.approx(5 / 30)
    assert value(p, "sglx:cache_hit_rate") == pytest.approx(80 / 100)
    assert value(p, "sglx:cached_tokens_total") == 80  # (the counters still count since start)


def test_histogram_buckets_are_cumulative_and_bounds_inclusive():
    h = Histogram("x", "doc", [1.0, 2.0])
    for v in (0.5, 1.0, 1.5, 2.0, 3.0, math.inf):
        h.observe(v)
    p = parse("\n".join(h.render({})) + "\n")["samples"]
    assert [p[("sglx:x_bucket", (("le", le),))] for le in ("1.0", "2.0", "+Inf")] == [2, 4, 6]
    assert p[("sglx:x_count", ())] == 6
    with pytest.raises(ValueError):
        Histogram("y", "doc", [2.0, 1.0])

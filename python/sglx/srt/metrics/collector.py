"""Prometheus metrics of the HTTP process (`--enable-metrics`, served at /metrics), named as SGLang's are.

Request-level metrics are measured where requests start and end, in the TokenizerManager: token counters, request
and abort counters, and histograms of time to first token, inter-token latency and end-to-end latency. The
scheduler's state (running and queued requests, KV token usage) is read from it at scrape time. Everything lives
in the one HTTP process, so plain in-memory counters suffice (no multiprocess registry). The text follows the
Prometheus exposition format 0.0.4 (`# HELP`, `# TYPE`, cumulative `_bucket{le=...}`, `_sum`, `_count`).
"""

from __future__ import annotations

import bisect
import math
import time
from collections import deque
from typing import Any, Callable, Deque, Dict, List, Optional, Sequence, Tuple

PREFIX = "sglx:"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Seconds. Wide enough for a CPU box (tens of seconds) and a GPU (milliseconds); as SGLang's, log-spaced.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                15.0, 20.0, 30.0, 40.0, 60.0, 120.0, 300.0)
ITL_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.06, 0.08, 0.1, 0.15, 0.2,
               0.3, 0.4, 0.5, 0.75, 1.0, 2.0, 5.0)
# Seconds over which gen_throughput and cache_hit_rate are measured (SGLang reports both per log interval).
RECENT_WINDOW_S = 30.0
E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 2400.0)


def _num(v: float) -> str:
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v))


def _labels(labels: Dict[str, str]) -> str:
    def esc(s: str) -> str:
        return s.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')

    return "{" + ",".join(f'{k}="{esc(str(v))}"' for k, v in labels.items()) + "}"


class Counter:
    def __init__(self, name: str, doc: str) -> None:
        self.name, self.doc, self.value = PREFIX + name, doc, 0.0

    def inc(self, amount: float = 1.0) -> None:
        if amount < 0:
            raise ValueError("a counter only goes up")
        self.value += amount

    def render(self, labels: Dict[str, str]) -> List[str]:
        return [f"# HELP {self.name} {self.doc}", f"# TYPE {self.name} counter",
                f"{self.name}{_labels(labels)} {_num(self.value)}"]


class Histogram:
    """Cumulative buckets at render time; observations are kept per bucket (the last one is +Inf)."""

    def __init__(self, name: str, doc: str, buckets: Sequence[float]) -> None:
        if list(buckets) != sorted(buckets):
            raise ValueError("histogram buckets must be increasing")
        self.name, self.doc, self.bounds = PREFIX + name, doc, list(buckets)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float, count: int = 1) -> None:
        """`count` observations of `value` (a stretch of tokens that arrived together, each `value` apart)."""
        self.counts[bisect.bisect_left(self.bounds, value)] += count
        self.sum += value * count

    @property
    def count(self) -> int:
        return sum(self.counts)

    def render(self, labels: Dict[str, str]) -> List[str]:
        lines = [f"# HELP {self.name} {self.doc}", f"# TYPE {self.name} histogram"]
        running = 0
        for bound, n in zip(self.bounds + [math.inf], self.counts):
            running += n
            lines.append(f"{self.name}_bucket{_labels({'le': _num(bound), **labels})} {_num(running)}")
        lines.append(f"{self.name}_sum{_labels(labels)} {_num(self.sum)}")
        lines.append(f"{self.name}_count{_labels(labels)} {_num(running)}")
        return lines


class RecentSums:
    """Sums of values recorded over the last `window_s` seconds."""

    def __init__(self, window_s: float, width: int) -> None:
        self.window_s = window_s
        self.width = width
        self.events: Deque[Tuple[float, Tuple[float, ...]]] = deque()

    def add(self, now: float, *values: float) -> None:
        self.events.append((now, values))

    def sums(self, now: float) -> List[float]:
        while self.events and self.events[0][0] < now - self.window_s:
            self.events.popleft()
        return [sum(v[k] for _, v in self.events) for k in range(self.width)]


def render_gauge(name: str, doc: str, value: float, labels: Dict[str, str]) -> List[str]:
    return [f"# HELP {PREFIX}{name} {doc}", f"# TYPE {PREFIX}{name} gauge", f"{PREFIX}{name}{_labels(labels)} {_num(value)}"]


class TokenizerMetricsCollector:
    """What the TokenizerManager records per request; `render` adds the scheduler's gauges."""

    def __init__(self, model_name: str, clock: Callable[[], float] = time.monotonic,
                 window_s: float = RECENT_WINDOW_S) -> None:
        self.labels = {"model_name": model_name}
        self.clock = clock
        self.started = clock()
        self.recent_tokens = RecentSums(window_s, 1)  # output tokens as they reach the manager
        self.recent_prompts = RecentSums(window_s, 2)  # (prompt tokens, cached tokens) of requests that ended
        self.prompt_tokens = Counter("prompt_tokens_total", "Number of prefill tokens processed.")
        self.generation_tokens = Counter("generation_tokens_total", "Number of generation tokens processed.")
        self.cached_tokens = Counter("cached_tokens_total", "Number of prompt tokens served from the prefix cache.")
        self.requests = Counter("num_requests_total", "Number of requests processed (finished or aborted).")
        self.aborted = Counter("num_aborted_requests_total", "Number of requests that were aborted.")
        self.ttft = Histogram("time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                              TTFT_BUCKETS)
        self.itl = Histogram("inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
                             ITL_BUCKETS)
        self.e2e = Histogram("e2e_request_latency_seconds", "Histogram of end-to-end request latency in seconds.",
                             E2E_BUCKETS)

    def observe_output(self, ttft: Optional[float], span: float, later_tokens: int) -> None:
        """One output message of a generation request: its time to first token if this message brings the first
        token, and `later_tokens` tokens after the first that arrived over `span` seconds (evenly spread)."""
        if ttft is not None:
            self.ttft.observe(ttft)
        self.recent_tokens.add(self.clock(), later_tokens + (ttft is not None))
        if later_tokens > 0:
            self.itl.observe(span / later_tokens, later_tokens)

    def observe_finished(self, e2e: float, prompt_tokens: int, completion_tokens: int, cached_tokens: int,
                         aborted: bool) -> None:
        self.requests.inc()
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(completion_tokens)
        self.cached_tokens.inc(cached_tokens)
        self.recent_prompts.add(self.clock(), prompt_tokens, cached_tokens)
        if aborted:
            self.aborted.inc()
        self.e2e.observe(e2e)

    def render(self, scheduler_state: Dict[str, Any]) -> str:
        lines: List[str] = []
        for metric in (self.prompt_tokens, self.generation_tokens, self.cached_tokens, self.requests, self.aborted,
                       self.ttft, self.itl, self.e2e):
            lines += metric.render(self.labels)
        lines += self._scheduler_gauges(scheduler_state)
        return "\n".join(lines) + "\n"

    def _scheduler_gauges(self, st: Dict[str, Any]) -> List[str]:
        total = float(st.get("max_total_num_tokens", 0) or 0)
        # Tokens held by running requests (protected) count as used; the evictable prefix cache does not.
        used = total - float(st.get("available_kv_tokens", 0)) - float(st.get("evictable_kv_tokens", 0))
        now = self.clock()
        (tokens,) = self.recent_tokens.sums(now)
        prompt, cached = self.recent_prompts.sums(now)
        span = min(self.recent_tokens.window_s, now - self.started)
        gauges = [
            ("num_running_reqs", "The number of running requests.", st.get("num_running_reqs", 0)),
            ("num_queue_reqs", "The number of requests in the waiting queue.", st.get("num_waiting_reqs", 0)),
            ("num_used_tokens", "The number of KV cache tokens held by running requests.", max(used, 0.0)),
            ("token_usage", "The fraction of the KV cache held by running requests.", max(used, 0.0) / total if total else 0.0),
            ("gen_throughput", f"Output tokens per second over the last {self.recent_tokens.window_s:g} s.",
             tokens / span if span > 0 else 0.0),
            ("cache_hit_rate", "Prompt tokens served from the prefix cache over all prompt tokens of the requests "
             f"that ended in the last {self.recent_prompts.window_s:g} s.", cached / prompt if prompt else 0.0),
            ("num_grammar_queue_reqs", "The number of requests waiting for their grammar to compile.",
             st.get("num_grammar_queue_reqs", 0)),
            ("num_retracted_reqs", "Requests retracted because the KV cache ran out (since start).",
             st.get("num_retracted_reqs", 0)),
        ]
        lines: List[str] = []
        for name, doc, value in gauges:
            lines += render_gauge(name, doc, float(value), self.labels)
        return lines

"""Serving metrics as `sglang.bench_serving` defines them, plus goodput and the result table."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Sequence

import numpy as np

from sglx.benchmark import BenchError
from sglx.benchmark.backends import RequestOutput

PERCENTILES = (90, 95, 99)
_GOODPUT_KEYS = {"ttft": "ttft", "tpot": "tpot", "e2e": "e2e", "e2el": "e2e"}


def parse_goodput(specs: Optional[Sequence[str]]) -> dict[str, float]:
    """`["ttft:100", "tpot:50", "e2e:1000"]` (ms) -> {"ttft": 100.0, ...}; vLLM's `e2el` is accepted too."""
    slos: dict[str, float] = {}
    for spec in specs or []:
        for item in spec.replace(",", " ").split():
            key, sep, value = item.partition(":")
            if not sep or key.lower() not in _GOODPUT_KEYS:
                raise BenchError(f"bad --goodput item {item!r}: expected ttft:MS, tpot:MS or e2e:MS")
            try:
                ms = float(value)
            except ValueError:
                raise BenchError(f"bad --goodput value in {item!r}: not a number") from None
            if ms < 0:
                raise BenchError(f"bad --goodput value in {item!r}: negative")
            slos[_GOODPUT_KEYS[key.lower()]] = ms
    return slos


@dataclass
class Stat:
    """Summary of one latency series, in milliseconds."""

    mean: float = 0.0
    median: float = 0.0
    std: float = 0.0
    p90: float = 0.0
    p95: float = 0.0
    p99: float = 0.0
    max: float = 0.0

    @classmethod
    def of_seconds(cls, values: Sequence[float]) -> "Stat":
        if len(values) == 0:
            return cls()
        ms = np.asarray(values, dtype=np.float64) * 1000.0
        p90, p95, p99 = np.percentile(ms, PERCENTILES)
        return cls(float(ms.mean()), float(np.median(ms)), float(ms.std()), float(p90), float(p95), float(p99),
                   float(ms.max()))


@dataclass
class BenchmarkMetrics:
    completed: int
    failed: int
    duration: float
    total_input_tokens: int
    total_output_tokens: int
    total_output_tokens_retokenized: int
    request_throughput: float
    input_throughput: float
    output_throughput: float
    output_throughput_retokenized: float
    total_throughput: float
    max_output_tokens_per_s: float
    max_concurrent_requests: int
    concurrency: float
    e2e_latency: Stat
    ttft: Stat
    tpot: Stat
    itl: Stat
    request_goodput: Optional[float] = None
    errors: list[str] = field(default_factory=list)

    def flat(self) -> dict[str, Any]:
        """SGLang's JSON key layout: mean_ttft_ms, p99_itl_ms, ..."""
        flat: dict[str, Any] = {}
        for key, value in asdict(self).items():
            if key == "errors":
                continue
            if isinstance(value, dict):
                for stat, v in value.items():
                    flat[f"{stat}_{key}_ms"] = v
            else:
                flat[key] = value
        return flat


def output_token_counts(outputs: Sequence[RequestOutput], tokenizer: Any) -> tuple[list[int], list[int]]:
    """(counted, retokenized) per request: the server's own count when it gave one, else the retokenized text."""
    counted, retok = [], []
    for out in outputs:
        if out.generated_text and tokenizer is not None:
            n_retok = len(tokenizer.encode(out.generated_text, add_special_tokens=False))
        else:
            n_retok = 0
        retok.append(n_retok)
        counted.append(out.server_output_len if out.server_output_len is not None else n_retok)
    return counted, retok


def peak_output_tokens_per_s(outputs: Sequence[RequestOutput], start: float) -> float:
    """Most output tokens whose chunk arrived within one 1-second bucket [k, k+1) of the run."""
    buckets: Counter[int] = Counter()
    for out in outputs:
        for ts, tokens in out.chunks:
            buckets[int(max(ts - start, 0.0))] += tokens
    return float(max(buckets.values(), default=0))


def peak_concurrency(outputs: Sequence[RequestOutput]) -> int:
    events = []
    for out in outputs:
        events += [(out.start_time, 1), (out.start_time + out.latency, -1)]
    # Ends sort before starts at the same instant, so back-to-back requests don't count as overlapping.
    events.sort(key=lambda e: (e[0], e[1]))
    level = peak = 0
    for _, delta in events:
        level += delta
        peak = max(peak, level)
    return peak


def _tpot(out: RequestOutput, output_len: int) -> Optional[float]:
    return (out.latency - out.ttft) / (output_len - 1) if output_len > 1 else None


def _is_good(out: RequestOutput, output_len: int, slos: dict[str, float]) -> bool:
    tpot = _tpot(out, output_len) or 0.0
    measured = {"ttft": out.ttft, "tpot": tpot, "e2e": out.latency}
    return all(measured[k] * 1000.0 <= v for k, v in slos.items())


def compute_metrics(outputs: Sequence[RequestOutput], duration: float, start_time: float, tokenizer: Any,
                    slos: Optional[dict[str, float]] = None) -> tuple[BenchmarkMetrics, list[int], list[int]]:
    """Returns the metrics and per-request (counted, retokenized) output lengths (0 for failed requests)."""
    counted, retok = output_token_counts(outputs, tokenizer)
    ok = [i for i, o in enumerate(outputs) if o.success]
    for i, out in enumerate(outputs):
        if not out.success:
            counted[i] = retok[i] = 0
    good = [outputs[i] for i in ok]
    total_in = sum(o.prompt_len for o in good)
    total_out = sum(counted[i] for i in ok)
    total_retok = sum(retok[i] for i in ok)
    tpots = [t for i in ok if (t := _tpot(outputs[i], counted[i])) is not None]
    dur = max(duration, 1e-9)
    goodput = None
    if slos:
        goodput = sum(_is_good(outputs[i], counted[i], slos) for i in ok) / dur
    metrics = BenchmarkMetrics(
        completed=len(ok),
        failed=len(outputs) - len(ok),
        duration=duration,
        total_input_tokens=total_in,
        total_output_tokens=total_out,
        total_output_tokens_retokenized=total_retok,
        request_throughput=len(ok) / dur,
        input_throughput=total_in / dur,
        output_throughput=total_out / dur,
        output_throughput_retokenized=total_retok / dur,
        total_throughput=(total_in + total_out) / dur,
        max_output_tokens_per_s=peak_output_tokens_per_s(good, start_time),
        max_concurrent_requests=peak_concurrency(good),
        concurrency=sum(o.latency for o in good) / dur,
        e2e_latency=Stat.of_seconds([o.latency for o in good]),
        ttft=Stat.of_seconds([o.ttft for o in good]),
        tpot=Stat.of_seconds(tpots),
        itl=Stat.of_seconds([gap for o in good for gap in o.itl]),
        request_goodput=goodput,
        errors=[o.error for o in outputs if not o.success],
    )
    return metrics, counted, retok


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "inf" if math.isinf(v) else f"{v:.2f}"
    return str(v)


def format_table(m: BenchmarkMetrics, header: dict[str, Any]) -> str:
    """The console report, laid out like SGLang's so eyes trained on it find things where they expect."""
    lines = ["{s:{c}^{n}}".format(s=" Serving Benchmark Result ", n=50, c="=")]

    def row(label: str, value: Any) -> None:
        lines.append(f"{label:<40} {_fmt(value):<10}")

    def section(title: str) -> None:
        lines.append("{s:{c}^{n}}".format(s=title, n=50, c="-"))

    for label, value in header.items():
        row(label, value)
    row("Successful requests:", m.completed)
    row("Failed requests:", m.failed)
    row("Benchmark duration (s):", m.duration)
    row("Total input tokens:", m.total_input_tokens)
    row("Total generated tokens:", m.total_output_tokens)
    row("Total generated tokens (retokenized):", m.total_output_tokens_retokenized)
    row("Request throughput (req/s):", m.request_throughput)
    if m.request_goodput is not None:
        row("Request goodput (req/s):", m.request_goodput)
    row("Input token throughput (tok/s):", m.input_throughput)
    row("Output token throughput (tok/s):", m.output_throughput)
    row("Peak output token throughput (tok/s):", m.max_output_tokens_per_s)
    row("Peak concurrent requests:", m.max_concurrent_requests)
    row("Total token throughput (tok/s):", m.total_throughput)
    row("Concurrency:", m.concurrency)
    for title, name, stat in (("End-to-End Latency", "E2E Latency", m.e2e_latency),
                              ("Time to First Token", "TTFT", m.ttft),
                              ("Time per Output Token (excl. 1st token)", "TPOT", m.tpot),
                              ("Inter-Token Latency", "ITL", m.itl)):
        section(title)
        row(f"Mean {name} (ms):", stat.mean)
        row(f"Median {name} (ms):", stat.median)
        row(f"Std {name} (ms):", stat.std)
        row(f"P90 {name} (ms):", stat.p90)
        row(f"P95 {name} (ms):", stat.p95)
        row(f"P99 {name} (ms):", stat.p99)
        if name == "ITL":
            row(f"Max {name} (ms):", stat.max)
    lines.append("=" * 50)
    return "\n".join(lines)

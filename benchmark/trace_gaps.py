"""Where the GPU waits: idle gaps in a scheduler trace (/start_profile, Engine.start_profile), and what the
scheduler was doing during them.

    python benchmark/trace_gaps.py /tmp/sglx-20261126-101500-pid123.trace.json.gz [--min-gap-us 20]

Reads the Chrome trace torch.profiler wrote. The GPU timeline is the union of its kernels, copies and memsets;
its gaps (at least --min-gap-us) are idle time. Each gap is charged to the scheduler phases (the `sglx::`
ranges of managers/scheduler_profiler.py) that overlap it, so "GPU idle while sglx::launch_batch" means the
GPU had run out of work while the host was still forming or launching the next step.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
from collections import defaultdict
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

GPU_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")
PHASE_PREFIX = "sglx::"
Interval = Tuple[float, float]


def _read(path: str) -> Any:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        return json.load(f)


def load_trace(path: str) -> List[Dict[str, Any]]:
    data = _read(path)
    return data["traceEvents"] if isinstance(data, dict) else data


def base_time_ns(path: str) -> Optional[int]:
    """The trace's `baseTimeNanoseconds`: an event's Unix time is base + ts * 1000 (ts in us), so the GPU's span
    can be set against wall times the caller took with time.time_ns(). None when the trace has no such key."""
    data = _read(path)
    base = data.get("baseTimeNanoseconds") if isinstance(data, dict) else None
    return int(base) if base is not None else None


def merge(intervals: Iterable[Interval]) -> List[Interval]:
    """The union of [start, end) intervals, sorted and disjoint."""
    out: List[Interval] = []
    for s, e in sorted(intervals):
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return out


def overlap(a: Interval, b: Interval) -> float:
    return max(0.0, min(a[1], b[1]) - max(a[0], b[0]))


def _spans(events: Sequence[Dict[str, Any]], keep) -> List[Tuple[str, Interval]]:
    return [(e.get("name", ""), (float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0))))
            for e in events if e.get("ph") == "X" and "ts" in e and keep(e)]


def summarize(events: Sequence[Dict[str, Any]], min_gap_us: float = 20.0, top: int = 10,
              base_ns: Optional[int] = None) -> Dict[str, Any]:
    """GPU busy time and idle gaps; with the trace's `base_ns`, also the Unix times of the GPU's first and last
    activity (gpu_first_ns, gpu_last_ns)."""
    gpu = merge(iv for _, iv in _spans(events, lambda e: e.get("cat") in GPU_CATEGORIES))
    if not gpu:
        return {"gpu_events": 0}
    span = {} if base_ns is None else {"gpu_first_ns": base_ns + round(gpu[0][0] * 1000),
                                        "gpu_last_ns": base_ns + round(gpu[-1][1] * 1000)}
    phases = _spans(events, lambda e: e.get("cat") == "user_annotation" and e.get("name", "").startswith(PHASE_PREFIX))
    window = gpu[-1][1] - gpu[0][0]
    busy = sum(e - s for s, e in gpu)
    gaps = [(a[1], b[0]) for a, b in zip(gpu, gpu[1:]) if b[0] - a[1] >= min_gap_us]
    by_phase: Dict[str, float] = defaultdict(float)
    listed = []
    for gap in gaps:
        names = {}
        for name, iv in phases:
            o = overlap(gap, iv)
            if o > 0:
                names[name] = names.get(name, 0.0) + o
        for name, o in names.items():
            by_phase[name] += o
        listed.append({"start_ms": (gap[0] - gpu[0][0]) / 1e3, "idle_us": gap[1] - gap[0],
                       "phases_us": {k: round(v, 1) for k, v in sorted(names.items(), key=lambda kv: -kv[1])}})
    launches = sorted(iv[0] for name, iv in phases if name == PHASE_PREFIX + "launch_batch")
    return {
        "gpu_events": len(gpu), "window_ms": window / 1e3, "gpu_busy_ms": busy / 1e3,
        "gpu_busy_fraction": busy / window if window > 0 else None,
        "gaps": len(gaps), "gap_idle_ms": sum(e - s for s, e in gaps) / 1e3, "min_gap_us": min_gap_us,
        "idle_ms_by_phase": {k: round(v / 1e3, 3) for k, v in sorted(by_phase.items(), key=lambda kv: -kv[1])},
        "steps": len(launches),
        "ms_per_step": (launches[-1] - launches[0]) / 1e3 / (len(launches) - 1) if len(launches) > 1 else None,
        "largest_gaps": sorted(listed, key=lambda g: -g["idle_us"])[:top],
        **span,
    }


def format_summary(s: Dict[str, Any]) -> str:
    if not s.get("gpu_events"):
        return "no GPU events in the trace (was it recorded with the GPU activity, on a CUDA device?)"
    lines = [f"GPU busy {s['gpu_busy_ms']:.2f} of {s['window_ms']:.2f} ms ({100 * s['gpu_busy_fraction']:.1f}%); "
             f"{s['gaps']} gaps of >= {s['min_gap_us']:g} us idle {s['gap_idle_ms']:.2f} ms"]
    if s["ms_per_step"] is not None:
        lines.append(f"{s['steps']} launches, {s['ms_per_step']:.2f} ms apart on average")
    for name, ms in s["idle_ms_by_phase"].items():
        lines.append(f"  GPU idle while {name}: {ms:.3f} ms")
    for g in s["largest_gaps"]:
        lines.append(f"  gap at {g['start_ms']:9.3f} ms: {g['idle_us']:8.1f} us  {g['phases_us'] or '(no phase)'}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("trace")
    p.add_argument("--min-gap-us", type=float, default=20.0)
    p.add_argument("--top", type=int, default=10)
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = p.parse_args(argv)
    s = summarize(load_trace(args.trace), args.min_gap_us, args.top)
    print(json.dumps(s, indent=1) if args.json else format_summary(s))
    return 0


if __name__ == "__main__":
    sys.exit(main())

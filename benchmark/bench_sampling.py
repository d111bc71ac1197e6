"""The sampler alone, --sampling-backend pytorch against flashinfer: the measurement that decides the default.

    python benchmark/bench_sampling.py --out sampling.json

For each setting (all greedy; temperature 0.7; top_k 50; top_p 0.9; top_k 50 + top_p 0.9; min_p 0.05), batch
size (1, 64, 256) and backend, one `Sampler(backend)(logits, info)` call on fixed random float32 logits of the
Llama-3 vocabulary (128256), every row with the same sampling parameters, no penalties, no logprobs: the
SamplingBatchInfo is built once, outside the timing. Each call is timed between two CUDA events (so a call
whose GPU work outruns its launches shows its GPU time, and one bound by launches its launch time), after
--warmup untimed calls (flashinfer's first call builds its kernels: JIT, minutes on a fresh machine); the
median over --iters calls is reported, with the 10th/90th percentiles and the median host time of a call
(how long the Python call takes to return, the CPU time the overlap scheduler must hide). The ratio is
flashinfer / pytorch (below 1: flashinfer faster). `path` says what the flashinfer backend actually ran for
that batch: a flashinfer kernel, or the pytorch path it falls back to (greedy batches never sample).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from types import ModuleType
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from sglx.srt.layers.flashinfer_sampling import flashinfer_kernel_for
from sglx.srt.layers.sampler import Sampler
from sglx.srt.sampling.sampling_batch_info import SamplingBatchInfo
from sglx.srt.server_args import SAMPLING_BACKENDS
from sglx.test.sampling_utils import req

SETTINGS: Dict[str, Dict[str, Any]] = {
    "greedy": dict(temperature=0.0),
    "temperature=0.7": dict(temperature=0.7),
    "top_k=50": dict(top_k=50),
    "top_p=0.9": dict(top_p=0.9),
    "top_k=50,top_p=0.9": dict(top_k=50, top_p=0.9),
    "min_p=0.05": dict(min_p=0.05),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backends", nargs="+", choices=SAMPLING_BACKENDS, default=list(SAMPLING_BACKENDS))
    p.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64, 256])
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--warmup", type=int, default=10, help="untimed calls before each timed series")
    p.add_argument("--iters", type=int, default=100, help="timed calls per series (median reported)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--logit-scale", type=float, default=4.0, help="logits are randn x this")
    p.add_argument("--out", default=None, help="JSON file for the results (default: print only)")
    return p


def percentile(values: Sequence[float], q: float) -> float:
    """The q-quantile (0..1) of values, linearly interpolated."""
    s = sorted(values)
    pos = q * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def time_calls(fn: Callable[[], Any], warmup: int, iters: int, device: torch.device) -> Dict[str, List[float]]:
    """Seconds per call: `span` between CUDA events around each call (wall time on a CPU device) and `host`,
    the time until the call returns. Calls run back to back; one synchronize before and after the series."""
    for _ in range(warmup):
        fn()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
    host: List[float] = []
    for i in range(iters):
        if cuda:
            events[i][0].record()
        t0 = time.perf_counter()
        fn()
        host.append(time.perf_counter() - t0)
        if cuda:
            events[i][1].record()
    if not cuda:
        return {"span": host, "host": host}
    torch.cuda.synchronize(device)
    return {"span": [start.elapsed_time(end) * 1e-3 for start, end in events], "host": host}


def flashinfer_path(info: SamplingBatchInfo) -> str:
    if info.is_all_greedy:
        return "argmax"
    return flashinfer_kernel_for(info) or "pytorch (fallback)"


def run_series(sampler: Sampler, logits: torch.Tensor, info: SamplingBatchInfo, args: argparse.Namespace,
               device: torch.device) -> Dict[str, Any]:
    times = time_calls(lambda: sampler(logits, info), args.warmup, args.iters, device)
    span = times["span"]
    return {"median_us": statistics.median(span) * 1e6, "p10_us": percentile(span, 0.1) * 1e6,
            "p90_us": percentile(span, 0.9) * 1e6, "host_median_us": statistics.median(times["host"]) * 1e6,
            "iters": args.iters}


def flashinfer_version() -> Optional[str]:
    mod: Optional[ModuleType] = sys.modules.get("flashinfer")
    return getattr(mod, "__version__", None) if mod is not None else None


@torch.inference_mode()  # as ModelRunner.forward_batch_generation calls the sampler
def run(args: argparse.Namespace) -> Dict[str, Any]:
    device = torch.device(args.device)
    gen = torch.Generator(device).manual_seed(args.seed)
    samplers: Dict[str, Sampler] = {}
    errors: Dict[str, str] = {}
    for backend in args.backends:
        try:
            samplers[backend] = Sampler(backend=backend)
        except Exception as e:  # flashinfer missing: report it, time the rest
            errors[backend] = f"{type(e).__name__}: {e}"
    results: List[Dict[str, Any]] = []
    for bs in args.batch_sizes:
        logits = torch.randn(bs, args.vocab, device=device, generator=gen, dtype=torch.float32) * args.logit_scale
        for name in args.settings:
            info = SamplingBatchInfo.from_reqs([req(**SETTINGS[name])] * bs, args.vocab, device)
            for backend, sampler in samplers.items():
                path = flashinfer_path(info) if backend == "flashinfer" else "pytorch"
                rec = {"setting": name, "batch_size": bs, "backend": backend, "path": path}
                try:
                    rec.update(run_series(sampler, logits, info, args, device))
                except Exception as e:  # a kernel that fails to build or run: keep the other series
                    rec["error"] = f"{type(e).__name__}: {e}"
                results.append(rec)
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
        "torch": torch.__version__, "flashinfer": flashinfer_version(), "vocab": args.vocab, "dtype": "float32",
        "warmup": args.warmup, "iters": args.iters, "results": results, "errors": errors,
    }


def table(report: Dict[str, Any]) -> str:
    """One line per (setting, batch size): each backend's median µs, flashinfer / pytorch, flashinfer's path."""
    by_key: Dict[tuple, Dict[str, Dict[str, Any]]] = {}
    for r in report["results"]:
        by_key.setdefault((r["setting"], r["batch_size"]), {})[r["backend"]] = r
    def us(r: Optional[Dict[str, Any]]) -> Optional[float]:
        return r.get("median_us") if r else None

    lines = [f"{'setting':<20} {'bs':>4} {'pytorch µs':>11} {'flashinfer µs':>14} {'fi/pt':>6}  flashinfer path"]
    for (setting, bs), recs in by_key.items():
        pt, fi = us(recs.get("pytorch")), us(recs.get("flashinfer"))
        ratio = f"{fi / pt:.2f}" if pt and fi else "n/a"
        path = recs["flashinfer"]["path"] if "flashinfer" in recs else "-"
        lines.append(f"{setting:<20} {bs:>4} {_cell(pt):>11} {_cell(fi):>14} {ratio:>6}  {path}")
    lines += [f"{r['backend']} {r['setting']} bs={r['batch_size']}: {r['error']}"
              for r in report["results"] if "error" in r]
    lines += [f"{backend}: not run ({err})" for backend, err in report["errors"].items()]
    return "\n".join(lines)


def _cell(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.1f}"


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    report = run(args)
    print(f"{report['device']}, vocab {report['vocab']} float32, torch {report['torch']}, "
          f"flashinfer {report['flashinfer']}, median of {args.iters} calls after {args.warmup} warm-up calls")
    print(table(report))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

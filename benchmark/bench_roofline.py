"""Decode step time against the HBM floor, and prefill against the matmul rate (issue 4, a and b), through
sglx.Engine (scheduler, tokenizer manager and detokenizer included). Llama-3.1-8B config, dummy bf16 weights.

    python benchmark/bench_roofline.py --attention-backend triton torch_native --result-file roofline.jsonl

a) Decode, per batch size B (1, 64, 256) and 512-token random prompts: each time is the wall time of one
   Engine.generate call with all B prompts submitted at once, greedy, ignore_eos=True;
       step = (time to generate 257 tokens - time to generate 1) / 256.
   Every call gets fresh random prompts AND the prefix cache is flushed before it, so no call reuses
   another's KV. HBM floor of a step = (weight bytes + B x 640 x KV bytes per token) / copy bandwidth, 640
   being the mean context of the 256 decode steps (input + (output - 1) // 2), the copy bandwidth measured in
   the same run (2 GiB buffer, bytes read + written). Goals: step / floor <= 1.15 (B=1), 1.25 (64), 1.45 (256).
b) Prefill of 8 x 2048-token prompts (max_new_tokens 1), after a warm-up call: model FLOPs =
   tokens x 2 x (layer params + lm_head params) + 8 x 2 x 2048^2 x heads x head_dim x layers, over the wall
   time of the generate call (nothing subtracted), as a share of the measured 8192^3 bf16 matmul rate
   (goal >= 85%).
The probes and the FLOP/byte formulas are sglx.bench_one_batch's. Each --attention-backend gets its own
Engine, one after the other, each shut down (its GPU memory released) before the next starts.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
import traceback
from types import SimpleNamespace
from typing import Any, Dict, List, Optional, Sequence

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from engine_utils import (  # noqa: E402
    GuardedEngine,
    add_engine_args,
    add_schedule_arg,
    append_jsonl,
    random_ids,
    resolve_tokenizer,
)

from sglx import bench_one_batch as bob  # noqa: E402
from sglx.srt.configs.model_config import ModelConfig  # noqa: E402
from sglx.srt.server_args import ServerArgs  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
DECODE_GOALS = {1: 1.15, 64: 1.25, 256: 1.45}
PREFILL_GOAL = 0.85


def static_model_size(model_path: str, dtype: str, device: str, kv_cache_dtype: str = "auto") -> bob.ModelSize:
    """bench_one_batch.model_size without loading weights: the model is built on the meta device (the
    engine's copy lives in the scheduler process) and the KV bytes come from ModelRunner.cell_size_bytes."""
    from sglx.srt.configs.model_config import KV_DTYPES
    from sglx.srt.model_executor.model_loader import _default_dtype
    from sglx.srt.model_executor.model_runner import ModelRunner
    from sglx.srt.models.registry import get_model_class

    cfg = ModelConfig.from_path(model_path, dtype=dtype, device=device)
    with torch.device("meta"), _default_dtype(cfg.dtype):
        model = get_model_class(cfg.architecture)(cfg.hf_config)
    stand_in = SimpleNamespace(model=model, model_config=cfg, kv_cache_dtype=KV_DTYPES.get(kv_cache_dtype, cfg.dtype))
    stand_in.cell_size_bytes = lambda: ModelRunner.cell_size_bytes(stand_in)
    return bob.model_size(stand_in)


def decode_floor_s(size: bob.ModelSize, batch: int, context: int, bandwidth: float) -> float:
    return (size.weight_bytes_per_step + batch * context * size.kv_bytes_per_token) / bandwidth


class Prompts:
    """Fresh random prompts for every call, so the prefix cache never makes a later call cheaper."""

    def __init__(self, vocab: int, seed: int) -> None:
        self.vocab, self.gen = vocab, torch.Generator().manual_seed(seed)

    def __call__(self, batch: int, length: int) -> List[List[int]]:
        return random_ids(self.gen, self.vocab, [length] * batch)


def flush(eng: GuardedEngine, tries: int = 50) -> None:
    # The scheduler is idle once the last output is out, so the first try should do; retry to be safe.
    for _ in range(tries):
        if eng.flush_cache():
            return
        time.sleep(0.1)
    raise RuntimeError("flush_cache refused: the engine is not idle")


def timed_generate(eng: GuardedEngine, prompts: List[List[int]], new_tokens: int) -> float:
    """Wall time of one generate call (all prompts at once), on a flushed cache; checks every output."""
    flush(eng)
    sp = {"max_new_tokens": new_tokens, "temperature": 0.0, "ignore_eos": True}
    t0 = time.perf_counter()
    outs = eng.generate(prompts, sp)
    wall = time.perf_counter() - t0
    got = sorted({len(o["output_ids"]) for o in outs})
    if len(outs) != len(prompts) or got != [new_tokens]:
        raise RuntimeError(f"asked {len(prompts)} x {new_tokens} tokens, got {len(outs)} outputs of {got} tokens")
    return wall


def decode_case(eng: GuardedEngine, prompts: Prompts, args: argparse.Namespace, batch: int, size: bob.ModelSize,
                bandwidth: float) -> Dict[str, Any]:
    il, ol = args.input_len, args.output_len
    timed_generate(eng, prompts(batch, il), 1)  # warm-up: prefill shapes, then decode shapes and lengths
    timed_generate(eng, prompts(batch, il), args.warmup_output_len or ol)
    t1 = [timed_generate(eng, prompts(batch, il), 1) for _ in range(args.repeats)]
    tn = [timed_generate(eng, prompts(batch, il), ol) for _ in range(args.repeats)]
    t_1, t_n = statistics.median(t1), statistics.median(tn)
    step = (t_n - t_1) / (ol - 1)
    context = il + (ol - 1) // 2
    floor = decode_floor_s(size, batch, context, bandwidth)
    goal = DECODE_GOALS.get(batch)
    return {"part": "decode", "batch_size": batch, "input_len": il, "output_len": ol, "t_1_s": t_1,
            "t_out_s": t_n, "t_1_all_s": t1, "t_out_all_s": tn, "step_s": step, "mean_context": context,
            "floor_s": floor, "ratio": step / floor, "goal_ratio": goal,
            "meets_goal": None if goal is None else step / floor <= goal,
            "decode_tok_s": batch / step if step > 0 else None}


def prefill_case(eng: GuardedEngine, prompts: Prompts, args: argparse.Namespace, cfg: ModelConfig,
                 size: bob.ModelSize, matmul: float) -> Dict[str, Any]:
    b, n = args.prefill_batch, args.prefill_input_len
    timed_generate(eng, prompts(b, n), 1)
    times = [timed_generate(eng, prompts(b, n), 1) for _ in range(args.prefill_repeats)]
    t = statistics.median(times)
    flops = bob.prefill_flops(size, cfg, bob.Case(b, n, 1))
    share = flops / t / matmul
    return {"part": "prefill", "batch_size": b, "input_len": n, "wall_s": t, "wall_all_s": times,
            "model_flops": flops, "flops_per_s": flops / t, "share_of_matmul_rate": share,
            "goal_share": PREFILL_GOAL, "meets_goal": share >= PREFILL_GOAL, "prefill_tok_s": b * n / t}


def default_max_total_tokens(args: argparse.Namespace) -> int:
    """KV slots for the largest case, plus a quarter: the pool's size does not change a step's time, and
    every byte left out of it goes to activations (a 256 x 512 prefill in one batch needs ~15 GB at 8B)."""
    decode = 0 if args.skip_decode else max(args.batch_sizes) * (args.input_len + args.output_len + 2)
    prefill = 0 if args.skip_prefill else args.prefill_batch * (args.prefill_input_len + 2)
    return int(1.25 * max(decode, prefill, 1))


def engine_args(args: argparse.Namespace, backend: Optional[str], schedule: str = "overlap") -> ServerArgs:
    total = default_max_total_tokens(args) if args.max_total_tokens is None else args.max_total_tokens or None
    extra = {k: v for k, v in (("max_total_tokens", total), ("context_length", args.context_length),
                               ("max_prefill_tokens", args.max_prefill_tokens),
                               ("mem_fraction_static", args.mem_fraction_static)) if v is not None}
    return ServerArgs(model_path=args.model_path, tokenizer_path=args.tokenizer_path, load_format=args.load_format,
                      dtype=args.dtype, device=args.device, attention_backend=backend,
                      disable_cuda_graph=args.disable_cuda_graph, random_seed=args.seed, log_level=args.log_level,
                      disable_overlap_schedule=schedule == "sync", quantization=args.quantization, **extra)


def backend_label(info: Dict[str, Any]) -> str:
    """The backends the scheduler resolved ("fa3+triton" for prefill fa3, decode triton)."""
    prefill, decode = info["prefill_attention_backend"], info["decode_attention_backend"]
    return prefill if prefill == decode else f"{prefill}+{decode}"


def run_backend(args: argparse.Namespace, backend: Optional[str], cfg: ModelConfig, size: bob.ModelSize,
                probe: Dict[str, Any], common: Dict[str, Any], schedule: str = "overlap") -> List[Dict[str, Any]]:
    """Every case of one backend (and scheduler mode) in one Engine; a failing case is recorded and the others
    still run."""
    sa = engine_args(args, backend, schedule)
    base = {**common, "attention_backend": sa.attention_backend, "cuda_graph": not sa.disable_cuda_graph,
            "schedule": schedule, "max_total_tokens_arg": sa.max_total_tokens}
    cases: List[Any] = [] if args.skip_decode else list(args.batch_sizes)
    cases += [] if args.skip_prefill else ["prefill"]
    try:
        eng = GuardedEngine(sa, args.call_timeout)
    except Exception as e:
        traceback.print_exc()
        return [{**base, "part": "engine_start", "error": f"{type(e).__name__}: {e}"}]
    records, prompts = [], Prompts(cfg.vocab_size, args.seed)
    try:
        with contextlib.suppress(Exception):  # informative only; a dead engine shows in the first case
            info = eng.server_info()
            base["max_total_num_tokens"] = info["max_total_num_tokens"]
            base["attention_backend"] = backend_label(info)
        for case in cases:
            try:
                if case == "prefill":
                    rec = prefill_case(eng, prompts, args, cfg, size, probe["matmul_flops_per_s"])
                else:
                    rec = decode_case(eng, prompts, args, case, size, probe["copy_bandwidth_bytes_per_s"])
            except Exception as e:
                traceback.print_exc()
                rec = {"part": "prefill" if case == "prefill" else "decode", "error": f"{type(e).__name__}: {e}"}
                if case != "prefill":
                    rec["batch_size"] = case
            rec = {**base, **rec}
            print_record(rec)
            records.append(rec)
            append_jsonl(args.result_file, rec)
    finally:
        eng.shutdown()
    return records


def print_record(r: Dict[str, Any]) -> None:
    head = f"[{r['attention_backend']}/{r.get('schedule', 'overlap')}] {r['part']}"
    if "error" in r:
        print(f"{head} bs={r.get('batch_size', '-')}: ERROR {r['error']}", flush=True)
    elif r["part"] == "decode":
        print(f"{head} bs={r['batch_size']}: step {r['step_s'] * 1e3:.2f} ms, floor {r['floor_s'] * 1e3:.2f} ms, "
              f"ratio {r['ratio']:.2f} (goal {r['goal_ratio'] or '-'}); t1 {r['t_1_s']:.3f} s, "
              f"t{r['output_len']} {r['t_out_s']:.3f} s", flush=True)
    else:
        print(f"{head} {r['batch_size']}x{r['input_len']}: {r['wall_s'] * 1e3:.1f} ms, "
              f"{r['flops_per_s'] / 1e12:.1f} TFLOP/s = {r['share_of_matmul_rate']:.1%} of the matmul rate "
              f"(goal {PREFILL_GOAL:.0%})", flush=True)


def print_table(records: List[Dict[str, Any]], probe: Dict[str, Any]) -> None:
    print(f"\ncopy bandwidth {probe['copy_bandwidth_bytes_per_s'] / 1e9:.4g} GB/s, "
          f"matmul {probe['matmul_flops_per_s'] / 1e12:.4g} TFLOP/s")
    head = f"{'backend/sched':22} {'case':>14} {'step/wall ms':>13} {'floor ms':>9} {'ratio':>7} {'goal':>6} {'met':>4}"
    print(head + "\n" + "-" * len(head))
    for r in records:
        be = f"{r['attention_backend']}/{r.get('schedule', 'overlap')}"
        if "error" in r:
            print(f"{be:22} {r['part'] + ' ' + str(r.get('batch_size', '')):>14} ERROR: {r['error']}")
        elif r["part"] == "decode":
            print(f"{be:22} {'decode bs=' + str(r['batch_size']):>14} {r['step_s'] * 1e3:>13.2f} "
                  f"{r['floor_s'] * 1e3:>9.2f} {r['ratio']:>7.2f} {str(r['goal_ratio'] or '-'):>6} "
                  f"{'-' if r['meets_goal'] is None else 'yes' if r['meets_goal'] else 'no':>4}")
        else:
            print(f"{be:22} {'prefill ' + str(r['batch_size']) + 'x' + str(r['input_len']):>14} "
                  f"{r['wall_s'] * 1e3:>13.1f} {'':>9} {r['share_of_matmul_rate']:>7.1%} {PREFILL_GOAL:>6.0%} "
                  f"{'yes' if r['meets_goal'] else 'no':>4}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_engine_args(p, os.path.join(HERE, "configs", "llama-3.1-8b"))
    p.add_argument("--attention-backend", nargs="+", default=[None],
                   help="one Engine per backend, in turn (default: the server default)")
    p.add_argument("--disable-cuda-graph", action="store_true")
    add_schedule_arg(p)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64, 256])
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=257)
    p.add_argument("--warmup-output-len", type=int, default=None, help="default: --output-len")
    p.add_argument("--repeats", type=int, default=1, help="timed calls per decode time (median)")
    p.add_argument("--prefill-batch", type=int, default=8)
    p.add_argument("--prefill-input-len", type=int, default=2048)
    p.add_argument("--prefill-repeats", type=int, default=3, help="timed prefill calls (median)")
    p.add_argument("--skip-decode", action="store_true")
    p.add_argument("--skip-prefill", action="store_true")
    p.add_argument("--copy-bytes", type=int, default=2 << 30, help="buffer of the copy-bandwidth probe")
    p.add_argument("--matmul-size", type=int, default=8192, help="n of the n^3 bf16 matmul probe")
    p.add_argument("--max-total-tokens", type=int, default=None,
                   help="KV slots (default: 1.25 x what the largest case needs; 0: the server's own sizing)")
    p.add_argument("--max-prefill-tokens", type=int, default=None, help="the scheduler's tokens per prefill")
    p.add_argument("--context-length", type=int, default=None)
    p.add_argument("--mem-fraction-static", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--call-timeout", type=float, default=0.0, help="seconds per engine call (0: none)")
    p.add_argument("--log-level", default="warning")
    p.add_argument("--result-file", default=None, help="JSON lines, appended")
    return p


def run(args: argparse.Namespace) -> List[Dict[str, Any]]:
    if args.output_len < 2 and not args.skip_decode:
        raise SystemExit("--output-len must be >= 2 (the step is (t_out - t_1) / (out - 1))")
    args.tokenizer_path = resolve_tokenizer(args.model_path, args.tokenizer_path)
    device = torch.device(engine_args(args, args.attention_backend[0]).device)
    # Probes first, while the card is free; the cached blocks are handed back before the engines start.
    probe = {"copy_bandwidth_bytes_per_s": bob.copy_bandwidth(device, args.copy_bytes),
             "matmul_flops_per_s": bob.matmul_rate(device, args.matmul_size), "copy_bytes": args.copy_bytes,
             "matmul_size": args.matmul_size}
    if device.type == "cuda":
        torch.cuda.empty_cache()
    cfg = ModelConfig.from_path(args.model_path, dtype=args.dtype, device=str(device))
    size = static_model_size(args.model_path, args.dtype, str(device))
    common = {**bob.device_info(device), **probe, "model_path": args.model_path, "dtype": args.dtype,
              "load_format": args.load_format, "weight_bytes_per_step": size.weight_bytes_per_step,
              "kv_bytes_per_token": size.kv_bytes_per_token, "matmul_params": size.matmul_params,
              "seed": args.seed, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    print(f"{common['device_name']}: copy {probe['copy_bandwidth_bytes_per_s'] / 1e9:.4g} GB/s, matmul "
          f"{probe['matmul_flops_per_s'] / 1e12:.4g} TFLOP/s; weights {size.weight_bytes_per_step / 1e9:.4g} GB, "
          f"KV {size.kv_bytes_per_token} B/token", flush=True)
    records: List[Dict[str, Any]] = []
    for backend in args.attention_backend:
        for schedule in args.schedule:
            records += run_backend(args, backend, cfg, size, probe, common, schedule)
    print_table(records, probe)
    return records


def main(argv: Optional[Sequence[str]] = None) -> int:
    records = run(build_parser().parse_args(argv))
    return 1 if any("error" in r for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())

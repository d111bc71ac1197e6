"""Embedding throughput with and without the KV cache (issue 5), through sglx.Engine, on one card.

    python benchmark/bench_embedding.py --result-file emb.jsonl     # Qwen3-0.6B config, dummy bf16 weights

512 inputs (lengths uniform in 500..7000, random ids, seed 0) are encoded in two modes, each in its own Engine:
  skip   the default: KV cache skipped (NoOpKVPool, attention on the raw k/v of the batch);
  cache  --disable-embedding-skip-kv-cache: the KV pool is reserved and written as usual.
Both run with --is-embedding, the radix cache and chunked prefill off. Per mode: warm up, then time
--repeats (median) `encode` calls of all inputs submitted at once (sent in ~64k-token messages), and report items/s,
input tokens/s and wall seconds; the two modes' embeddings must agree (cosine >= 0.999 on a subset).
--schedule overlap sync times each mode with and without the overlap schedule (one Engine each).
--forwards times the model runner alone (--forward-modes, default --modes) on the batches the scheduler would
form, at one budget for every path (--max-prefill-tokens, default 16384), then sums the device time of all their
GPU work (GPU time: the modes' cost free of the host's pace); its extra mode pool-read is the cache mode with
every batch's k/v stored and then read back from the pool through the page table (flashinfer/fa3), as SGLang's
FA backend attended before seed 000; pre-seeds adds the device-to-device copy of each attention output that seed
003 removed (SGLang before both seeds).
Then, per mode, a ModelRunner built directly with the same arguments finds the largest prefill (tokens of
one forward, requests of ~4096 tokens) that runs without CUDA OOM: doubling, then bisecting to ~5%.

What bounds a prefill batch in the scheduler (PrefillAdder), in both modes:
  * tokens per batch: --max-prefill-tokens (default 16384, but 32768 on the skip path on a GPU, which has the
    memory the pool would take; an input longer than that runs alone);
  * KV slots: page-rounded input + one page per request must fit in the free slots (embedding requests
    reserve no decode tokens); --max-running-requests rows.
  skip:  max_total_num_tokens is --max-total-tokens as given (else profiled from free memory / KV bytes per
         token), bookkeeping only (0 bytes reserved): activations may use the whole card, so with a large
         --max-prefill-tokens the bound is the slot count, or activation memory (a CUDA OOM) if that comes first.
  cache: the pool holds mem_fraction_static of the free memory; activations get the rest, so the largest
         batch is the one whose activations fit beside the pool.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from sglx.bench_one_batch import device_info, sync

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from engine_utils import (  # noqa: E402
    GuardedEngine,
    add_engine_args,
    add_schedule_arg,
    append_jsonl,
    random_ids,
    resolve_tokenizer,
)
from sglx.srt.configs.model_config import ModelConfig
from sglx.srt.managers.scheduler import DEFAULT_MAX_PREFILL_TOKENS
from sglx.srt.server_args import ServerArgs

HERE = os.path.dirname(os.path.abspath(__file__))
MODES = ("skip", "cache")
# --forwards only: the cache mode with every prefix-free batch read back from the pool through the page table
# (flashinfer/fa3 backends), as SGLang's FA backend attended before seed 000: that seed's own baseline.
POOL_READ = "pool-read"
# --forwards only: pool-read plus the per-layer device-to-device copy of attention's output that `out=` removed
# (seed 003): SGLang before both seeds, the baseline the issue's "+21% with the DtoD fix" was measured from.
PRE_SEEDS = "pre-seeds"
COSINE_GOAL = 0.999
def make_inputs(num: int, min_len: int, max_len: int, vocab: int, seed: int) -> List[List[int]]:
    """`num` inputs, lengths uniform in [min_len, max_len], ids uniform in [0, vocab)."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, max_len + 1, (num,), generator=gen).tolist()
    return random_ids(gen, vocab, lengths)


def baseline_backend(mode: str) -> str:
    """The engine's attention backend for a baseline mode, from the seed_baselines plugin (SGLX_PLUGINS: set here,
    so the Engine's spawned processes, which get this process's environment and sys.path, load it too)."""
    plugins = [n for n in os.environ.get("SGLX_PLUGINS", "").split(",") if n]
    if "seed_baselines" not in plugins:
        os.environ["SGLX_PLUGINS"] = ",".join(plugins + ["seed_baselines"])
    from seed_baselines import POOL_READ_BACKEND, PRE_SEEDS_BACKEND

    return POOL_READ_BACKEND if mode == POOL_READ else PRE_SEEDS_BACKEND


def mode_server_args(args: argparse.Namespace, mode: str, schedule: str = "overlap") -> ServerArgs:
    extra = {k: v for k, v in (("max_prefill_tokens", args.max_prefill_tokens),
                               ("max_total_tokens", args.max_total_tokens),
                               ("context_length", args.context_length),
                               ("mem_fraction_static", args.mem_fraction_static)) if v is not None}
    baseline = mode in (POOL_READ, PRE_SEEDS)
    return ServerArgs(
        model_path=args.model_path, tokenizer_path=args.tokenizer_path, load_format=args.load_format,
        dtype=args.dtype, device=args.device, is_embedding=True,
        attention_backend=baseline_backend(mode) if baseline else args.attention_backend,
        disable_radix_cache=True, chunked_prefill_size=-1, disable_embedding_skip_kv_cache=mode != "skip",
        random_seed=args.seed, log_level=args.log_level, disable_overlap_schedule=schedule == "sync",
        quantization=args.quantization, **extra,
    )


def check_indices(num: int, count: int) -> List[int]:
    """Up to `count` indices spread evenly over the inputs (both ends included)."""
    if count <= 0 or num == 0:
        return []
    count = min(count, num)
    return sorted({round(i * (num - 1) / max(count - 1, 1)) for i in range(count)})


def encode_mode(args: argparse.Namespace, mode: str, inputs: List[List[int]],
                keep: List[int], schedule: str = "overlap") -> Dict[str, Any]:
    """One Engine in `mode` (and scheduler mode): warm up, time one encode of every input; the kept
    embeddings go in "_kept"."""
    sa = mode_server_args(args, mode, schedule)
    rec: Dict[str, Any] = {"part": "encode", "mode": mode, "schedule": schedule, "attention_backend": sa.attention_backend,
                           "num_inputs": len(inputs), "input_tokens": sum(map(len, inputs))}
    eng = GuardedEngine(sa, args.call_timeout)
    info = eng.engine.scheduler_info
    rec["attention_backend"] = info.get("prefill_attention_backend", sa.attention_backend)
    try:
        if args.warmup_inputs:
            eng.encode(inputs[: args.warmup_inputs])
        walls = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            outs = eng.encode(inputs)
            walls.append(time.perf_counter() - t0)
        wall = statistics.median(walls)
        if args.trace_steps:
            rec["trace"] = traced_encode(eng, inputs, args.trace_steps, args.trace_dir, args.trace_activities)
        info = eng.server_info()
    finally:
        eng.shutdown()
    if len(outs) != len(inputs) or any(o["meta_info"]["prompt_tokens"] != len(x) for o, x in zip(outs, inputs)):
        raise RuntimeError("the engine returned a different number of embeddings or prompt tokens")
    state = info["internal_state"]
    rec.update(wall_s=wall, wall_all_s=walls, items_per_s=len(inputs) / wall, tokens_per_s=rec["input_tokens"] / wall,
               skip_kv_cache=info["skip_kv_cache"], max_total_num_tokens=info["max_total_num_tokens"],
               kv_pool_bytes=state["kv_pool_bytes"], kv_leak_free=state["kv_leak_free"],
               max_prefill_tokens=info.get("max_prefill_tokens"), embedding_dim=len(outs[0]["embedding"]))
    if (mode == "skip") != bool(info["skip_kv_cache"]):
        rec["warning"] = f"mode {mode} but the engine reports skip_kv_cache={info['skip_kv_cache']}"
    rec["_kept"] = torch.tensor([outs[i]["embedding"] for i in keep], dtype=torch.float32)
    return rec


def traced_encode(eng: GuardedEngine, inputs: List[List[int]], steps: int, out_dir: Optional[str],
                  activities: Optional[List[str]] = None) -> Dict[str, Any]:
    """One more (untimed) encode of every input with the scheduler's profiler on for its first `steps`
    batches; the trace's GPU idle gaps, charged to the scheduler's phases (trace_gaps.py). Recording CPU ops
    slows the host's launches (a forward's took ~30 -> ~40 ms), so `activities=["GPU"]` gives the truer GPU
    busy time, without the phases."""
    from trace_gaps import base_time_ns, format_summary, load_trace, summarize

    path = eng.engine.start_profile(output_dir=out_dir, num_steps=steps, activities=activities)
    t0 = time.time_ns()
    eng.encode(inputs)
    t1 = time.time_ns()
    try:
        eng.engine.stop_profile()  # fewer batches than `steps`: stop by hand
    except RuntimeError:
        pass  # the span ended by itself
    summary = {"trace_path": path, "encode_wall_ms": (t1 - t0) / 1e6,
               **summarize(load_trace(path), base_ns=base_time_ns(path))}
    print(format_summary(summary), flush=True)
    if "gpu_first_ns" in summary:  # the host's share of the wall: before the first and after the last GPU work
        summary["host_before_gpu_ms"] = (summary["gpu_first_ns"] - t0) / 1e6
        summary["host_after_gpu_ms"] = (t1 - summary["gpu_last_ns"]) / 1e6
        print(f"encode wall {summary['encode_wall_ms']:.1f} ms: {summary['host_before_gpu_ms']:.1f} ms before the "
              f"first GPU work, {summary['host_after_gpu_ms']:.1f} ms after the last", flush=True)
    return summary


def min_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1).min())


# ------------------------------------------------------------------------------------- largest batch
@dataclass
class SearchResult:
    largest_ok: int  # the most tokens that ran (0: not even the smallest try)
    first_fail: Optional[int]  # the fewest tokens that failed; None: every try up to the cap ran


def search_largest(fits: Callable[[int], bool], start: int, cap: int, rel_tol: float = 0.05,
                   min_step: int = 256) -> SearchResult:
    """Largest n <= cap with fits(n): double from `start` until a failure (or the cap), then bisect until
    the gap is within rel_tol of the good value (or min_step tokens)."""
    lo, hi, n = 0, None, min(start, cap)
    while True:
        if fits(n):
            lo = n
            if n >= cap:
                break
            n = min(2 * n, cap)
        else:
            hi = n
            break
    while hi is not None and hi - lo > max(min_step, rel_tol * lo):
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return SearchResult(lo, hi)


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or (isinstance(e, RuntimeError) and "out of memory" in str(e))


def run_forward(runner: Any, lens: List[int], gen: torch.Generator,
                launch_times: Optional[List[float]] = None) -> float:
    """One embedding forward of requests of `lens` tokens (random ids), with rows and KV slots taken from the
    runner's pools as the scheduler would, and released after; returns its wall seconds. `launch_times` gets
    the seconds until the forward returned to the host, before the sync: when that is close to the wall time,
    the host's launches, not the GPU, set the pace."""
    from sglx.srt.model_executor.forward_batch import ForwardMode, ModelWorkerBatch

    pool, alloc = runner.req_to_token_pool, runner.token_to_kv_pool_allocator
    tokens = sum(lens)
    rows = [pool.alloc() for _ in lens]
    if any(row is None for row in rows):
        raise RuntimeError(f"ReqToTokenPool has fewer than {len(lens)} rows")
    loc = alloc.alloc_extend([0] * len(lens), lens, [-1] * len(lens), tokens)
    if loc is None:
        raise RuntimeError(f"the allocator has fewer than {tokens} free KV slots")
    off = 0
    for row, n in zip(rows, lens):
        pool.write(row, 0, loc[off: off + n])
        off += n
    ids = torch.randint(0, runner.model_config.vocab_size, (tokens,), generator=gen).tolist()
    batch = ModelWorkerBatch(ForwardMode.EXTEND, ids, rows, lens, [0] * len(lens), loc, is_embedding=True)
    sync(runner.device)
    t0 = time.perf_counter()
    out = runner.forward_batch_embedding(batch)
    if launch_times is not None:
        launch_times.append(time.perf_counter() - t0)
    sync(runner.device)
    wall = time.perf_counter() - t0
    if tuple(out.shape) != (len(lens), runner.model_config.hidden_size):
        raise RuntimeError(f"embedding batch of shape {tuple(out.shape)} for {len(lens)} requests")
    runner.req_to_token_pool.clear()
    runner.token_to_kv_pool_allocator.clear()
    return wall


class PrefillTrial:
    """fits(tokens): one embedding forward of `tokens` tokens (requests of req_len, the last shorter) on a
    ModelRunner, with rows and KV slots taken from its pools as the scheduler would; False on CUDA OOM."""

    def __init__(self, runner: Any, req_len: int, seed: int) -> None:
        self.runner, self.req_len = runner, req_len
        self.gen = torch.Generator().manual_seed(seed)
        self.trials: List[Dict[str, Any]] = []

    def lengths(self, tokens: int) -> List[int]:
        full, rest = divmod(tokens, self.req_len)
        return [self.req_len] * full + ([rest] if rest else [])

    def _forward(self, tokens: int) -> float:
        return run_forward(self.runner, self.lengths(tokens), self.gen)

    def __call__(self, tokens: int) -> bool:
        cuda = self.runner.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.runner.device)
        trial: Dict[str, Any] = {"tokens": tokens, "requests": len(self.lengths(tokens))}
        try:
            trial["forward_s"] = self._forward(tokens)
            trial["ok"] = True
        except Exception as e:
            if not _is_oom(e):
                raise
            trial["ok"] = False
        if cuda:
            trial["peak_allocated_bytes"] = torch.cuda.max_memory_allocated(self.runner.device)
        # Outside the except block, so the failed forward's frames (and their tensors) are gone.
        self.runner.req_to_token_pool.clear()
        self.runner.token_to_kv_pool_allocator.clear()
        free_device_memory()
        self.trials.append(trial)
        print(f"  {tokens} tokens in {trial['requests']} requests: {'ok' if trial['ok'] else 'OOM'}", flush=True)
        return trial["ok"]


def build_mode_runner(args: argparse.Namespace, mode: str) -> Any:
    """A ModelRunner with the scheduler's effective arguments for `mode`."""
    from sglx.srt.managers.scheduler import embedding_server_args
    from sglx.srt.model_executor.model_runner import ModelRunner

    free_device_memory()  # a previous mode's runner may linger in a reference cycle, holding its KV pool
    sa = mode_server_args(args, mode)
    cfg = ModelConfig.from_path(sa.model_path, dtype=sa.dtype, context_length=sa.context_length,
                                is_embedding=True, device=sa.device)
    return ModelRunner(cfg, embedding_server_args(sa, cfg))


def free_device_memory() -> None:
    """Collect unreachable objects (a runner is a reference cycle) and return torch's cached blocks."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def largest_batch_mode(args: argparse.Namespace, mode: str) -> Dict[str, Any]:
    runner = build_mode_runner(args, mode)
    try:
        caps = {"kv_slots": runner.max_total_num_tokens - runner.page_size,
                "rows": runner.max_running_requests * args.largest_batch_request_len}
        if args.largest_batch_max_tokens:
            caps["option"] = args.largest_batch_max_tokens
        cap_by = min(caps, key=caps.get)
        trial = PrefillTrial(runner, args.largest_batch_request_len, args.seed)
        print(f"[{mode}] largest batch: KV pool {runner.token_to_kv_pool.mem_usage_bytes() / 2**30:.2f} GiB, "
              f"{runner.max_total_num_tokens} slots; searching up to {caps[cap_by]} tokens", flush=True)
        res = search_largest(trial, args.largest_batch_request_len, caps[cap_by], args.largest_batch_tol,
                             min_step=max(1, args.largest_batch_request_len // 16))
        return {"part": "largest_batch", "mode": mode, "skip_kv_cache": runner.skip_kv_cache,
                "max_total_num_tokens": runner.max_total_num_tokens,
                "kv_pool_bytes": runner.token_to_kv_pool.mem_usage_bytes(),
                "request_len": args.largest_batch_request_len, "largest_ok_tokens": res.largest_ok,
                "first_fail_tokens": res.first_fail, "bound": "oom" if res.first_fail else f"cap:{cap_by}",
                "cap_tokens": caps[cap_by], "trials": trial.trials}
    finally:
        free_device_memory()


# ------------------------------------------------------------------------------------- forwards only
def pack_batches(lengths: Sequence[int], budget: int) -> List[List[int]]:
    """The workload in submission order, cut into batches of at most `budget` tokens the way the scheduler's
    PrefillAdder fills them (an input longer than the budget runs alone)."""
    batches: List[List[int]] = []
    for n in lengths:
        if batches and sum(batches[-1]) + n <= budget:
            batches[-1].append(n)
        else:
            batches.append([n])
    return batches


def forward_flops(runner: Any, lens: Sequence[int]) -> int:
    """2 x tokens x the layers' matmul parameters (no lm_head: embeddings) + attention (QK^T and PV; the
    lower triangle for causal models, the full square for encoders)."""
    cfg = runner.model_config
    params = sum(p.numel() for name, p in runner.model.named_parameters()
                 if p.dim() == 2 and ".layers." in f".{name}" and "norm" not in name)
    square = sum(n * n for n in lens) * cfg.num_attention_heads * cfg.head_dim * cfg.num_hidden_layers
    return 2 * sum(lens) * params + (4 if cfg.is_encoder_only else 2) * square


def read_prefix_free_from_pool(runner: Any) -> None:
    """Make the runner's prefill backend attend prefix-free batches from the pool (the pool-read mode)."""
    from sglx.srt.layers.attention.base_attn_backend import HybridAttnBackend

    backend = runner.attn_backend
    backend = backend.prefill if isinstance(backend, HybridAttnBackend) else backend
    if not hasattr(backend, "ragged_prefix_free"):
        raise ValueError(f"{POOL_READ} needs the flashinfer or fa3 prefill backend, not {type(backend).__name__}")
    backend.ragged_prefix_free = False


def copy_attention_output(runner: Any) -> None:
    """Every attention layer writes a scratch tensor that is then copied into its output (the pre-seeds mode)."""
    from sglx.srt.layers.radix_attention import RadixAttention

    layers = [m for m in runner.model.modules() if isinstance(m, RadixAttention)]
    for layer in layers:
        layer.force_output_copy = True
    if not layers:
        raise ValueError("the model has no RadixAttention layer")


def forwards_mode(args: argparse.Namespace, mode: str, inputs: List[List[int]]) -> Dict[str, Any]:
    """The model runner alone on the whole workload: every batch the scheduler would form, forward by forward
    (synchronized), so the Engine's items/s can be read against its forward time. Then one forward of the
    first batch under torch.profiler: its kernels by device time."""
    from sglx.bench_one_batch import _device_table, matmul_rate

    runner = build_mode_runner(args, "cache" if mode in (POOL_READ, PRE_SEEDS) else mode)
    try:
        if mode in (POOL_READ, PRE_SEEDS):
            read_prefix_free_from_pool(runner)
        if mode == PRE_SEEDS:
            copy_attention_output(runner)
        gen = torch.Generator().manual_seed(args.seed)
        # One budget for every path (the engine's skip path defaults to a larger one): the paths then differ
        # in their attention only.
        budget = args.max_prefill_tokens or DEFAULT_MAX_PREFILL_TOKENS
        batches = pack_batches([len(x) for x in inputs], budget)
        for lens in batches[:2]:  # warm-up
            run_forward(runner, lens, gen)
        launches: List[float] = []
        walls = [run_forward(runner, lens, gen, launch_times=launches) for lens in batches]
        flops = sum(forward_flops(runner, lens) for lens in batches)
        total = sum(walls)
        rec: Dict[str, Any] = {"part": "forwards", "mode": mode, "skip_kv_cache": runner.skip_kv_cache,
                               "batches": len(batches), "forward_s": total, "launch_s": sum(launches),
                               "items_per_s": len(inputs) / total,
                               "tokens_per_s": sum(map(len, inputs)) / total, "tflops": flops / total / 1e12}
        if runner.device.type == "cuda":
            from torch.profiler import ProfilerActivity, profile

            # The whole workload again, GPU activity only: the sum of its kernels' (and copies') device time is
            # what the modes cost the GPU, free of the host's pace (the runner alone launches each forward after
            # the last one's sync, so when launches take about as long as the GPU's work, as under fp8, the wall
            # times above measure the host as much as the GPU).
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for lens in batches:
                    run_forward(runner, lens, gen)
            rec["gpu_s"] = sum(e.time_range.elapsed_us() for e in prof.events()
                               if e.device_type == torch.autograd.DeviceType.CUDA) / 1e6
            rec["gpu_items_per_s"] = len(inputs) / rec["gpu_s"]
            rec["matmul_probe_tflops"] = matmul_rate(runner.device, 8192) / 1e12
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                rec["profiled_wall_s"] = run_forward(runner, batches[0], gen)
            gpu = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
            rec.update(profiled_tokens=sum(batches[0]), profiled_gpu_ops=len(gpu),
                       profiled_gpu_s=sum(e.time_range.elapsed_us() for e in gpu) / 1e6)
            print(f"[{mode}] one forward of {rec['profiled_tokens']} tokens: wall {rec['profiled_wall_s'] * 1e3:.2f} "
                  f"ms (profiler on), {len(gpu)} GPU ops, {rec['profiled_gpu_s'] * 1e3:.2f} ms GPU time\n"
                  + _device_table(prof.key_averages(), args.profile_top), flush=True)
        gpu = f"; GPU time {rec['gpu_s']:.3f} s = {rec['gpu_items_per_s']:.2f} items/s" if "gpu_s" in rec else ""
        print(f"[{mode}] forwards only: {len(batches)} batches in {total:.3f} s (host launches {sum(launches):.3f} s), "
              f"{rec['items_per_s']:.2f} items/s, {rec['tflops']:.0f} TFLOP/s{gpu}", flush=True)
        return rec
    finally:
        free_device_memory()


# ------------------------------------------------------------------------------------- report and main
def label(r: Dict[str, Any]) -> str:
    """A record's mode, with "/sync" when it ran without the overlap schedule."""
    return r["mode"] + ("/sync" if r.get("schedule") == "sync" else "")


def print_table(records: List[Dict[str, Any]], cosine: Optional[float], checked: int) -> None:
    enc = {label(r): r for r in records if r["part"] == "encode" and "error" not in r}
    big = {label(r): r for r in records if r["part"] == "largest_batch" and "error" not in r}
    head = f"{'mode':10} {'skip_kv':>7} {'items/s':>9} {'tok/s':>11} {'wall s':>8} {'KV pool GiB':>11} " \
           f"{'KV slots':>10} {'largest prefill (bound)':>28}"
    print("\n" + head + "\n" + "-" * len(head))
    for mode in dict.fromkeys([label(r) for r in records if r["part"] in ("encode", "largest_batch")]):
        e, b = enc.get(mode, {}), big.get(mode, {})
        src = e or b
        fmt = (lambda k, f: format(e[k], f) if k in e else "-")
        pool = f"{src['kv_pool_bytes'] / 2**30:.2f}" if "kv_pool_bytes" in src else "-"
        largest = f"{b['largest_ok_tokens']} ({b['bound']})" if b else "-"
        print(f"{mode:10} {str(src.get('skip_kv_cache', '-')):>7} {fmt('items_per_s', '.2f'):>9} "
              f"{fmt('tokens_per_s', '.0f'):>11} {fmt('wall_s', '.2f'):>8} {pool:>11} "
              f"{str(src.get('max_total_num_tokens', '-')):>10} {largest:>28}")
    for r in records:
        if r["part"] == "forwards" and "error" not in r:
            print(f"forwards only [{r['mode']}]: {r['batches']} batches in {r['forward_s']:.2f} s "
                  f"(host launches {r['launch_s']:.2f} s), "
                  f"{r['items_per_s']:.2f} items/s, {r['tokens_per_s']:.0f} tok/s, {r['tflops']:.0f} TFLOP/s"
                  + (f"; GPU time {r['gpu_s']:.3f} s = {r['gpu_items_per_s']:.2f} items/s" if "gpu_s" in r else ""))
    for r in records:
        if "error" in r or "warning" in r:
            print(f"{r['part']} {r['mode']}: {r.get('error') or r.get('warning')}")
    if cosine is not None:
        verdict = "OK" if cosine >= COSINE_GOAL else "MISMATCH"
        print(f"embeddings skip vs the other modes: min cosine {cosine:.6f} over {checked} items ({verdict}, goal >= "
              f"{COSINE_GOAL})")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_engine_args(p, os.path.join(HERE, "configs", "qwen3-0.6b"))
    p.add_argument("--attention-backend", default=None, help="default: the server default")
    p.add_argument("--num-inputs", type=int, default=512)
    p.add_argument("--min-len", type=int, default=500)
    p.add_argument("--max-len", type=int, default=7000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-prefill-tokens", type=int, default=None, help="the scheduler's tokens per batch")
    p.add_argument("--max-total-tokens", type=int, default=None)
    p.add_argument("--context-length", type=int, default=None)
    p.add_argument("--mem-fraction-static", type=float, default=None)
    p.add_argument("--modes", nargs="+", choices=MODES + (POOL_READ, PRE_SEEDS), default=list(MODES),
                   help=f"the Engines timed (and searched for their largest batch: skip and cache only); {POOL_READ} "
                        f"and {PRE_SEEDS} serve through the fa3 backends of benchmark/seed_baselines.py (the "
                        "seeds' baselines, as --forward-modes describes)")
    add_schedule_arg(p)
    p.add_argument("--warmup-inputs", type=int, default=16, help="inputs encoded (untimed) before timing")
    p.add_argument("--repeats", type=int, default=1, help="timed encodes of all inputs per Engine (median)")
    p.add_argument("--check-items", type=int, default=32, help="embeddings compared across modes")
    p.add_argument("--trace-steps", type=int, default=0,
                   help="after the timed encodes, profile this many batches of one more encode (trace_gaps.py)")
    p.add_argument("--trace-activities", nargs="+", default=None, choices=["CPU", "GPU"],
                   help="what the trace records (default both)")
    p.add_argument("--trace-dir", default=None, help="where the traces go (default: $SGLX_TORCH_PROFILER_DIR or /tmp)")
    p.add_argument("--skip-largest-batch", action="store_true")
    p.add_argument("--skip-encode", action="store_true", help="only the largest-batch search")
    p.add_argument("--forwards", action="store_true",
                   help="also time the model runner alone on the workload's batches and profile one forward")
    p.add_argument("--forward-modes", nargs="+", choices=MODES + (POOL_READ, PRE_SEEDS), default=None,
                   help=f"the runners of --forwards (default: --modes); {POOL_READ}: the cache mode with attention "
                        "reading each batch's k/v back from the pool through the page table (flashinfer/fa3); "
                        f"{PRE_SEEDS}: {POOL_READ} plus a copy of each attention output (no out=)")
    p.add_argument("--profile-top", type=int, default=25, help="kernels listed by --forwards")
    p.add_argument("--largest-batch-request-len", type=int, default=4096)
    p.add_argument("--largest-batch-max-tokens", type=int, default=None, help="cap of the search")
    p.add_argument("--largest-batch-tol", type=float, default=0.05)
    p.add_argument("--call-timeout", type=float, default=0.0, help="seconds per engine call (0: none)")
    p.add_argument("--log-level", default="warning")
    p.add_argument("--result-file", default=None, help="JSON lines, appended")
    return p


def run(args: argparse.Namespace) -> List[Dict[str, Any]]:
    if not 1 <= args.min_len <= args.max_len:
        raise SystemExit("--min-len must be >= 1 and <= --max-len")
    args.tokenizer_path = resolve_tokenizer(args.model_path, args.tokenizer_path)
    vocab = ModelConfig.from_path(args.model_path).vocab_size
    inputs = make_inputs(args.num_inputs, args.min_len, args.max_len, vocab, args.seed)
    keep = check_indices(len(inputs), args.check_items)
    common = {"model_path": args.model_path, "dtype": args.dtype, "seed": args.seed,
              "min_len": args.min_len, "max_len": args.max_len, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
              **device_info(torch.device(mode_server_args(args, args.modes[0]).device))}
    records: List[Dict[str, Any]] = []
    kept: Dict[str, torch.Tensor] = {}
    parts = [] if args.skip_encode else [("encode", m, sched) for sched in args.schedule for m in args.modes]
    parts += [("forwards", m, "overlap") for m in (args.forward_modes or args.modes)] if args.forwards else []
    parts += [] if args.skip_largest_batch else [("largest_batch", m, "overlap") for m in args.modes if m in MODES]
    for part, mode, sched in parts:  # every engine is gone before the in-process runners take the card
        print(f"== {part} [{mode}{'/sync' if sched == 'sync' else ''}]", flush=True)
        try:
            rec = (encode_mode(args, mode, inputs, keep, sched) if part == "encode"
                   else forwards_mode(args, mode, inputs) if part == "forwards"
                   else largest_batch_mode(args, mode))
        except Exception as e:
            import traceback

            traceback.print_exc()
            rec = {"part": part, "mode": mode, "schedule": sched, "error": f"{type(e).__name__}: {e}"}
        if "_kept" in rec:
            kept.setdefault(mode, rec.pop("_kept"))  # the first schedule's
        rec = {**common, **rec}
        records.append(rec)
        append_jsonl(args.result_file, rec)
    cosine = None
    for mode in [m for m in kept if m != "skip"] if "skip" in kept and keep else []:
        c = min_cosine(kept["skip"], kept[mode])
        cosine = c if cosine is None else min(cosine, c)
        rec = {**common, "part": "agreement", "mode": f"skip_vs_{mode}", "min_cosine": c,
               "checked_items": len(keep), "indices": keep, "ok": c >= COSINE_GOAL}
        records.append(rec)
        append_jsonl(args.result_file, rec)
    print_table(records, cosine, len(keep))
    return records


def main(argv: Optional[Sequence[str]] = None) -> int:
    records = run(build_parser().parse_args(argv))
    bad = any("error" in r for r in records) or any(r.get("ok") is False for r in records)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

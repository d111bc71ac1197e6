"""Fixed-shape prefill/decode timing of the model runner alone (no HTTP, no tokenizer, no scheduler).

    python -m sglx.bench_one_batch --model-path benchmark/configs/llama-3.1-8b \
        --attention-backend triton torch_native --batch-size 1 64 256 --input-len 512 --output-len 257 \
        --result-file out.jsonl

For every backend and every (batch, input, output) case: one prefill of batch x input random tokens, then
output - 1 greedy decode steps, each timed with a device sync on both sides. The batch bookkeeping (rows,
KV slots, ModelWorkerBatch, SamplingBatchInfo) is rebuilt every step, as the scheduler does, and is timed.
The same run measures the device's copy bandwidth and matmul rate, so each case also gets its floors:
the decode step's HBM floor and the prefill's share of the measured matmul rate. One JSON line per case.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from sglx.srt.configs.model_config import ModelConfig
from sglx.srt.layers.attention.registry import create_attention_backend
from sglx.srt.model_executor.forward_batch import ForwardMode, ModelWorkerBatch
from sglx.srt.model_executor.model_runner import ModelRunner
from sglx.srt.sampling.sampling_batch_info import SamplingBatchInfo
from sglx.srt.sampling.sampling_params import SamplingParams
from sglx.srt.server_args import ServerArgs

# Warmup passes decode this many steps: enough for every residue of a length mod 16, on which Triton
# specializes integer arguments, so no compile lands inside the timed loop.
WARMUP_DECODE_STEPS = 16


@dataclass(frozen=True)
class Case:
    batch_size: int
    input_len: int
    output_len: int  # tokens generated: the prefill gives the first, output_len - 1 decode steps the rest


@dataclass
class BenchReq:
    """The fields SamplingBatchInfo.from_reqs reads from a request."""

    sampling_params: SamplingParams
    origin_input_ids: List[int]
    output_ids: List[int] = field(default_factory=list)
    eos_token_ids: set = field(default_factory=set)
    row: int = 0
    kv_len: int = 0
    grammar: Any = None  # (no structured output here)


@dataclass
class PassTiming:
    prefill_s: float
    decode_steps_s: List[float]
    kv_slots_in_use: int


# ---------------------------------------------------------------------------------------------- device probes
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_repeated(fn: Callable[[], Any], device: torch.device, iters: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / iters


def copy_bandwidth(device: torch.device, nbytes: int, iters: int = 10) -> float:
    """Device-to-device copy of an nbytes buffer: (read + write bytes) / time, bytes/s."""
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    secs = _time_repeated(lambda: dst.copy_(src), device, iters)
    del src, dst
    return 2 * nbytes / secs


def matmul_rate(device: torch.device, n: int, dtype: torch.dtype = torch.bfloat16, iters: int = 10) -> float:
    """FLOP/s of an n x n x n matmul (2 n^3 FLOPs each)."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    secs = _time_repeated(lambda: torch.matmul(a, b, out=out), device, iters)
    return 2 * n**3 / secs


def device_info(device: torch.device) -> Dict[str, Any]:
    info: Dict[str, Any] = {"device": str(device), "torch_version": torch.__version__}
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
        info["cuda_version"] = torch.version.cuda
        with contextlib.suppress(ImportError):
            import triton

            info["triton_version"] = triton.__version__
    else:
        import platform

        info["device_name"] = platform.processor() or platform.machine()
    return info


# ---------------------------------------------------------------------------------------------- model size
@dataclass(frozen=True)
class ModelSize:
    total_params: int
    non_embedding_params: int  # everything but the input embedding and the lm_head
    lm_head_params: int  # vocab x hidden, tied or not
    param_bytes: int  # bytes per parameter (model dtype)
    kv_bytes_per_token: int  # K and V of one token, all layers

    @property
    def matmul_params(self) -> int:
        return self.non_embedding_params + self.lm_head_params

    @property
    def weight_bytes_per_step(self) -> int:
        """What one forward reads: every weight once, the input embedding only as a gather (not counted)."""
        return self.matmul_params * self.param_bytes


def model_size(runner: ModelRunner) -> ModelSize:
    model, cfg = runner.model, runner.model_config
    total = sum(p.numel() for p in model.parameters())
    embedding = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding))
    lm_head = getattr(model, "lm_head", None)
    untied_head = sum(p.numel() for p in lm_head.parameters()) if isinstance(lm_head, torch.nn.Module) else 0
    return ModelSize(
        total_params=total,
        non_embedding_params=total - embedding - untied_head,
        lm_head_params=cfg.vocab_size * cfg.hidden_size,
        param_bytes=torch.empty(0, dtype=cfg.dtype).element_size(),
        kv_bytes_per_token=runner.cell_size_bytes(),
    )


def prefill_flops(size: ModelSize, cfg: ModelConfig, case: Case) -> int:
    """tokens x 2 x (non-embedding + lm_head params) + causal attention (QK^T and PV over the lower triangle).
    The lm_head term counts every token, though the engine applies it to the last position only."""
    tokens = case.batch_size * case.input_len
    attn = case.batch_size * 2 * case.input_len**2 * cfg.num_attention_heads * cfg.head_dim * cfg.num_hidden_layers
    return tokens * 2 * size.matmul_params + attn


def decode_floor_s(size: ModelSize, case: Case, bandwidth: float) -> float:
    """HBM floor of an average decode step: weights once plus the KV of the mean context, at copy bandwidth."""
    kv = case.batch_size * (case.input_len + case.output_len / 2) * size.kv_bytes_per_token
    return (size.weight_bytes_per_step + kv) / bandwidth


# ---------------------------------------------------------------------------------------------- one pass
class BatchDriver:
    """Plays the scheduler for one fixed batch: rows and KV slots from the runner's pools, greedy sampling."""

    def __init__(self, runner: ModelRunner, case: Case, seed: int) -> None:
        self.runner, self.case = runner, case
        self.vocab = runner.model_config.vocab_size
        gen = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, self.vocab, (case.batch_size, case.input_len), generator=gen).tolist()
        sp = SamplingParams(temperature=0.0, max_new_tokens=case.output_len, ignore_eos=True)
        sp.verify(self.vocab)
        sp.normalize()
        self.reqs = [BenchReq(sp, row_ids) for row_ids in ids]
        self.last_locs: List[int] = [-1] * case.batch_size  # KV slot of each request's newest token (paged)
        self.last_logits: Optional[torch.Tensor] = None

    def reset_pools(self) -> None:
        self.runner.req_to_token_pool.clear()
        self.runner.token_to_kv_pool_allocator.clear()

    def _sample(self, mode: ForwardMode, input_ids: List[int], prefix_lens: List[int], loc: torch.Tensor) -> None:
        """Run the step and append each request's greedy token (the logits stay in `last_logits`)."""
        batch = ModelWorkerBatch(
            forward_mode=mode,
            input_ids=input_ids,
            req_pool_indices=[r.row for r in self.reqs],
            seq_lens=[r.kv_len for r in self.reqs],
            prefix_lens=prefix_lens,
            out_cache_loc=loc,
            sampling_info=SamplingBatchInfo.from_reqs(self.reqs, self.vocab, self.runner.device),
        )
        result = self.runner.forward_batch_generation(batch)
        self.last_logits = result.logits_output.next_token_logits
        next_ids = result.sampler_output.next_token_ids.tolist()
        for r, t in zip(self.reqs, next_ids):
            r.output_ids.append(t)

    def prefill(self) -> None:
        pool, alloc, n = self.runner.req_to_token_pool, self.runner.token_to_kv_pool_allocator, self.case.input_len
        for r in self.reqs:
            r.row = pool.alloc()
            if r.row is None:
                raise RuntimeError("ReqToTokenPool exhausted")
        bs = len(self.reqs)
        loc = alloc.alloc_extend([0] * bs, [n] * bs, [-1] * bs, bs * n)
        if loc is None:
            raise RuntimeError(f"KV pool exhausted: {bs * n} tokens for the prefill")
        for i, r in enumerate(self.reqs):
            pool.write(r.row, 0, loc[i * n : (i + 1) * n])
            r.kv_len = n
        if self.runner.page_size > 1:
            self.last_locs = loc.view(bs, n)[:, -1].tolist()
        self._sample(ForwardMode.EXTEND, [t for r in self.reqs for t in r.origin_input_ids], [0] * bs, loc)

    def decode(self) -> None:
        prefix_lens = [r.kv_len for r in self.reqs]
        for r in self.reqs:
            r.kv_len += 1
        loc = self.runner.token_to_kv_pool_allocator.alloc_decode([r.kv_len for r in self.reqs], self.last_locs)
        if loc is None:
            raise RuntimeError("KV pool exhausted during decode")
        r2t = self.runner.req_to_token_pool.req_to_token
        rows = torch.tensor([r.row for r in self.reqs], dtype=torch.int64).to(r2t.device, non_blocking=True)
        cols = torch.tensor(prefix_lens, dtype=torch.int64).to(r2t.device, non_blocking=True)
        r2t[rows, cols] = loc.to(r2t.dtype)
        if self.runner.page_size > 1:
            self.last_locs = loc.tolist()
        self._sample(ForwardMode.DECODE, [r.output_ids[-1] for r in self.reqs], prefix_lens, loc)

    def kv_slots_in_use(self) -> int:
        alloc = self.runner.token_to_kv_pool_allocator
        return self.runner.max_total_num_tokens - alloc.available_size()


def run_pass(runner: ModelRunner, case: Case, decode_steps: int, seed: int) -> PassTiming:
    """Prefill then `decode_steps` decode steps from empty pools; each stamp follows a device sync, so the
    step times add up to the wall time of the whole pass (host bookkeeping between steps included)."""
    driver = BatchDriver(runner, case, seed)
    driver.reset_pools()
    sync(runner.device)
    t0 = time.perf_counter()
    driver.prefill()
    sync(runner.device)
    stamps = [time.perf_counter()]
    for _ in range(decode_steps):
        driver.decode()
        sync(runner.device)
        stamps.append(time.perf_counter())
    steps = [b - a for a, b in zip(stamps, stamps[1:])]
    return PassTiming(stamps[0] - t0, steps, driver.kv_slots_in_use())


def profile_decode_step(runner: ModelRunner, case: Case, seed: int, top: int) -> Dict[str, Any]:
    """One decode step (after a prefill and a few steps) under torch.profiler: top ops and GPU busy time."""
    from torch.profiler import ProfilerActivity, profile

    driver = BatchDriver(runner, case, seed)
    driver.reset_pools()
    driver.prefill()
    for _ in range(min(3, case.output_len - 1)):
        driver.decode()
    cuda = runner.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync(runner.device)
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        driver.decode()
        sync(runner.device)
        wall = time.perf_counter() - t0
    # Device-side events: kernels, memcpys and memsets, as the CUDA activity trace records them.
    gpu_ops = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    gpu_s = sum(e.time_range.elapsed_us() for e in gpu_ops) / 1e6
    averages = prof.key_averages()
    tables = {"self CPU time": averages.table(sort_by="self_cpu_time_total", row_limit=top)}
    if cuda:
        tables["self device time"] = _device_table(averages, top)
    return {"wall_s": wall, "gpu_op_count": len(gpu_ops), "gpu_time_s": gpu_s,
            "gpu_busy_fraction": gpu_s / wall if wall > 0 else None, "tables": tables}


def _device_table(averages: Any, top: int) -> str:
    for key in ("self_device_time_total", "self_cuda_time_total"):  # the name changed across torch versions
        with contextlib.suppress(Exception):
            return averages.table(sort_by=key, row_limit=top)
    return ""


# ---------------------------------------------------------------------------------------------- one case
def case_record(
    case: Case, timing: PassTiming, size: ModelSize, cfg: ModelConfig, probe: Dict[str, float]
) -> Dict[str, Any]:
    bs, steps = case.batch_size, timing.decode_steps_s
    rec: Dict[str, Any] = dataclasses.asdict(case)
    rec.update(prefill_latency_s=timing.prefill_s, prefill_throughput_tok_s=bs * case.input_len / timing.prefill_s)
    flops = prefill_flops(size, cfg, case)
    rec.update(prefill_model_flops=flops, prefill_flops_per_s=flops / timing.prefill_s,
               prefill_share_of_matmul_rate=flops / timing.prefill_s / probe["matmul_flops_per_s"])
    total = timing.prefill_s + sum(steps)
    rec.update(total_latency_s=total, overall_throughput_tok_s=bs * (case.input_len + case.output_len) / total,
               decode_steps=len(steps), kv_slots_in_use=timing.kv_slots_in_use)
    if steps:
        median = statistics.median(steps)
        # The metric: (time to generate output_len tokens - time to generate 1) / (output_len - 1).
        per_token = sum(steps) / (case.output_len - 1)
        floor = decode_floor_s(size, case, probe["copy_bandwidth_bytes_per_s"])
        rec.update(decode_median_latency_s=median, decode_median_throughput_tok_s=bs / median,
                   decode_latency_s=per_token, decode_throughput_tok_s=bs / per_token,
                   decode_min_latency_s=min(steps), decode_max_latency_s=max(steps),
                   decode_hbm_floor_s=floor, decode_median_over_floor=median / floor,
                   decode_latency_over_floor=per_token / floor, decode_step_latencies_s=steps)
    return rec


def print_summary(backend: str, rec: Dict[str, Any]) -> None:
    head = f"[{backend}] bs={rec['batch_size']} in={rec['input_len']} out={rec['output_len']}"
    print(f"{head} prefill: {rec['prefill_latency_s'] * 1e3:.2f} ms, {rec['prefill_throughput_tok_s']:.0f} tok/s, "
          f"{rec['prefill_share_of_matmul_rate']:.1%} of the matmul rate")
    if rec["decode_steps"]:
        print(f"{head} decode: median {rec['decode_median_latency_s'] * 1e3:.2f} ms/step "
              f"({rec['decode_median_throughput_tok_s']:.0f} tok/s), (t_out - t_1)/(out - 1) "
              f"{rec['decode_latency_s'] * 1e3:.2f} ms, HBM floor {rec['decode_hbm_floor_s'] * 1e3:.2f} ms "
              f"(median/floor {rec['decode_median_over_floor']:.2f})")
    print(f"{head} total: {rec['total_latency_s']:.3f} s, {rec['overall_throughput_tok_s']:.0f} tok/s", flush=True)


# ---------------------------------------------------------------------------------------------- set-up
def all_cases(args: argparse.Namespace) -> List[Case]:
    cases = [Case(b, i, o) for b, i, o in itertools.product(args.batch_size, args.input_len, args.output_len)]
    for spec in args.case or []:
        b, i, o = (int(x) for x in spec.split(":"))
        cases.append(Case(b, i, o))
    for c in cases:
        if min(c.batch_size, c.input_len, c.output_len) < 1:
            raise ValueError(f"batch size, input and output lengths must be >= 1: {c}")
    return cases


def pages(tokens: int, page: int) -> int:
    return -(-tokens // page)


def build_runner(args: argparse.Namespace, cases: Sequence[Case]) -> ModelRunner:
    page = args.page_size
    # Each request's KV (+1 token for a profiled extra step, +1 page of slack), for the largest case.
    need = max(c.batch_size * (pages(c.input_len + c.output_len + 1, page) + 1) * page for c in cases)
    context = args.context_length or max(c.input_len + c.output_len for c in cases) + 2 * page
    sa = ServerArgs(
        model_path=args.model_path, load_format=args.load_format, device=args.device, dtype=args.dtype,
        attention_backend=args.attention_backend[0], page_size=page, context_length=context,
        max_total_tokens=args.max_total_tokens or need, max_running_requests=max(c.batch_size for c in cases),
        random_seed=args.seed, disable_cuda_graph=True, disable_radix_cache=True,
    )
    cfg = ModelConfig.from_path(sa.model_path, dtype=sa.dtype, context_length=sa.context_length, device=sa.device)
    runner = ModelRunner(cfg, sa)
    if runner.max_total_num_tokens < need:
        raise RuntimeError(f"KV pool of {runner.max_total_num_tokens} tokens < {need} needed by the largest case")
    return runner


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sglx.bench_one_batch", description=__doc__.split("\n\n")[0])
    p.add_argument("--model-path", required=True, help="HF directory (config.json alone is enough with dummy)")
    p.add_argument("--load-format", default="dummy")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--attention-backend", nargs="+", default=None,
                   help="one or more backends, run in turn on the same loaded model")
    p.add_argument("--batch-size", type=int, nargs="+", default=[1, 64, 256])
    p.add_argument("--input-len", type=int, nargs="+", default=[512])
    p.add_argument("--output-len", type=int, nargs="+", default=[257])
    p.add_argument("--case", action="append", metavar="BS:IN:OUT",
                   help="extra case beside the product of the three lists (OUT 1 = prefill only)")
    p.add_argument("--page-size", type=int, default=1)
    p.add_argument("--max-total-tokens", type=int, default=None, help="default: what the largest case needs")
    p.add_argument("--context-length", type=int, default=None, help="default: longest input + output")
    p.add_argument("--warmup", type=int, default=1, help=f"untimed passes per case (prefill + "
                   f"{WARMUP_DECODE_STEPS} decode steps each)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--result-file", default=None, help="JSON lines, appended, one per backend and case")
    p.add_argument("--copy-bytes", type=int, default=2 << 30, help="buffer size of the copy-bandwidth probe")
    p.add_argument("--matmul-size", type=int, default=8192, help="n of the n^3 bf16 matmul probe")
    p.add_argument("--profile", action="store_true", help="profile one extra decode step per case")
    p.add_argument("--profile-batch-size", type=int, nargs="*", default=None, help="default: every batch size")
    p.add_argument("--profile-top", type=int, default=15)
    p.add_argument("--profile-file", default=None, help="append the profiler tables here (default: stdout)")
    return p


def _emit_profile(args: argparse.Namespace, backend: str, case: Case, prof: Dict[str, Any]) -> None:
    text = [f"## {backend} decode step, bs={case.batch_size} in={case.input_len} out={case.output_len}: "
            f"wall {prof['wall_s'] * 1e3:.2f} ms (profiler on), {prof['gpu_op_count']} GPU ops taking "
            f"{prof['gpu_time_s'] * 1e3:.2f} ms"]
    text += [f"### sorted by {k}\n{v}" for k, v in prof["tables"].items()]
    out = "\n".join(text) + "\n"
    if args.profile_file:
        with open(args.profile_file, "a") as f:
            f.write(out)
    else:
        print(out)


def bench_case(runner: ModelRunner, case: Case, args: argparse.Namespace, backend: str, size: ModelSize,
               probe: Dict[str, Any]) -> Dict[str, Any]:
    for _ in range(args.warmup):
        run_pass(runner, case, min(WARMUP_DECODE_STEPS, case.output_len - 1), args.seed)
    timing = run_pass(runner, case, case.output_len - 1, args.seed)
    rec = case_record(case, timing, size, runner.model_config, probe)
    print_summary(backend, rec)
    if args.profile and (args.profile_batch_size is None or case.batch_size in args.profile_batch_size):
        try:
            prof = profile_decode_step(runner, case, args.seed, args.profile_top)
        except Exception as e:  # a profiler problem must not cost the timings
            traceback.print_exc()
            rec["profile_error"] = f"{type(e).__name__}: {e}"
        else:
            _emit_profile(args, backend, case, prof)
            rec.update({f"profile_{k}": v for k, v in prof.items() if k != "tables"})
    return rec


def _bench_or_error(runner: ModelRunner, case: Case, args: argparse.Namespace, backend: str, size: ModelSize,
                    probe: Dict[str, Any], common: Dict[str, Any], setup_error: Optional[str]) -> Dict[str, Any]:
    """One case's record, appended to --result-file; an error is recorded and the run goes on (device time is
    scarce: one failing case must not cost the others' numbers)."""
    rec = {**common, "attention_backend": backend, **dataclasses.asdict(case)}
    try:
        if setup_error:
            raise RuntimeError(f"backend set-up failed: {setup_error}")
        rec.update(bench_case(runner, case, args, backend, size, probe))
    except Exception as e:
        traceback.print_exc()
        rec["error"] = f"{type(e).__name__}: {e}"
        if runner.device.type == "cuda":
            torch.cuda.empty_cache()
    if args.result_file:
        with open(args.result_file, "a") as f:
            f.write(json.dumps(rec) + "\n")
    return rec


def run(args: argparse.Namespace) -> List[Dict[str, Any]]:
    cases = all_cases(args)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.attention_backend is None:
        args.attention_backend = ["torch_native" if args.device == "cpu" else "triton"]
    device = torch.device(args.device)
    # Probes first, while the device memory is still free.
    probe = {"copy_bandwidth_bytes_per_s": copy_bandwidth(device, args.copy_bytes),
             "matmul_flops_per_s": matmul_rate(device, args.matmul_size), "copy_bytes": args.copy_bytes,
             "matmul_size": args.matmul_size}
    print(f"{device_info(device)}: copy {probe['copy_bandwidth_bytes_per_s'] / 1e9:.0f} GB/s, "
          f"matmul {probe['matmul_flops_per_s'] / 1e12:.1f} TFLOP/s", flush=True)
    t_load = time.perf_counter()
    runner = build_runner(args, cases)
    load_s = time.perf_counter() - t_load
    size, cfg = model_size(runner), runner.model_config
    common = {**device_info(runner.device), **probe, "model_path": args.model_path,
              "architecture": cfg.architecture, "dtype": str(cfg.dtype).replace("torch.", ""),
              "load_format": args.load_format, "page_size": args.page_size, "warmup": args.warmup,
              "model_load_s": load_s, "kv_pool_tokens": runner.max_total_num_tokens,
              **dataclasses.asdict(size), "weight_bytes_per_step": size.weight_bytes_per_step,
              "cuda_graph": False, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    records = []
    for i, backend in enumerate(args.attention_backend):
        setup_error = None
        if i > 0:  # same model and pools, another backend (ForwardBatch takes the runner's current one)
            try:
                runner.attn_backend = create_attention_backend(backend, runner)
            except Exception as e:
                traceback.print_exc()
                setup_error = f"{type(e).__name__}: {e}"
        for case in cases:
            records.append(_bench_or_error(runner, case, args, backend, size, probe, common, setup_error))
    return records


def main(argv: Optional[Sequence[str]] = None) -> int:
    records = run(build_parser().parse_args(argv))
    return 1 if any("error" in r for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())

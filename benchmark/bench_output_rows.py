"""A/B of a switch read from the environment, through the ModelRunner's prefill forwards, alternating in one
process on one card. Side A runs with the variable unset, side B with --b-env. The default B is
SGLX_ALL_OUTPUT_ROWS=1: what ForwardBatch.out_rows saves (the last layer pruned to the rows that are read, against
every row); SGLX_FUSED_GATE_UP=0 measures the gate/up GEMM with the activation in its epilogue.

    python benchmark/bench_output_rows.py --model-path benchmark/configs/qwen3-0.6b --cases 8:2048 1:8192
    python benchmark/bench_output_rows.py --model-path benchmark/configs/qwen3-0.6b --is-embedding --cases 4:4096
    python benchmark/bench_output_rows.py --model-path benchmark/configs/qwen3-0.6b --b-env SGLX_FUSED_GATE_UP=0

Dummy weights of the config. Per case (BS:LEN, random token ids), one warm-up forward of each side, then
--repeats rounds, each timing one forward of each side (the order flips every round), synchronized before and
after: generation forwards give next-token logits (`ModelRunner.forward`, no sampling), embedding forwards the
pooled vectors (`forward_batch_embedding`, the skip-KV path where the server would take it). Reports the
medians, the saving, and the largest difference between the two sides' outputs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Any, Callable, Dict, List, Optional

import torch

from sglx.srt.configs.model_config import ModelConfig
from sglx.srt.model_executor.model_runner import ModelRunner
from sglx.srt.server_args import ServerArgs
from sglx.test.runner_utils import PlacedRequests


def build_runner(args: argparse.Namespace, max_tokens: int) -> ModelRunner:
    from sglx.srt.managers.scheduler import embedding_server_args

    sa = ServerArgs(model_path=args.model_path, load_format="dummy", dtype=args.dtype, device=args.device,
                    is_embedding=args.is_embedding, max_total_tokens=max_tokens + 4096, max_running_requests=64,
                    disable_cuda_graph=True, **({"attention_backend": args.attention_backend}
                                                if args.attention_backend else {}))
    cfg = ModelConfig.from_path(sa.model_path, dtype=sa.dtype, is_embedding=args.is_embedding, device=sa.device)
    return ModelRunner(cfg, embedding_server_args(sa, cfg) if args.is_embedding else sa)


def timed(fn: Callable[[], torch.Tensor], device: torch.device) -> float:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda *a: None)
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def run_case(runner: ModelRunner, bs: int, length: int, args: argparse.Namespace) -> Dict[str, Any]:
    reqs = PlacedRequests(runner, [length] * bs, runner.model_config.vocab_size, room=0, seed=length + bs)
    batch = reqs.prefill_batch()
    batch.is_embedding = args.is_embedding
    forward = runner.forward_batch_embedding if args.is_embedding else \
        (lambda b: runner.forward(b).next_token_logits)

    env, value = args.b_env.split("=", 1)

    def side(a: bool) -> torch.Tensor:
        if a:
            os.environ.pop(env, None)
        else:
            os.environ[env] = value
        return forward(batch)

    try:
        outs = {p: side(p).float() for p in (True, False)}  # warm-up, and the outputs compared
        times: Dict[bool, List[float]] = {True: [], False: []}
        for r in range(args.repeats):
            for p in ((True, False) if r % 2 == 0 else (False, True)):
                times[p].append(timed(lambda: side(p), runner.device))
    finally:
        os.environ.pop(env, None)
        reqs.release()
    a, b = statistics.median(times[True]), statistics.median(times[False])
    return {"batch_size": bs, "input_len": length, "b_env": args.b_env, "a_ms": a * 1e3, "b_ms": b * 1e3,
            "saving": 1 - a / b, "speedup": b / a,
            "max_abs_diff": float((outs[True] - outs[False]).abs().max())}


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-path", required=True, help="HF directory (config.json is enough: dummy weights)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default="cuda")
    p.add_argument("--attention-backend", default=None)
    p.add_argument("--is-embedding", action="store_true")
    p.add_argument("--cases", nargs="+", default=["8:2048", "1:8192"], metavar="BS:LEN")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--b-env", default="SGLX_ALL_OUTPUT_ROWS=1", metavar="NAME=VALUE", help="side B's switch")
    p.add_argument("--result-file", default=None, help="JSON lines, appended")
    args = p.parse_args(argv)
    cases = [tuple(int(x) for x in c.split(":")) for c in args.cases]
    runner = build_runner(args, max(bs * n for bs, n in cases))
    name = torch.cuda.get_device_name() if runner.device.type == "cuda" else "cpu"
    for bs, n in cases:
        rec = {"model": args.model_path, "device": name, "is_embedding": args.is_embedding, **run_case(runner, bs, n, args)}
        print(f"{'embed' if args.is_embedding else 'prefill'} bs={bs} len={n}: A {rec['a_ms']:.2f} ms, "
              f"B ({args.b_env}) {rec['b_ms']:.2f} ms, A saves {rec['saving'] * 100:.2f}% "
              f"(x{rec['speedup']:.4f}), max |diff| {rec['max_abs_diff']:.3g}", flush=True)
        if args.result_file:
            with open(args.result_file, "a") as f:
                f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()

"""Structured output's (and penalties') cost in decode, and what the overlap schedule wins back (the scheduler in-process).

    python benchmark/bench_structured_output.py --config benchmark/configs/qwen3-0.6b --tokenizer DIR --out so.json

One Scheduler per schedule (overlap on, then off: `--disable-overlap-schedule`) on dummy weights of the config,
its vocabulary resized to the tokenizer's; per mode it decodes --num-requests requests at once (temperature 1,
seeded) and reports output tokens per second of wall time from the first step to idle, the median of
--repeats runs after one warm-up:

  * free: no constraint, `ignore_eos`, --max-new-tokens tokens each;
  * json: each request constrained to a JSON list of exactly --items words out of three (about five tokens an
    item), so every request writes a list and stops on its grammar;
  * penalty: as free, with a frequency penalty of 0.5 (its token counts are kept on the device: until
    sampling/penalty_counts.py they were rebuilt from the host ids every step, which also split the step).
  * thinking: as json, but `constrain_after_reasoning` with a reasoning end tag the requests never write
    (logit_bias -100), so they think for all of --max-new-tokens: the constraint waits, unused (a thinking
    request's steps are not split since `267ef68`; before, they were, like json's).

Under overlap, a json step queues its forward before the previous step's tokens reach the host and fills the
grammars' masks while it runs (Scheduler.step); without overlap every step waits for the previous one.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Dict, List

import torch

from sglx.srt.hf_transformers_utils import get_tokenizer
from sglx.srt.managers.io_struct import TokenizedGenerateReqInput
from sglx.srt.managers.scheduler import Scheduler
from sglx.srt.sampling.sampling_params import SamplingParams
from sglx.srt.server_args import ServerArgs
from sglx.test.scheduler_utils import Sink, run_until_idle


def build(config_dir: str, tokenizer: str, overlap: bool, num_requests: int, device: str) -> Scheduler:
    config = json.loads((Path(config_dir) / "config.json").read_text())
    config["vocab_size"] = len(get_tokenizer(tokenizer))
    config["eos_token_id"] = get_tokenizer(tokenizer).eos_token_id
    model_dir = Path(tempfile.mkdtemp(prefix="sglx_bench_so_"))
    (model_dir / "config.json").write_text(json.dumps(config))
    sa = ServerArgs(model_path=str(model_dir), tokenizer_path=tokenizer, load_format="dummy", device=device,
                    disable_overlap_schedule=not overlap, max_running_requests=num_requests,
                    cuda_graph_max_bs=max(8, num_requests), mem_fraction_static=0.5,
                    constrained_json_disable_any_whitespace=True)
    s = Scheduler(sa, None)
    s.send_to_detokenizer = s.send_to_tokenizer = Sink()
    return s


def run(s: Scheduler, mode: str, args: argparse.Namespace, seed: int) -> Dict[str, float]:
    schema = json.dumps({"type": "array", "items": {"enum": ["alpha", "beta", "gamma"]},
                         "minItems": args.items, "maxItems": args.items})
    for i in range(args.num_requests):
        end_tag = s.runner.model_config.vocab_size - 1
        extra = {"json": {"json_schema": schema}, "free": {"ignore_eos": True},
                 "penalty": {"ignore_eos": True, "frequency_penalty": 0.5},
                 "thinking": {"json_schema": schema, "constrain_after_reasoning": True, "ignore_eos": True,
                              "logit_bias": {str(end_tag): -100.0}}}[mode]
        if mode == "thinking":
            s.grammar_manager.reasoning_tags = (None, end_tag)  # as --reasoning-parser deepseek-r1 would
        sp = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=1.0, sampling_seed=seed * 1000 + i,
                            **extra)
        sp.verify()
        sp.normalize()
        s.process_input(TokenizedGenerateReqInput(f"{mode}{seed}-{i}", None, list(range(100 + i, 164 + i)), sp))
    if mode in ("json", "thinking"):  # compile outside the timing (cached by spec after the first run anyway)
        while s.grammar_manager.pending:
            s.poll_grammar_queue()
    start = time.perf_counter()
    finished = run_until_idle(s)
    if s.runner.device.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - start
    tokens = sum(n for _, n in finished.values())
    bad = [rid for rid, (fr, _) in finished.items() if mode == "json" and fr["type"] != "stop"]
    return {"wall_s": wall, "tokens": tokens, "tokens_per_s": tokens / wall, "not_stopped": len(bad)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=400)
    p.add_argument("--items", type=int, default=60)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda")
    p.add_argument("--modes", nargs="+", choices=["free", "json", "penalty", "thinking"],
                   default=["free", "json", "penalty"])
    p.add_argument("--schedules", nargs="+", choices=["overlap", "sync"], default=["overlap", "sync"])
    p.add_argument("--out")
    args = p.parse_args()
    rows: List[dict] = []
    for overlap in [name == "overlap" for name in args.schedules]:
        s = build(args.config, args.tokenizer, overlap, args.num_requests, args.device)
        for mode in args.modes:
            run(s, mode, args, seed=0)  # warm-up
            runs = [run(s, mode, args, seed=r + 1) for r in range(args.repeats)]
            row = {"overlap": overlap, "mode": mode,
                   "tokens_per_s": statistics.median(r["tokens_per_s"] for r in runs),
                   "runs": runs, "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu"}
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "runs"}), flush=True)
        del s
        gc.collect()
        if args.device == "cuda":
            torch.cuda.empty_cache()
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()

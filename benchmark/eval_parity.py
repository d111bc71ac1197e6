"""Acceptance check for run_eval: GSM8K through a live sglx server vs transformers' greedy generation.

Both sides answer the very same prompts (`sglx.evals` builds them), the server through
`run_eval --api chat --temperature 0`, transformers with `generate(do_sample=False)` on the default
model's GGUF dequantized to float32 and the chat template applied as the server applies it
(`tokenizer.apply_chat_template(messages, add_generation_prompt=True)`); both are graded by the same
`Eval.score`. The two scores must agree within --tolerance questions (default 1): small numeric
differences may flip a near-tie token now and then, but not more.

    python -m sglx.launch_server &            # serves SmolLM2-135M-Instruct on :30000
    PYTHONPATH=python python benchmark/eval_parity.py --base-url http://127.0.0.1:30000

Exit status 0 when the scores agree, 1 when they do not.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from sglx.evals import Eval, load_eval
from sglx.test.run_eval import parse_args, run_eval


def default_gguf() -> str:
    from sglx.srt.server_args import default_model_path

    return default_model_path()


def hf_greedy_replies(ev: Eval, model_path: str, max_tokens: int) -> List[str]:
    """transformers' greedy answer to every prompt of `ev`, as --api chat would send it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(model_path)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    replies = []
    for i in range(len(ev)):
        enc = tok.apply_chat_template(ev.messages(i), add_generation_prompt=True, return_tensors="pt",
                                      return_dict=True)
        with torch.inference_mode():
            out = model.generate(
                input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], do_sample=False,
                max_new_tokens=max_tokens, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
                # Stopping early only saves time: the scorer cuts at the stop strings either way.
                stop_strings=list(ev.stop) or None, tokenizer=tok,
            )
        replies.append(tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True))
        print(f"transformers {i + 1}/{len(ev)}", file=sys.stderr, flush=True)
    return replies


def run_parity(
    base_url: str,
    num_examples: int = 50,
    max_tokens: int = 256,
    num_threads: int = 16,
    data_path: Optional[str] = None,
    model_path: Optional[str] = None,
    output_dir: str = "/tmp",
) -> Dict[str, Any]:
    argv = ["--eval-name", "gsm8k", "--num-examples", str(num_examples), "--max-tokens", str(max_tokens),
            "--temperature", "0", "--api", "chat", "--base-url", base_url, "--num-threads", str(num_threads),
            "--output-dir", output_dir]
    if data_path:
        argv += ["--data-path", data_path]
    tic = time.perf_counter()
    served = run_eval(parse_args(argv))
    server_s = time.perf_counter() - tic

    ev = load_eval("gsm8k", data_path=data_path, num_examples=num_examples)
    tic = time.perf_counter()
    hf_replies = hf_greedy_replies(ev, model_path or default_gguf(), max_tokens)
    hf_s = time.perf_counter() - tic
    hf_correct = [ev.score(i, r).correct for i, r in enumerate(hf_replies)]
    server_correct = [rec["correct"] for rec in served["examples"]]
    same_answer = sum(
        ev.score(i, r).extracted == rec["extracted"] for i, (r, rec) in enumerate(zip(hf_replies, served["examples"]))
    )
    result = {
        "num_examples": len(ev),
        "max_tokens": max_tokens,
        "server_correct": sum(server_correct),
        "hf_correct": sum(hf_correct),
        "server_score": served["score"],
        "hf_score": sum(hf_correct) / len(ev),
        "same_extracted_answer": same_answer,
        "disagreements": [i for i in range(len(ev)) if server_correct[i] != hf_correct[i]],
        "server_s": server_s,
        "hf_s": hf_s,
        "hf_replies": hf_replies,
        "server_replies": [rec["response"] for rec in served["examples"]],
    }
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    (Path(output_dir) / "gsm8k_parity.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base-url", default="http://127.0.0.1:30000")
    p.add_argument("--num-examples", type=int, default=50)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--num-threads", type=int, default=16)
    p.add_argument("--data-path", default=None)
    p.add_argument("--model-path", default=None, help="GGUF file (default: the default model's)")
    p.add_argument("--tolerance", type=int, default=1, help="allowed difference in questions answered right")
    p.add_argument("--output-dir", default="/tmp")
    a = p.parse_args(argv)
    res = run_parity(a.base_url, a.num_examples, a.max_tokens, a.num_threads, a.data_path, a.model_path, a.output_dir)
    diff = abs(res["server_correct"] - res["hf_correct"])
    print(f"server {res['server_correct']}/{res['num_examples']} ({res['server_s']:.0f} s), "
          f"transformers {res['hf_correct']}/{res['num_examples']} ({res['hf_s']:.0f} s); "
          f"same extracted answer on {res['same_extracted_answer']}; disagreements at {res['disagreements']}")
    print("PASS" if diff <= a.tolerance else f"FAIL: scores differ by {diff} questions (> {a.tolerance})")
    return 0 if diff <= a.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())

"""Accuracy evals run by `python -m sglx.test.run_eval` (prompting and scoring as OpenAI's
simple-evals does; GSM8K few-shot as SGLang's GSM8K benchmark does).

    from sglx.evals import load_eval
    ev = load_eval("gsm8k", num_examples=50)
    ev.prompt(i)            # the exact prompt text of example i
    ev.messages(i)          # the same as chat messages (what --api chat sends)
    ev.score(i, reply)      # -> Scored(score, correct, extracted, detail)
"""

from __future__ import annotations

import importlib
from typing import Optional

from sglx.evals.common import Eval, EvalError, EvalItem, Scored

EVAL_MODULES = {
    "gsm8k": "sglx.evals.gsm8k",
    "mmlu": "sglx.evals.mmlu",
    "mgsm_en": "sglx.evals.mgsm",
    "humaneval": "sglx.evals.humaneval",
    "gpqa": "sglx.evals.gpqa",
}
EVAL_NAMES = tuple(EVAL_MODULES)


def load_eval(
    name: str,
    *,
    data_path: Optional[str] = None,
    num_examples: Optional[int] = None,
    num_shots: Optional[int] = None,
    seed: int = 0,
    api: str = "chat",
) -> Eval:
    """Load an eval's data and fix its prompts. Raises EvalError on unknown names or bad data."""
    if name not in EVAL_MODULES:
        raise EvalError(f"unknown eval {name!r}; choose from {', '.join(EVAL_NAMES)}")
    if num_examples is not None and num_examples < 1:
        raise EvalError("--num-examples must be at least 1")
    if num_shots is not None and num_shots < 0:
        raise EvalError("--num-shots must be >= 0")
    module = importlib.import_module(EVAL_MODULES[name])
    ev = module.load(data_path=data_path, num_examples=num_examples, num_shots=num_shots, seed=seed, api=api)
    if len(ev) == 0:
        raise EvalError(f"{name}: no examples in the data")
    return ev


__all__ = ["EVAL_NAMES", "Eval", "EvalError", "EvalItem", "Scored", "load_eval"]

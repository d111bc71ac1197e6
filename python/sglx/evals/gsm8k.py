"""GSM8K, few-shot, in the "Question: ...\\nAnswer: ..." format of SGLang's few-shot GSM8K benchmark.

Prompt for test example i with k shots (k = --num-shots, default 5; shots are the first k rows of
train.jsonl, their answers verbatim, calculator annotations "<<a*b=c>>" and the "#### N" line kept):

    Question: {train[0].question}
    Answer: {train[0].answer}

    ... (k shots, each followed by a blank line)
    Question: {test[i].question}
    Answer:

The same text is the user message with --api chat and the raw prompt with --api completion.
Generation stops at "Question:" (the model starting the next few-shot block).
Score: the last number in the reply (commas stripped) equals the number after "#### " in the gold
answer, compared numerically.

Data: `test.jsonl` / `train.jsonl` (JSONL with "question" and "answer") from openai/grade-school-math;
--data-path is the test file (train.jsonl is looked up beside it) or a folder holding them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional

from sglx.evals.common import (
    Eval,
    EvalError,
    EvalItem,
    Scored,
    cache_root,
    download,
    extract_last_number,
    find_data,
    numbers_equal,
    read_text,
    take_first,
)

URL_BASE = "https://raw.githubusercontent.com/openai/grade-school-math/master/grade_school_math/data/"
DEFAULT_NUM_SHOTS = 5
STOP = ("Question:",)


def read_jsonl(path: Path) -> List[Dict[str, str]]:
    rows = []
    for n, line in enumerate(read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            rows.append({"question": row["question"], "answer": row["answer"]})
        except (ValueError, KeyError, TypeError):
            raise EvalError(f"{path}:{n}: not a GSM8K row (JSON with question, answer)") from None
    return rows


def gold_answer(answer: str) -> str:
    """The number after the last "#### " of a GSM8K answer, commas stripped."""
    if "####" not in answer:
        raise EvalError(f"GSM8K answer without '#### ': {answer[:60]!r}")
    return answer.rsplit("####", 1)[1].strip().replace(",", "")


def format_example(question: str, answer: Optional[str] = None) -> str:
    text = f"Question: {question}\nAnswer:"
    return text if answer is None else f"{text} {answer}"


def few_shot_prefix(shots: List[Dict[str, str]]) -> str:
    return "".join(format_example(s["question"], s["answer"]) + "\n\n" for s in shots)


def build_prompt(question: str, shots: List[Dict[str, str]]) -> str:
    return few_shot_prefix(shots) + format_example(question)


def score_reply(reply: str, gold: str) -> Scored:
    """Grade a reply (already cut at the stop strings) against a gold number."""
    pred = extract_last_number(reply)
    ok = numbers_equal(pred, gold)
    return Scored(score=float(ok), correct=ok, extracted=pred)


class GSM8KEval(Eval):
    name = "gsm8k"

    def score_text(self, i: int, reply: str) -> Scored:
        return score_reply(reply, self.items[i].target)


def _train_path(test_path: Path, explicit: bool) -> Path:
    path = test_path.parent / "train.jsonl"
    if path.is_file():
        return path
    if explicit:
        raise EvalError(f"few-shot pool not found: {path} (or pass --num-shots 0)")
    cached = cache_root() / "gsm8k" / "train.jsonl"
    return cached if cached.is_file() else download(URL_BASE + "train.jsonl", cached)


def load(
    data_path: Optional[str] = None,
    num_examples: Optional[int] = None,
    num_shots: Optional[int] = None,
    **_: object,
) -> GSM8KEval:
    k = DEFAULT_NUM_SHOTS if num_shots is None else num_shots
    test_path = find_data(data_path, ["gsm8k/test.jsonl", "test.jsonl"], url=URL_BASE + "test.jsonl")
    rows = take_first(read_jsonl(test_path), num_examples)
    shots: List[Dict[str, str]] = []
    if k > 0:
        pool = read_jsonl(_train_path(test_path, explicit=bool(data_path)))
        if len(pool) < k:
            raise EvalError(f"--num-shots {k} but the few-shot pool has {len(pool)} rows")
        shots = pool[:k]
    prefix = few_shot_prefix(shots)
    items = [
        EvalItem(index=i, prompt=prefix + format_example(r["question"]), target=gold_answer(r["answer"]))
        for i, r in enumerate(rows)
    ]
    return GSM8KEval(items, stop=STOP)

"""MGSM (English), zero-shot with simple-evals' MGSM instruction.

Prompt for example i (exactly simple-evals' English template):

    Solve this math problem. Give the reasoning steps before giving the final answer on the last line
    by itself in the format of "Answer:". Do not add anything other than the integer answer after
    "Answer:".

    {question}

(the instruction is one line in the prompt). MGSM has no training split of its own, so like
simple-evals this eval is zero-shot and --num-shots does not apply.
Score: the last number in the reply (commas stripped) equals the gold answer (commas stripped; three
rows are written like "2,125"), compared numerically. This is looser than simple-evals, which reads
only the text after the last "Answer:"; a reply that ends with its answer scores the same either way.

Data: `mgsm_en.tsv` from google-research/url-nlp (no header, `question<TAB>answer`); --data-path is
that file or a folder holding it.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Tuple

from sglx.evals.common import (
    Eval,
    EvalError,
    EvalItem,
    Scored,
    extract_last_number,
    find_data,
    numbers_equal,
    read_text,
    take_first,
)

URL = "https://raw.githubusercontent.com/google-research/url-nlp/main/mgsm/mgsm_en.tsv"

INSTRUCTION = (
    "Solve this math problem. Give the reasoning steps before giving the final answer on the last "
    'line by itself in the format of "Answer:". Do not add anything other than the integer answer '
    'after "Answer:".\n\n'
)


def read_tsv(path: Path) -> List[Tuple[str, str]]:
    rows = []
    for n, line in enumerate(read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        # Split on the last tab: the answer column never holds one, a question might.
        if "\t" not in line:
            raise EvalError(f"{path}:{n}: not an MGSM row (question<TAB>answer)")
        question, answer = line.rsplit("\t", 1)
        rows.append((question, answer.strip()))
    return rows


def build_prompt(question: str) -> str:
    return INSTRUCTION + question


def score_reply(reply: str, gold: str) -> Scored:
    pred = extract_last_number(reply)
    ok = numbers_equal(pred, gold.replace(",", ""))
    return Scored(score=float(ok), correct=ok, extracted=pred)


class MGSMEval(Eval):
    name = "mgsm_en"

    def score_text(self, i: int, reply: str) -> Scored:
        return score_reply(reply, self.items[i].target)


def load(data_path: Optional[str] = None, num_examples: Optional[int] = None, **_: object) -> MGSMEval:
    path = find_data(data_path, ["mgsm/mgsm_en.tsv", "mgsm_en.tsv"], url=URL)
    rows = take_first(read_tsv(path), num_examples)
    items = [
        EvalItem(index=i, prompt=build_prompt(q), target=a.replace(",", ""))
        for i, (q, a) in enumerate(rows)
    ]
    return MGSMEval(items)

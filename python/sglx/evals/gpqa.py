"""GPQA (e.g. the diamond set), zero-shot with simple-evals' multiple-choice template.

The data is not shipped or downloaded: its authors ask that the questions not be redistributed, so
--data-path must name a CSV the user holds (the GPQA release format: columns `Question`,
`Correct Answer`, `Incorrect Answer 1`, `Incorrect Answer 2`, `Incorrect Answer 3`; other columns
are ignored, a `Subdomain`/`High-level domain` column becomes the category).

Options are shuffled as simple-evals does: one `random.Random(seed)` (seed 0 by default) first picks
`--num-examples` rows with `rng.sample` (when fewer than all), then draws `rng.sample(range(4), 4)`
per example; the options [correct, incorrect 1, 2, 3] are put in that order. Cells are stripped of
surrounding whitespace. Prompt and scoring: as in `mmlu.py`.
"""

from __future__ import annotations

import csv
import io
import random
from typing import Optional

from sglx.evals.common import EvalError, EvalItem, find_data, read_text
from sglx.evals.multichoice import LETTERS, MultipleChoiceEval, build_prompt

COLUMNS = ("Question", "Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2", "Incorrect Answer 3")


class GPQAEval(MultipleChoiceEval):
    name = "gpqa"


def load(
    data_path: Optional[str] = None, num_examples: Optional[int] = None, seed: int = 0, **_: object
) -> GPQAEval:
    if not data_path:
        raise EvalError("gpqa needs --data-path pointing at your copy of the GPQA CSV (e.g. gpqa_diamond.csv)")
    path = find_data(data_path, ["gpqa_diamond.csv", "gpqa/gpqa_diamond.csv"])
    reader = csv.DictReader(io.StringIO(read_text(path)))
    missing = [c for c in COLUMNS if c not in (reader.fieldnames or ())]
    if missing:
        raise EvalError(f"{path}: missing GPQA columns {missing}")
    rows = [{k: (v or "").strip() for k, v in rec.items() if k is not None} for rec in reader]
    rng = random.Random(seed)
    if num_examples is not None and num_examples < len(rows):
        rows = rng.sample(rows, num_examples)
    items = []
    for i, row in enumerate(rows):
        options = [row[c] for c in COLUMNS[1:]]
        perm = rng.sample(range(4), 4)
        shuffled = [options[p] for p in perm]
        target = LETTERS[perm.index(0)]  # where the correct answer (options[0]) landed
        category = row.get("High-level domain") or row.get("Subdomain") or None
        items.append(EvalItem(index=i, prompt=build_prompt(row["Question"], *shuffled), target=target,
                              category=category))
    return GPQAEval(items)

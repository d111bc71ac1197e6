"""MMLU, zero-shot with simple-evals' multiple-choice template.

Prompt for example i:

    Answer the following multiple choice question. The last line of your response should be of the
    following format: 'Answer: $LETTER' (without quotes) where LETTER is one of ABCD. Think step by
    step before answering.

    {question}

    A) {A}
    B) {B}
    C) {C}
    D) {D}

(the instruction is one line.) Score: the letter after the last "Answer:" (see
`common.extract_choice`) equals the gold letter. Metrics add the mean score per category (stem,
humanities, social_sciences, other; simple-evals' subject map).

Data, either layout:
- Hendrycks' release: a folder of `<subject>_test.csv` (no header; question,A,B,C,D,answer-letter),
  given as the data root (holding mmlu/test/), the mmlu folder (holding test/) or the test folder.
  Rows are ordered by subject name, then by file order.
- simple-evals' `mmlu.csv` (header: index,Question,A,B,C,D,Answer,Subject), given as the file.
With --num-examples below the total, examples are `random.Random(seed).sample(rows, n)`, as
simple-evals does (it uses seed 0, our default).
"""

from __future__ import annotations

import csv
import io
import random
from pathlib import Path
from typing import Dict, List, Optional

from sglx.evals.common import EvalError, EvalItem, find_data, read_text
from sglx.evals.multichoice import LETTERS, MultipleChoiceEval, build_prompt

URL = "https://openaipublic.blob.core.windows.net/simple-evals/mmlu.csv"

CATEGORIES = ("stem", "humanities", "social_sciences", "other")

SUBJECT_TO_CATEGORY: Dict[str, str] = {
    "abstract_algebra": "stem", "anatomy": "other", "astronomy": "stem",
    "business_ethics": "other", "clinical_knowledge": "other", "college_biology": "stem",
    "college_chemistry": "stem", "college_computer_science": "stem", "college_mathematics": "stem",
    "college_medicine": "other", "college_physics": "stem", "computer_security": "stem",
    "conceptual_physics": "stem", "econometrics": "social_sciences",
    "electrical_engineering": "stem", "elementary_mathematics": "stem",
    "formal_logic": "humanities", "global_facts": "other", "high_school_biology": "stem",
    "high_school_chemistry": "stem", "high_school_computer_science": "stem",
    "high_school_european_history": "humanities", "high_school_geography": "social_sciences",
    "high_school_government_and_politics": "social_sciences",
    "high_school_macroeconomics": "social_sciences", "high_school_mathematics": "stem",
    "high_school_microeconomics": "social_sciences", "high_school_physics": "stem",
    "high_school_psychology": "social_sciences", "high_school_statistics": "stem",
    "high_school_us_history": "humanities", "high_school_world_history": "humanities",
    "human_aging": "other", "human_sexuality": "social_sciences",
    "international_law": "humanities", "jurisprudence": "humanities",
    "logical_fallacies": "humanities", "machine_learning": "stem", "management": "other",
    "marketing": "other", "medical_genetics": "other", "miscellaneous": "other",
    "moral_disputes": "humanities", "moral_scenarios": "humanities", "nutrition": "other",
    "philosophy": "humanities", "prehistory": "humanities", "professional_accounting": "other",
    "professional_law": "humanities", "professional_medicine": "other",
    "professional_psychology": "social_sciences", "public_relations": "social_sciences",
    "security_studies": "social_sciences", "sociology": "social_sciences",
    "us_foreign_policy": "social_sciences", "virology": "other", "world_religions": "humanities",
}

Row = Dict[str, str]  # question, A, B, C, D, answer (letter), subject


def _check_row(row: Row, where: str) -> Row:
    if row["answer"] not in LETTERS:
        raise EvalError(f"{where}: answer {row['answer']!r} is not one of A-D")
    return row


def read_hendrycks_dir(folder: Path) -> List[Row]:
    files = sorted(folder.glob("*_test.csv"))
    if not files:
        raise EvalError(f"data file not found: no <subject>_test.csv under {folder}")
    rows: List[Row] = []
    for f in files:
        subject = f.name[: -len("_test.csv")]
        for n, rec in enumerate(csv.reader(io.StringIO(read_text(f))), 1):
            if len(rec) != 6:
                raise EvalError(f"{f}:{n}: expected 6 columns (question,A,B,C,D,answer)")
            row = dict(zip(("question", "A", "B", "C", "D", "answer"), rec), subject=subject)
            rows.append(_check_row(row, f"{f}:{n}"))
    return rows


def read_simple_evals_csv(path: Path) -> List[Row]:
    reader = csv.DictReader(io.StringIO(read_text(path)))
    need = {"Question", "A", "B", "C", "D", "Answer", "Subject"}
    if not need <= set(reader.fieldnames or ()):
        raise EvalError(f"{path}: expected columns {sorted(need)} (or a folder of <subject>_test.csv)")
    rows = []
    for n, rec in enumerate(reader, 2):
        row = {"question": rec["Question"], "answer": rec["Answer"].strip(), "subject": rec["Subject"]}
        row.update({k: rec[k] for k in "ABCD"})
        rows.append(_check_row(row, f"{path}:{n}"))
    return rows


def read_rows(data_path: Optional[str]) -> List[Row]:
    if data_path and Path(data_path).is_dir() and any(Path(data_path).glob("*_test.csv")):
        return read_hendrycks_dir(Path(data_path))
    path = find_data(data_path, ["mmlu/test", "test", "mmlu.csv"], url=URL)
    return read_hendrycks_dir(path) if path.is_dir() else read_simple_evals_csv(path)


def category_of(subject: str) -> str:
    return SUBJECT_TO_CATEGORY.get(subject, "other")


class MMLUEval(MultipleChoiceEval):
    name = "mmlu"


def load(
    data_path: Optional[str] = None, num_examples: Optional[int] = None, seed: int = 0, **_: object
) -> MMLUEval:
    rows = read_rows(data_path)
    if num_examples is not None and num_examples < len(rows):
        rows = random.Random(seed).sample(rows, num_examples)
    items = [
        EvalItem(
            index=i,
            prompt=build_prompt(r["question"], r["A"], r["B"], r["C"], r["D"]),
            target=r["answer"],
            category=category_of(r["subject"]),
            extra={"subject": r["subject"]},
        )
        for i, r in enumerate(rows)
    ]
    return MMLUEval(items)

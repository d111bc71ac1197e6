"""The four-option multiple-choice prompt shared by MMLU and GPQA (simple-evals' template)."""

from __future__ import annotations

from sglx.evals.common import Eval, Scored, extract_choice

LETTERS = "ABCD"

QUERY_TEMPLATE = (
    "Answer the following multiple choice question. The last line of your response should be of the "
    "following format: 'Answer: $LETTER' (without quotes) where LETTER is one of ABCD. Think step by "
    "step before answering.\n\n{question}\n\nA) {a}\nB) {b}\nC) {c}\nD) {d}"
)


def build_prompt(question: str, a: str, b: str, c: str, d: str) -> str:
    return QUERY_TEMPLATE.format(question=question, a=a, b=b, c=c, d=d)


def score_reply(reply: str, gold_letter: str) -> Scored:
    pred = extract_choice(reply, LETTERS)
    ok = pred == gold_letter
    return Scored(score=float(ok), correct=ok, extracted=pred)


class MultipleChoiceEval(Eval):
    def score_text(self, i: int, reply: str) -> Scored:
        return score_reply(reply, self.items[i].target)

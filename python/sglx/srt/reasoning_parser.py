"""Reasoning models' thinking, split from their answer (`--reasoning-parser`, SGLang's names).

Qwen3 writes `<think>...</think>` before its answer; DeepSeek-R1's template already opens the `<think>` in the
prompt, so its output starts inside the reasoning and only the closing tag shows. `ReasoningStream` splits
text as it arrives: reasoning until the closing tag, the answer after it, holding back only what could still be
the start of a tag. An output that never closes its reasoning is all reasoning (it ran out of tokens thinking).

Whatever the parser, the prompt itself decides where a request's output starts when its last tokens are a tag
(`prompt_reasoning_state`): a template that ends the prompt with `<think>` (Qwen3-Thinking-2507, QwQ,
DeepSeek-V3.1 with thinking on) has opened the reasoning, one that ends it with `</think>` (Qwen3 with
enable_thinking false, DeepSeek-V3.1 with thinking off) has closed it, and the output is all answer.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Tuple

from sglx.srt.utils import partial_prefix_len


@dataclass(frozen=True)
class ReasoningFormat:
    start: str = "<think>"
    end: str = "</think>"
    # The output begins inside the reasoning (the prompt opened it) whether or not it writes the start tag.
    starts_in_reasoning: bool = False


REASONING_PARSERS: Dict[str, ReasoningFormat] = {
    "qwen3": ReasoningFormat(),
    "qwen3-thinking": ReasoningFormat(starts_in_reasoning=True),  # always thinks (Qwen3-*-Thinking-2507)
    "deepseek-r1": ReasoningFormat(starts_in_reasoning=True),
    "deepseek-v3": ReasoningFormat(),  # V3.1/V3.2: thinks when the template's `thinking` opens it
}

# How many of the prompt's last tokens may follow its tag (a template puts a newline or two after it).
PROMPT_TAIL_TOKENS = 4


def prompt_reasoning_state(tail: str, fmt: ReasoningFormat) -> Optional[bool]:
    """From the text of the prompt's last tokens: True when it ends with the start tag (the prompt opened the
    reasoning), False when it ends with the end tag (the prompt closed it: no thinking), else None (the output
    starts as the format says). Trailing whitespace is ignored."""
    tail = tail.rstrip()
    if tail.endswith(fmt.start):
        return True
    if tail.endswith(fmt.end):
        return False
    return None


def for_prompt(fmt: ReasoningFormat, opened: Optional[bool]) -> Optional[ReasoningFormat]:
    """The format a request's output is split by, given prompt_reasoning_state: None (no reasoning to split)
    when the prompt closed it, one that starts inside it when the prompt opened it."""
    if opened is False:
        return None
    return dataclasses.replace(fmt, starts_in_reasoning=True) if opened else fmt


def prompt_opens_reasoning(ids: Sequence[int], tags: Tuple[Optional[int], int]) -> Optional[bool]:
    """prompt_reasoning_state on token ids, for the scheduler: the last of the (start, end) tag ids among the
    prompt's last PROMPT_TAIL_TOKENS ids decides (True: start, False: end), None when neither is there."""
    start, end = tags
    for t in reversed(ids[-PROMPT_TAIL_TOKENS:]):
        if start is not None and t == start:
            return True
        if t == end:
            return False
    return None


class ReasoningStream:
    """One output, fed as it arrives; each call returns (reasoning, answer) text new in it."""

    def __init__(self, fmt: ReasoningFormat) -> None:
        self.fmt = fmt
        self.buffer = ""
        self.state = "start"  # -> reasoning -> answer, or start -> answer
        self.answer_started = False  # the answer's leading whitespace (after the end tag) is dropped

    def feed(self, delta: str) -> Tuple[str, str]:
        self.buffer += delta
        reasoning = ""
        if self.state == "start":
            stripped = self.buffer.lstrip()
            if stripped.startswith(self.fmt.start):
                self.buffer, self.state = stripped[len(self.fmt.start):], "reasoning"
            elif not stripped or self.fmt.start.startswith(stripped):
                return "", ""  # may still become the start tag
            elif self.fmt.starts_in_reasoning:
                self.state = "reasoning"  # the prompt opened it
            else:
                self.state, self.answer_started = "answer", True  # no reasoning: the text stays as it is
        if self.state == "reasoning":
            end = self.buffer.find(self.fmt.end)
            if end < 0:
                keep = partial_prefix_len(self.buffer, self.fmt.end)
                reasoning, self.buffer = self.buffer[: len(self.buffer) - keep], self.buffer[len(self.buffer) - keep:]
                return reasoning, ""
            reasoning, self.buffer = self.buffer[:end], self.buffer[end + len(self.fmt.end):]
            self.state = "answer"
        answer, self.buffer = self.buffer, ""
        if not self.answer_started:
            answer = answer.lstrip()
            self.answer_started = bool(answer)
        return reasoning, answer

    def flush(self) -> Tuple[str, str]:
        rest, self.buffer = self.buffer, ""
        in_reasoning = self.state == "reasoning" or (self.state == "start" and self.fmt.starts_in_reasoning)
        return (rest, "") if in_reasoning else ("", rest)


def split_reasoning(text: str, fmt: ReasoningFormat) -> Tuple[str, str]:
    """A whole output as (reasoning, answer)."""
    stream = ReasoningStream(fmt)
    r1, a1 = stream.feed(text)
    r2, a2 = stream.flush()
    return r1 + r2, a1 + a2


def reasoning_tag_ids(tokenizer: Any, parser: Optional[str]) -> Optional[Tuple[Optional[int], int]]:
    """(start tag id, end tag id) of `parser`'s format (a --reasoning-parser name, or None), for a constraint
    that starts after the thinking (constrained/reasoner_grammar.py). The start id is None for a format whose
    output starts inside the reasoning. None when there is no parser or a tag the gate needs is not one token
    of the tokenizer (Qwen3's and DeepSeek-R1's are): the constraint can then only hold from the first token."""
    if parser is None or tokenizer is None:
        return None
    fmt = REASONING_PARSERS[parser]
    end = _one_token(tokenizer, fmt.end)
    if end is None:
        return None
    if fmt.starts_in_reasoning:
        return None, end
    start = _one_token(tokenizer, fmt.start)
    return None if start is None else (start, end)


def _one_token(tokenizer: Any, text: str) -> Optional[int]:
    ids = tokenizer.encode(text, add_special_tokens=False)
    return ids[0] if len(ids) == 1 else None

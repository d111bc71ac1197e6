"""Reasoning split from the answer: whole outputs, and the same outputs streamed in every split."""

from __future__ import annotations

import pytest

from sglx.srt.reasoning_parser import (
    REASONING_PARSERS,
    ReasoningStream,
    for_prompt,
    prompt_opens_reasoning,
    prompt_reasoning_state,
    split_reasoning,
)

QWEN3, R1 = REASONING_PARSERS["qwen3"], REASONING_PARSERS["deepseek-r1"]
CASES = [
    (QWEN3, "<think>\nLet me see.\n</think>\n\nThe answer is 4.", ("\nLet me see.\n", "The answer is 4.")),
    (QWEN3, "The answer is 4.", ("", "The answer is 4.")),  # thinking off: no tags at all
    (QWEN3, "  Hi <think>x</think>", ("", "  Hi <think>x</think>")),  # a tag later is just text
    (QWEN3, "<think>still thinking", ("still thinking", "")),  # ran out of tokens while thinking
    (QWEN3, "<thin", ("", "<thin")),
    (R1, "Let me see.\n</think>\n\nThe answer is 4.", ("Let me see.\n", "The answer is 4.")),  # opened by the prompt
    (R1, "<think>Let me see.</think>4", ("Let me see.", "4")),
    (R1, "no end", ("no end", "")),
]


@pytest.mark.parametrize("fmt,text,want", CASES)
def test_whole_and_streamed(fmt, text, want):
    assert split_reasoning(text, fmt) == want
    for size in (1, 2, 3, 5, 11):
        stream, reasoning, answer = ReasoningStream(fmt), "", ""
        for i in range(0, len(text), size):
            r, a = stream.feed(text[i:i + size])
            reasoning, answer = reasoning + r, answer + a
        r, a = stream.flush()
        assert (reasoning + r, answer + a) == want, size


def test_reasoning_streams_before_the_end_tag():
    stream = ReasoningStream(QWEN3)
    assert stream.feed("<think>step one, ") == ("step one, ", "")
    assert stream.feed("step two</th") == ("step two", "")  # "</th" may close it: held back
    assert stream.feed("ink>\n\nDone") == ("", "Done")


def test_reasoning_tag_ids_need_single_tokens():
    """SmolLM2's tokenizer spells `<think>` in several pieces: no gate. Given the tags as tokens (as Qwen3's and
    DeepSeek-R1's tokenizers have them) the ids are theirs; R1's output starts inside, so it needs no start id."""
    from sglx.srt.hf_transformers_utils import get_tokenizer
    from sglx.srt.reasoning_parser import reasoning_tag_ids
    from sglx.srt.server_args import default_model_path

    tok = get_tokenizer(default_model_path())
    assert reasoning_tag_ids(tok, "qwen3") is None and reasoning_tag_ids(tok, "deepseek-r1") is None
    assert reasoning_tag_ids(tok, None) is None
    tok.add_special_tokens({"additional_special_tokens": ["</think>"]})
    end = tok.convert_tokens_to_ids("</think>")
    assert reasoning_tag_ids(tok, "deepseek-r1") == (None, end)
    assert reasoning_tag_ids(tok, "qwen3") is None  # its start tag is still several tokens
    tok.add_special_tokens({"additional_special_tokens": ["<think>"]})
    assert reasoning_tag_ids(tok, "qwen3") == (tok.convert_tokens_to_ids("<think>"), end)


def test_sglang_parser_names():
    """qwen3-thinking always starts inside the reasoning (Qwen3-*-Thinking-2507), deepseek-v3 only where its
    template's `thinking` opened it in the prompt."""
    assert REASONING_PARSERS["qwen3-thinking"].starts_in_reasoning
    assert split_reasoning("Hmm.</think>42", REASONING_PARSERS["qwen3-thinking"]) == ("Hmm.", "42")
    assert split_reasoning("42", REASONING_PARSERS["deepseek-v3"]) == ("", "42")


@pytest.mark.parametrize("tail,want", [
    ("<|im_start|>assistant\n<think>\n", True),  # Qwen3-Thinking-2507 / QwQ: the template opened it
    ("<|im_start|>assistant\n<think>\n\n</think>\n\n", False),  # Qwen3, enable_thinking false: closed
    ("<|im_start|>assistant\n", None),  # the model decides
    ("Assistant:</think>", False),  # DeepSeek-V3.1, thinking off
    ("Assistant:<think>", True),
])
def test_the_prompt_end_decides_where_the_output_starts(tail, want):
    assert prompt_reasoning_state(tail, QWEN3) is want
    fmt = for_prompt(QWEN3, want)
    reply = "Let me see.\n</think>\n\nIt is 4."
    if want is False:
        assert fmt is None  # nothing to split: the output is all answer
    elif want:
        assert fmt.starts_in_reasoning and split_reasoning(reply, fmt) == ("Let me see.\n", "It is 4.")
    else:
        assert fmt is QWEN3 and split_reasoning(reply, fmt) == ("", reply)  # no start tag: all answer
    assert for_prompt(R1, None) is R1 and for_prompt(R1, False) is None


def test_prompt_tag_ids_the_scheduler_reads():
    start, end, nl = 7, 8, 1
    assert prompt_opens_reasoning([5, 6, start, nl], (start, end)) is True
    assert prompt_opens_reasoning([5, start, nl, nl, end, nl, nl], (start, end)) is False  # the last tag decides
    assert prompt_opens_reasoning([start, 5, 6, 9, 10], (start, end)) is None  # too far back: a user's text
    assert prompt_opens_reasoning([5, start], (None, end)) is None  # a format without a start id sees only ends
    assert prompt_opens_reasoning([end], (None, end)) is False
    assert prompt_opens_reasoning([], (start, end)) is None

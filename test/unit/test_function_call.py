"""Tool-call detectors and tool_choice plans: whole outputs and the same outputs streamed in every split."""

from __future__ import annotations

import json

import pytest

from sglx.srt.entrypoints.openai.protocol import Tool, ToolChoice
from sglx.srt.function_call.base_format_detector import ToolCallStream
from sglx.srt.function_call.detectors import TOOL_CALL_PARSERS, create_detector
from sglx.srt.function_call.tool_plan import ToolPlan

NAMES = ("get_weather", "get_time")
WEATHER = {"city": "Paris", "unit": "C"}

# parser -> (output, plain text it holds, the calls in it)
CASES = {
    "qwen25": ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}\n'
               '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>',
               "Let me check.\n\n", [("get_weather", WEATHER), ("get_time", {})]),
    "mistral": ('[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}, '
                '{"name": "get_time", "arguments": {}}]', "", [("get_weather", WEATHER), ("get_time", {})]),
    "llama3": ('{"name": "get_weather", "parameters": {"city": "Paris", "unit": "C"}}; '
               '{"name": "get_time", "parameters": {}}', "", [("get_weather", WEATHER), ("get_time", {})]),
    "pythonic": ('[get_weather(city="Paris", unit="C"), get_time()]', "",
                 [("get_weather", WEATHER), ("get_time", {})]),
}


def _calls(result):
    return [(c.name, json.loads(c.arguments)) for c in result.calls]


@pytest.mark.parametrize("parser", sorted(CASES))
def test_whole_output(parser):
    text, plain, calls = CASES[parser]
    result = create_detector(parser).parse(text, NAMES)
    assert result.normal_text == plain and _calls(result) == calls


@pytest.mark.parametrize("parser", sorted(CASES))
def test_streamed_in_every_split_gives_the_same(parser):
    text, plain, calls = CASES[parser]
    det = create_detector(parser)
    for size in (1, 2, 3, 7, len(text)):
        stream = ToolCallStream(det, NAMES)
        got_text, got_calls = "", []
        for i in range(0, len(text), size):
            r = stream.feed(text[i:i + size])
            got_text += r.normal_text
            got_calls += _calls(r)
        r = stream.flush()
        assert (got_text + r.normal_text, got_calls + _calls(r)) == (plain, calls), size


def test_plain_text_passes_through_at_once_and_markers_are_held_back():
    stream = ToolCallStream(create_detector("qwen25"), NAMES)
    assert stream.feed("Hello <tool").normal_text == "Hello "  # "<tool" may open a call
    assert stream.feed("box> and more").normal_text == "<toolbox> and more"
    r = stream.feed('<tool_call>{"name": "get_time", "arguments": {}}</tool_call> done')
    assert _calls(r) == [("get_time", {})] and r.normal_text == " done"


def test_malformed_or_unknown_calls():
    qwen = create_detector("qwen25")
    broken = '<tool_call>{"name": "get_time", "arguments": </tool_call>'
    r = qwen.parse(broken, NAMES)
    assert r.normal_text == broken and not r.calls  # not a call after all: the text is kept
    r = qwen.parse('<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>', NAMES)
    assert not r.calls and r.normal_text == ""  # a tool the request did not offer is dropped
    unfinished = '<tool_call>{"name": "get_time", "argu'
    assert qwen.parse(unfinished, NAMES).normal_text == unfinished
    assert create_detector("pythonic").parse("[not a call]", NAMES).normal_text == "[not a call]"
    assert create_detector("pythonic").parse("[f(**x)]", NAMES).normal_text == "[f(**x)]"
    assert create_detector("llama3").parse("Sure, here.", NAMES).normal_text == "Sure, here."
    assert create_detector("llama3").parse("Use {braces}", NAMES).normal_text == "Use {braces}"


def _tools():
    return [Tool(function={"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}),
        Tool(function={"name": "get_time"})]


def test_tool_plans():
    assert ToolPlan.from_request(None, None, None, "qwen25") is None
    assert ToolPlan.from_request(_tools(), "none", None, "qwen25") is None
    assert ToolPlan.from_request(_tools(), "auto", None, None) is None  # no parser: plain content (SGLang)
    auto = ToolPlan.from_request(_tools(), None, None, "qwen25")
    assert auto.mode == "auto" and auto.constraint is None and auto.tool_names == NAMES
    req = ToolPlan.from_request(_tools(), "required", False, None)
    schema = json.loads(req.constraint)
    assert schema["minItems"] == 1 and schema["maxItems"] == 1
    assert [a["properties"]["name"]["const"] for a in schema["items"]["anyOf"]] == list(NAMES)
    r = req.detector.parse('[{"name": "get_time", "parameters": {}}]', NAMES)
    assert _calls(r) == [("get_time", {})] and r.normal_text == ""
    named = ToolPlan.from_request(_tools(), ToolChoice(function={"name": "get_weather"}), None, None)
    assert json.loads(named.constraint)["required"] == ["city"]
    assert _calls(named.detector.parse('{"city": "Oslo"}', NAMES)) == [("get_weather", {"city": "Oslo"})]
    with pytest.raises(ValueError, match="not among the tools"):
        ToolPlan.from_request(_tools(), ToolChoice(function={"name": "nope"}), None, None)
    with pytest.raises(ValueError, match="needs tools"):
        ToolPlan.from_request(None, "required", None, None)


def test_parser_names_follow_sglang():
    assert {"qwen25", "llama3", "mistral", "pythonic"} <= set(TOOL_CALL_PARSERS)

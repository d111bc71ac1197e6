"""The tool-call formats (`--tool-call-parser`), by SGLang's names."""

from __future__ import annotations

import ast
import json
from typing import Any, Callable, Dict, List, Optional

from sglx.srt.function_call.base_format_detector import BaseFormatDetector, ToolCallItem

TOOL_CALL_PARSERS: Dict[str, Callable[[], BaseFormatDetector]] = {}


def register_tool_call_parser(name: str):
    def deco(cls):
        TOOL_CALL_PARSERS[name] = cls
        return cls

    return deco


def _item(obj: Any, args_key: str) -> Optional[ToolCallItem]:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get(args_key, obj.get("arguments", {}))
    if isinstance(args, str):  # some models write the arguments as a JSON string already
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCallItem(obj["name"], json.dumps(args, ensure_ascii=False))


def _json_objects(text: str, sep: str = "") -> Optional[List[Any]]:
    """The JSON values written one after another in `text` (optionally separated by `sep`); None if any
    part is not JSON."""
    dec, values, i = json.JSONDecoder(), [], 0
    while True:
        while i < len(text) and (text[i].isspace() or (sep and text[i] == sep)):
            i += 1
        if i == len(text):
            return values
        try:
            value, i = dec.raw_decode(text, i)
        except ValueError:
            return None
        values.append(value)


@register_tool_call_parser("qwen25")
class Qwen25Detector(BaseFormatDetector):
    """Qwen2.5 / Hermes: <tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>, one per call."""

    start_markers = ("<tool_call>",)
    end_marker = "</tool_call>"

    def parse_calls(self, region: str) -> Optional[List[ToolCallItem]]:
        body = region[len("<tool_call>"):]
        body = body[: -len(self.end_marker)] if body.endswith(self.end_marker) else body
        values = _json_objects(body)
        items = [_item(v, "arguments") for v in values or []]
        return items if values and all(items) else None


@register_tool_call_parser("mistral")
class MistralDetector(BaseFormatDetector):
    """Mistral: [TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...] to the end of the output."""

    start_markers = ("[TOOL_CALLS]",)

    def parse_calls(self, region: str) -> Optional[List[ToolCallItem]]:
        values = _json_objects(region[len("[TOOL_CALLS]"):])
        if not values:
            return None
        calls = [c for v in values for c in (v if isinstance(v, list) else [v])]
        items = [_item(c, "arguments") for c in calls]
        return items if items and all(items) else None


@register_tool_call_parser("llama3")
class Llama32Detector(BaseFormatDetector):
    """Llama 3.1 / 3.2 JSON tool calls: {"name": ..., "parameters": {...}}, optionally after <|python_tag|>,
    several separated by ';'."""

    start_markers = ("<|python_tag|>",)
    bare_start = "{"

    def parse_calls(self, region: str) -> Optional[List[ToolCallItem]]:
        body = region.split("<|python_tag|>", 1)[1] if region.startswith("<|python_tag|>") else region
        values = _json_objects(body, sep=";")
        items = [_item(v, "parameters") for v in values or []]
        return items if values and all(items) else None


@register_tool_call_parser("pythonic")
class PythonicDetector(BaseFormatDetector):
    """Pythonic lists of calls (Llama 3.2 / 4 style): [get_weather(city="Paris"), get_time()]."""

    bare_start = "["

    def parse_calls(self, region: str) -> Optional[List[ToolCallItem]]:
        try:
            tree = ast.parse(region.strip(), mode="eval").body
        except SyntaxError:
            return None
        if not isinstance(tree, ast.List) or not tree.elts:
            return None
        items = []
        for call in tree.elts:
            if not isinstance(call, ast.Call) or not isinstance(call.func, ast.Name) or call.args:
                return None
            if any(kw.arg is None for kw in call.keywords):  # **kwargs
                return None
            try:
                args = {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords}
            except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
                return None
            items.append(ToolCallItem(call.func.id, json.dumps(args, ensure_ascii=False)))
        return items


def create_detector(name: str) -> BaseFormatDetector:
    if name not in TOOL_CALL_PARSERS:
        raise ValueError(f"unknown tool-call parser {name!r}; available: {sorted(TOOL_CALL_PARSERS)}")
    return TOOL_CALL_PARSERS[name]()

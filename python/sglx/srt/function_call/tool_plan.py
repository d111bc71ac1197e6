"""What a chat request's `tools` and `tool_choice` ask of its outputs, and how those become tool calls.

* `auto` (the default when tools are given): the server's `--tool-call-parser` reads calls out of whatever
  the model wrote; without one the output stays plain content, as in SGLang.
* `required`: the output is constrained to a JSON list of `{"name": ..., "parameters": {...}}` over the offered
  tools (at least one; one at most with `parallel_tool_calls: false`), then read as calls.
* a named function: the output is constrained to that function's parameters schema and is its arguments.
* `none`: no tools reach the template and nothing is parsed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

from sglx.srt.function_call.base_format_detector import BaseFormatDetector, ToolCallItem, ToolCallStream
from sglx.srt.function_call.detectors import create_detector

ANY_OBJECT: Dict[str, Any] = {"type": "object"}


class _NamedDetector(BaseFormatDetector):
    """The whole output is the arguments object of one function."""

    bare_start = "{"

    def __init__(self, name: str) -> None:
        self.name = name

    def parse_calls(self, region: str) -> Optional[List[ToolCallItem]]:
        try:
            args = json.loads(region)
        except ValueError:
            return None
        return [ToolCallItem(self.name, json.dumps(args, ensure_ascii=False))] if isinstance(args, dict) else None


class _RequiredDetector(BaseFormatDetector):
    """The whole output is a JSON list of {"name": ..., "parameters": {...}}."""

    bare_start = "["

    def parse_calls(self, region: str) -> Optional[List[ToolCallItem]]:
        try:
            calls = json.loads(region)
        except ValueError:
            return None
        if not isinstance(calls, list) or not all(isinstance(c, dict) and "name" in c for c in calls):
            return None
        return [ToolCallItem(c["name"], json.dumps(c.get("parameters", {}), ensure_ascii=False)) for c in calls]


@dataclass(frozen=True)
class ToolPlan:
    mode: str  # "auto", "required" or "named"
    tool_names: Tuple[str, ...]
    detector: BaseFormatDetector
    constraint: Optional[str] = None  # the json_schema that required / named impose

    @classmethod
    def from_request(cls, tools: Optional[List[Any]], tool_choice: Any, parallel: Optional[bool],
                     parser: Optional[str]) -> Optional["ToolPlan"]:
        """None when nothing is to be parsed. Raises ValueError for a tool_choice the tools cannot satisfy."""
        if not tools:
            if tool_choice not in (None, "none"):
                raise ValueError("tool_choice needs tools")
            return None
        by_name = {t.function.name: t.function for t in tools}
        names = tuple(by_name)
        if tool_choice == "none":
            return None
        if tool_choice in (None, "auto"):
            return None if parser is None else cls("auto", names, create_detector(parser))
        if tool_choice == "required":
            item = {"anyOf": [{"type": "object", "properties": {"name": {"const": n},
                                                                "parameters": f.parameters or ANY_OBJECT},
                               "required": ["name", "parameters"]} for n, f in by_name.items()]}
            schema = {"type": "array", "items": item, "minItems": 1, **({"maxItems": 1} if parallel is False else {})}
            return cls("required", names, _RequiredDetector(), json.dumps(schema))
        name = tool_choice.function.name
        if name not in by_name:
            raise ValueError(f"tool_choice names the function {name!r}, which is not among the tools")
        return cls("named", names, _NamedDetector(name), json.dumps(by_name[name].parameters or ANY_OBJECT))

    def stream(self) -> ToolCallStream:
        return ToolCallStream(self.detector, self.tool_names)

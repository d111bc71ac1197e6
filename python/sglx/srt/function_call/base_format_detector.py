"""Tool calls written in a model's output (SGLang's function_call/): one detector per way of writing them.

A detector knows where the tool-call part of an output begins (a marker such as `<tool_call>`, or a bare `[` /
`{` that opens the whole output) and, given that part, the calls in it. `ToolCallStream` runs any detector
over text as it arrives: text before a call passes through at once (held back only while it could be the
start of a marker), a call is held until it is complete (its end marker, or the end of the output), and a part
that does not parse after all is passed on as plain text, late but not lost.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Collection, List, Optional, Tuple

from sglx.srt.utils import partial_prefix_len

logger = logging.getLogger(__name__)


@dataclass
class ToolCallItem:
    name: str
    arguments: str  # the arguments object as JSON text, as OpenAI sends it


@dataclass
class ParseResult:
    normal_text: str = ""
    calls: List[ToolCallItem] = field(default_factory=list)

    def extend(self, other: "ParseResult") -> "ParseResult":
        self.normal_text += other.normal_text
        self.calls.extend(other.calls)
        return self


class BaseFormatDetector(ABC):
    # Markers that open a tool-call part anywhere in the output.
    start_markers: Tuple[str, ...] = ()
    # A character that opens one when the output begins with it (after whitespace): bare JSON / pythonic lists.
    bare_start: str = ""
    # What closes one call; empty: the calls run to the end of the output.
    end_marker: str = ""

    @abstractmethod
    def parse_calls(self, region: str) -> Optional[List[ToolCallItem]]:
        """The calls written in `region` (from its start marker or bare start through its end marker, or to the
        end of the output); None when it is not a well-formed call after all."""

    def parse(self, text: str, tool_names: Collection[str]) -> ParseResult:
        """A whole output: its plain text and its calls."""
        stream = ToolCallStream(self, tool_names)
        return stream.feed(text).extend(stream.flush())


class ToolCallStream:
    """One output's text, fed as it arrives (`feed`), then `flush`ed at its end."""

    def __init__(self, detector: BaseFormatDetector, tool_names: Collection[str]) -> None:
        self.detector = detector
        self.tool_names = set(tool_names)
        self.buffer = ""
        self.in_call = False
        self.sent_text = False  # non-space text went out: a bare start can no longer open the output

    def feed(self, delta: str) -> ParseResult:
        self.buffer += delta
        out = ParseResult()
        det = self.detector
        while True:
            if not self.in_call:
                start = self._find_start()
                if start is None:
                    keep = self._held_back()
                    self._emit(out, self.buffer[: len(self.buffer) - keep])
                    self.buffer = self.buffer[len(self.buffer) - keep:]
                    return out
                self._emit(out, self.buffer[:start])
                self.buffer, self.in_call = self.buffer[start:], True
            end = self.buffer.find(det.end_marker) if det.end_marker else -1
            if end < 0:
                return out
            end += len(det.end_marker)
            region, self.buffer, self.in_call = self.buffer[:end], self.buffer[end:], False
            self._add_calls(out, region)

    def flush(self) -> ParseResult:
        out = ParseResult()
        if self.in_call:
            self._add_calls(out, self.buffer)
        else:
            self._emit(out, self.buffer)
        self.buffer, self.in_call = "", False
        return out

    def _emit(self, out: ParseResult, text: str) -> None:
        out.normal_text += text
        self.sent_text = self.sent_text or bool(text.strip())

    def _find_start(self) -> Optional[int]:
        found = [i for i in (self.buffer.find(m) for m in self.detector.start_markers) if i >= 0]
        if self.detector.bare_start and not self.sent_text:
            stripped = self.buffer.lstrip()
            if stripped.startswith(self.detector.bare_start):
                found.append(len(self.buffer) - len(stripped))
        return min(found) if found else None

    def _held_back(self) -> int:
        """How much of the buffer's end could still become the start of a call."""
        if self.detector.bare_start and not self.sent_text and not self.buffer.strip():
            return len(self.buffer)
        return max((partial_prefix_len(self.buffer, m) for m in self.detector.start_markers), default=0)

    def _add_calls(self, out: ParseResult, region: str) -> None:
        calls = self.detector.parse_calls(region)
        if calls is None:
            self._emit(out, region)
            return
        for call in calls:
            if call.name in self.tool_names:
                out.calls.append(call)
            else:  # as SGLang: a call of a tool the request did not offer is dropped
                logger.warning("dropped a call of %r, which is not among the request's tools", call.name)

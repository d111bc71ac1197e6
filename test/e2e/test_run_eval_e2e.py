"""run_eval against a live sglx server on the default model (fixture `server` in conftest.py)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from sglx.test.run_eval import parse_args, run_eval

REPO = Path(__file__).resolve().parents[2]
DATA = REPO.parent / "shared" / "data"
SERVED_NAME = "SmolLM2-135M-Instruct"


def test_gsm8k_five_examples(server, tmp_path: Path) -> None:
    args = parse_args(["--eval-name", "gsm8k", "--num-examples", "5", "--max-tokens", "256", "--num-threads", "5",
                       "--base-url", server.base_url, "--data-path", str(DATA / "gsm8k"),
                       "--output-dir", str(tmp_path)])
    res = run_eval(args)
    assert res["model"] == SERVED_NAME  # the default model comes from /v1/models
    assert 0.0 <= res["score"] <= 1.0
    assert len(res["examples"]) == 5
    assert res["score"] == sum(r["correct"] for r in res["examples"]) / 5
    assert any(r["response"].strip() for r in res["examples"])  # the server really generated text
    assert json.loads(Path(res["json_path"]).read_text())["score"] == res["score"]
    assert Path(res["html_path"]).is_file()


def _load_parity_module():
    spec = importlib.util.spec_from_file_location("eval_parity", REPO / "benchmark" / "eval_parity.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_gsm8k_parity_with_transformers(server, tmp_path: Path) -> None:
    """The issue's acceptance check: first 50 GSM8K questions, server vs transformers greedy, same
    prompts and scorer; the scores agree within one question."""
    res = _load_parity_module().run_parity(server.base_url, num_examples=50, max_tokens=256,
                                           data_path=str(DATA / "gsm8k"), output_dir=str(tmp_path))
    assert res["num_examples"] == 50
    assert abs(res["server_correct"] - res["hf_correct"]) <= 1, res["disagreements"]

"""Aggregate per-example records into metrics and write the JSON result and the HTML report."""

from __future__ import annotations

import html
import json
import math
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from sglx.evals.common import EvalError


def mean(xs: List[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def std(xs: List[float]) -> float:
    if not xs:
        return float("nan")
    m = mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / len(xs))


def aggregate(records: List[Dict[str, Any]]) -> Dict[str, float]:
    """score (mean over all records, repeats included), its std, and one mean per category."""
    scores = [r["score"] for r in records]
    metrics: Dict[str, float] = {"score": mean(scores), "std": std(scores)}
    by_cat: Dict[str, List[float]] = {}
    for r in records:
        if r.get("category"):
            by_cat.setdefault(r["category"], []).append(r["score"])
    for cat in sorted(by_cat):
        metrics[cat] = mean(by_cat[cat])
    return metrics


def safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "model"


def output_paths(output_dir: str, eval_name: str, model: str) -> Tuple[Path, Path]:
    stem = f"{eval_name}_{safe_name(model)}"
    out = Path(output_dir).expanduser()
    return out / f"{stem}.json", out / f"{stem}.html"


_STYLE = (
    "body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse;width:100%}"
    "td,th{border:1px solid #ccc;padding:4px;vertical-align:top}"
    "pre{white-space:pre-wrap;margin:0;max-height:24em;overflow:auto}"
    ".ok{background:#e6ffe6}.bad{background:#ffe6e6}"
)


def _cell(text: Optional[Any]) -> str:
    return f"<td><pre>{html.escape('' if text is None else str(text))}</pre></td>"


def render_html(result: Dict[str, Any]) -> str:
    title = html.escape(f"{result['eval_name']} - {result['model']}")
    metric_rows = "".join(
        f"<tr><th>{html.escape(k)}</th><td>{v:.4f}</td></tr>" for k, v in result["metrics"].items()
    )
    rows = []
    for r in result["examples"]:
        cls = "ok" if r["correct"] else "bad"
        rows.append(
            f"<tr class='{cls}'><td>{r['index']}</td>"
            + _cell(r["prompt"]) + _cell(r["response"]) + _cell(r["extracted"]) + _cell(r["target"])
            + f"<td>{'yes' if r['correct'] else 'no'}</td><td>{r['score']:.2f}</td></tr>"
        )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title>"
        f"<style>{_STYLE}</style></head><body><h1>{title}</h1>"
        f"<table style='width:auto'>{metric_rows}</table><h2>Examples</h2><table>"
        "<tr><th>#</th><th>prompt</th><th>response</th><th>extracted</th><th>target</th>"
        "<th>correct</th><th>score</th></tr>" + "".join(rows) + "</table></body></html>\n"
    )


def write_reports(result: Dict[str, Any], output_dir: str) -> Tuple[Path, Path]:
    json_path, html_path = output_paths(output_dir, result["eval_name"], result["model"])
    try:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        html_path.write_text(render_html(result), encoding="utf-8")
    except OSError as e:
        raise EvalError(f"cannot write results to {json_path.parent}: {e}") from None
    return json_path, html_path

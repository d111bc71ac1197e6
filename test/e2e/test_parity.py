"""Greedy parity with transformers on the real default model (fp32, CPU), through both HTTP APIs."""

from __future__ import annotations


import pytest
import requests
import torch

from sglx.test.hf_reference import load_default_model

NEW_TOKENS = 64
LONG = ("In the beginning of the project the team wrote down what they wanted to build and why. " * 30).strip()
TEXT_PROMPTS = [
    "The capital of France is",
    "def quicksort(arr):\n    \"\"\"Sort a list of numbers.\"\"\"\n",
    "Le petit chat est assis sur",
    "日本の首都は",
    LONG + "\nSummary:",
    "Q: What is 12 times 12?\nA:",
]
CHAT_PROMPTS = [
    [{"role": "user", "content": "What is the tallest mountain in the world?"}],
    [{"role": "system", "content": "You are a terse assistant."},
     {"role": "user", "content": "Write a Python function that reverses a string."}],
    [{"role": "user", "content": "Traduis en anglais : « Bonjour, comment ça va ? »"}],
]


@pytest.fixture(scope="module")
def hf():
    return load_default_model()


def hf_greedy(model, ids, eos_ids):
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=list(eos_ids), pad_token_id=2)
    return out[0, len(ids):].tolist()


def chat_ids(tok, messages):
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if not isinstance(ids, list):
        ids = ids["input_ids"]
    return list(ids)


def test_generate_matches_transformers(server, hf):
    tok, model = hf
    for prompt in TEXT_PROMPTS:
        ids = tok.encode(prompt)
        want = hf_greedy(model, ids, {tok.eos_token_id})
        r = requests.post(server.url("/generate"), json={
            "text": prompt, "sampling_params": {"max_new_tokens": NEW_TOKENS, "temperature": 0}}, timeout=300)
        r.raise_for_status()
        got = r.json()["output_ids"]
        assert got == want, f"prompt {prompt[:40]!r}: sglx {got} != transformers {want}"
        assert r.json()["meta_info"]["prompt_tokens"] == len(ids)


def test_chat_matches_transformers(server, hf):
    tok, model = hf
    for messages in CHAT_PROMPTS:
        ids = chat_ids(tok, messages)
        want = hf_greedy(model, ids, {tok.eos_token_id})
        r = requests.post(server.url("/v1/chat/completions"), json={
            "model": "SmolLM2-135M-Instruct", "messages": messages, "max_tokens": NEW_TOKENS,
            "temperature": 0}, timeout=300)
        r.raise_for_status()
        body = r.json()
        text_want = tok.decode([t for t in want if t != tok.eos_token_id], skip_special_tokens=True)
        assert body["choices"][0]["message"]["content"] == text_want
        assert body["usage"]["prompt_tokens"] == len(ids)
        assert body["usage"]["completion_tokens"] == len(want)

"""OpenAI HTTP layer against a scripted TokenizerManager, through the real `openai` SDK and raw HTTP.

The fake manager "generates" a fixed reply per choice, tokenized by the real default-model tokenizer, and
records every GenerateReqInput it receives, so the tests check both directions: what the HTTP layer asks
the engine for (chat template, sampling keys, seeds) and what it makes of the engine's answers (shapes,
deltas, usage, finish reasons), against values computed here independently.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import threading
import time
from typing import Any, Dict, List, Optional

import openai
import pytest
import requests
import uvicorn
from fastapi import FastAPI, Request

from sglx.srt.entrypoints.openai.serving_chat import OpenAIServingChat
from sglx.srt.entrypoints.openai.serving_completions import OpenAIServingCompletion
from sglx.srt.entrypoints.openai.utils import models_response
from sglx.srt.managers.io_struct import GenerateReqInput
from sglx.srt.managers.tokenizer_manager import ClientDisconnected
from sglx.srt.server_args import default_model_path

REPLIES = ["Hello there! How can I help you today?", "Sure, here is a second answer."]
MODEL = "fake-model"
CACHED = 3


def lp_of(j: int) -> float:
    return -0.125 * (j + 1)  # exact in binary, so JSON round trips compare with ==


def prompt_lp_of(j: int) -> Optional[float]:
    return None if j == 0 else -0.5 * j  # a prompt's first token has no logprob


class FakeTokenizerManager:
    served_model_name = MODEL
    model_path = "/models/fake"
    context_len = 2048

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.reset()

    def reset(self) -> None:
        self.received: List[GenerateReqInput] = []
        self.groups: List[Optional[str]] = []
        self.aborted: List[str] = []
        self.error: Optional[str] = None  # raise ValueError(error) before any output
        self.fail_after: Optional[int] = None  # raise fail_error after this many streamed outputs
        self.fail_error: Exception = RuntimeError("engine exploded")
        self.client_gone = False  # raise ClientDisconnected before any output, as the manager does
        self.step_delay = 0.0

    def abort_request(self, rid: str) -> None:
        self.aborted.append(rid)

    def _steps(self, sub: GenerateReqInput, i: int) -> List[Dict[str, Any]]:
        tok = self.tokenizer
        ids = tok.encode(REPLIES[i % len(REPLIES)], add_special_tokens=False)
        max_new = sub.sampling_params.get("max_new_tokens")
        final = {"type": "stop", "matched": tok.eos_token_id}
        if max_new is not None and len(ids) > max_new:
            ids, final = ids[:max_new], {"type": "length", "length": max_new}
        prompt_len = len(sub.input_ids) if sub.input_ids is not None else len(tok.encode(sub.text))
        steps = []
        for k in range(1, len(ids) + 1):
            meta: Dict[str, Any] = {
                "id": sub.rid, "finish_reason": final if k == len(ids) else None, "prompt_tokens": prompt_len,
                "completion_tokens": k, "cached_tokens": min(CACHED, prompt_len),
            }
            if sub.return_logprob:
                meta["output_token_logprobs"] = [(lp_of(j), ids[j], tok.decode([ids[j]])) for j in range(k)]
                if sub.top_logprobs_num:
                    meta["output_top_logprobs"] = [
                        [(lp_of(j) - m, ids[j] + m, tok.decode([ids[j] + m])) for m in range(sub.top_logprobs_num)]
                        for j in range(k)
                    ]
            if sub.return_logprob and sub.logprob_start_len is not None and sub.logprob_start_len >= 0:
                p_ids = sub.input_ids if sub.input_ids is not None else tok.encode(sub.text)
                meta["input_token_logprobs"] = [(prompt_lp_of(j), t, tok.decode([t])) for j, t in enumerate(p_ids)]
                if sub.top_logprobs_num:
                    meta["input_top_logprobs"] = [None] + [
                        [(prompt_lp_of(j) - m, t + m, tok.decode([t + m])) for m in range(sub.top_logprobs_num)]
                        for j, t in enumerate(p_ids) if j > 0
                    ]
            steps.append({"text": tok.decode(ids[:k]), "output_ids": ids[:k], "meta_info": meta})
        return steps

    async def generate_request(self, obj: GenerateReqInput, request: Optional[Request] = None,
                               group: Optional[str] = None):
        self.received.append(obj)
        self.groups.append(group)
        if self.error:
            raise ValueError(self.error)
        if self.client_gone:
            raise ClientDisconnected(obj.rid)
        subs = [obj] if obj.is_single() else [obj[i] for i in range(obj.batch_size())]
        scripts = [self._steps(sub, i) for i, sub in enumerate(subs)]
        if not obj.stream:
            finals = [s[-1] for s in scripts]
            yield finals[0] if obj.is_single() else finals
            return
        sent = 0
        for step in range(max(len(s) for s in scripts)):
            for i, script in enumerate(scripts):
                if step < len(script):
                    if self.fail_after is not None and sent >= self.fail_after:
                        raise self.fail_error
                    out = dict(script[step])
                    if not obj.is_single():
                        out["index"] = i
                    yield out
                    sent += 1
                    await asyncio.sleep(self.step_delay)


# ----------------------------------------------------------------------------- module fixtures
@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    path = default_model_path()
    return AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))


@pytest.fixture(scope="module")
def fake_tm(tokenizer):
    return FakeTokenizerManager(tokenizer)


@pytest.fixture(scope="module")
def base_url(fake_tm):
    app = FastAPI()
    completion, chat = OpenAIServingCompletion(fake_tm), OpenAIServingChat(fake_tm)

    @app.post("/v1/completions")
    async def _completions(request: Request):
        return await completion.handle_request(request)

    @app.post("/v1/chat/completions")
    async def _chat(request: Request):
        return await chat.handle_request(request)

    @app.get("/v1/models")
    async def _models():
        return models_response(fake_tm)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 10
    while not server.started:
        assert time.time() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=5)


@pytest.fixture(autouse=True)
def _reset(fake_tm):
    fake_tm.reset()


@pytest.fixture(scope="module")
def client(base_url):
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="x", max_retries=0)


def reply_ids(tokenizer, i: int = 0) -> List[int]:
    return tokenizer.encode(REPLIES[i], add_special_tokens=False)


def sse_events(resp: requests.Response) -> List[Any]:
    events = []
    for line in resp.iter_lines(decode_unicode=True):
        if line.startswith("data: "):
            data = line[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


# ----------------------------------------------------------------------------- /v1/models
def test_models(base_url):
    body = requests.get(f"{base_url}/v1/models").json()
    assert body["object"] == "list"
    card = body["data"][0]
    assert (card["id"], card["object"], card["owned_by"]) == (MODEL, "model", "sglx")
    assert (card["root"], card["max_model_len"]) == ("/models/fake", 2048)


# ----------------------------------------------------------------------------- /v1/completions
def test_completion_non_stream(client, fake_tm, tokenizer):
    r = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=5, temperature=0.5)
    obj = fake_tm.received[-1]
    assert obj.is_single() and obj.text == "Once upon a time" and not obj.stream
    assert obj.sampling_params["max_new_tokens"] == 5 and obj.sampling_params["temperature"] == 0.5
    ids = reply_ids(tokenizer)
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    assert r.choices[0].text == tokenizer.decode(ids[:5])
    assert r.choices[0].finish_reason == "length"
    n_prompt = len(tokenizer.encode("Once upon a time"))
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (n_prompt, 5, n_prompt + 5)
    assert r.usage.prompt_tokens_details.cached_tokens == CACHED


def test_completion_max_tokens_default_and_null(base_url, fake_tm):
    r = requests.post(f"{base_url}/v1/completions", json={"prompt": "hi"})
    assert r.status_code == 200, r.text
    assert fake_tm.received[-1].sampling_params["max_new_tokens"] == 16
    r = requests.post(f"{base_url}/v1/completions", json={"prompt": "hi", "max_tokens": None})
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "stop"
    assert fake_tm.received[-1].sampling_params["max_new_tokens"] is None


def test_completion_stream_with_usage(client, fake_tm, tokenizer):
    chunks = list(client.completions.create(
        model=MODEL, prompt="Hi", max_tokens=100, stream=True, stream_options={"include_usage": True}))
    assert fake_tm.received[-1].stream
    assert "".join(c.choices[0].text for c in chunks if c.choices) == REPLIES[0]
    content = [c for c in chunks if c.choices]
    assert all(c.choices[0].finish_reason is None for c in content[:-1])
    assert content[-1].choices[0].finish_reason == "stop"
    usage = chunks[-1]
    assert usage.choices == [] and usage.usage.completion_tokens == len(reply_ids(tokenizer))
    assert usage.usage.prompt_tokens_details.cached_tokens == min(CACHED, len(tokenizer.encode("Hi")))
    no_usage = list(client.completions.create(model=MODEL, prompt="Hi", max_tokens=3, stream=True))
    assert all(c.choices for c in no_usage)


def test_completion_n2_seed_and_sampling_passthrough(client, fake_tm):
    r = client.completions.create(
        model=MODEL, prompt="Q:", n=2, seed=7, max_tokens=50, stop=["\n", "END"], presence_penalty=0.5,
        logit_bias={"42": 1.5},
        extra_body={"top_k": 5, "min_p": 0.1, "repetition_penalty": 1.1, "min_tokens": 2, "ignore_eos": True,
                    "stop_token_ids": [11], "skip_special_tokens": False, "no_stop_trim": True})
    obj = fake_tm.received[-1]
    assert obj.batch_size() == 2 and obj.text == ["Q:", "Q:"] and len(set(obj.rid)) == 2
    assert [p["sampling_seed"] for p in obj.sampling_params] == [7, 8]
    sp = obj.sampling_params[0]
    expected = {"stop": ["\n", "END"], "presence_penalty": 0.5, "logit_bias": {"42": 1.5}, "top_k": 5,
                "min_p": 0.1, "repetition_penalty": 1.1, "min_new_tokens": 2, "ignore_eos": True,
                "stop_token_ids": [11], "skip_special_tokens": False, "no_stop_trim": True, "max_new_tokens": 50}
    assert {k: sp[k] for k in expected} == expected
    assert "n" not in sp and "seed" not in sp
    assert [(c.index, c.text) for c in r.choices] == [(0, REPLIES[0]), (1, REPLIES[1])]
    # The prompt is counted once however many choices sample it.
    assert r.usage.prompt_tokens == len(fake_tm.tokenizer.encode("Q:"))


def test_completion_multi_prompt_stream_n2(client, fake_tm):
    chunks = list(client.completions.create(model=MODEL, prompt=[[1, 2, 3], [4, 5]], n=2, max_tokens=99,
                                            stream=True))
    obj = fake_tm.received[-1]
    assert obj.input_ids == [[1, 2, 3], [1, 2, 3], [4, 5], [4, 5]]
    texts: Dict[int, str] = {}
    for c in chunks:
        for ch in c.choices:
            texts[ch.index] = texts.get(ch.index, "") + ch.text
    assert texts == {0: REPLIES[0], 1: REPLIES[1], 2: REPLIES[0], 3: REPLIES[1]}


def test_completion_logprobs(client, fake_tm, tokenizer):
    r = client.completions.create(model=MODEL, prompt="Hi", max_tokens=4, logprobs=2)
    obj = fake_tm.received[-1]
    assert obj.return_logprob and obj.top_logprobs_num == 2 and obj.return_text_in_logprobs
    ids = reply_ids(tokenizer)[:4]
    texts = [tokenizer.decode([t]) for t in ids]
    lp = r.choices[0].logprobs
    assert lp.tokens == texts
    assert lp.token_logprobs == [lp_of(j) for j in range(4)]
    assert lp.text_offset == [sum(len(t) for t in texts[:j]) for j in range(4)]
    for j, top in enumerate(lp.top_logprobs):
        assert top == {texts[j]: lp_of(j), tokenizer.decode([ids[j] + 1]): lp_of(j) - 1}
    # The streamed pieces add up to the same logprobs.
    chunks = list(client.completions.create(model=MODEL, prompt="Hi", max_tokens=4, logprobs=2, stream=True))
    assert sum((c.choices[0].logprobs.tokens for c in chunks), []) == texts
    assert sum((c.choices[0].logprobs.text_offset for c in chunks), []) == lp.text_offset


def test_completion_echo(client, tokenizer):
    r = client.completions.create(model=MODEL, prompt="Echo me", max_tokens=3, echo=True)
    assert r.choices[0].text == "Echo me" + tokenizer.decode(reply_ids(tokenizer)[:3])
    ids = tokenizer.encode("Token prompt")
    chunks = list(client.completions.create(model=MODEL, prompt=ids, max_tokens=3, echo=True, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == tokenizer.decode(ids) + tokenizer.decode(
        reply_ids(tokenizer)[:3])


def test_completion_echo_with_logprobs(client, fake_tm, tokenizer):
    """The prompt is scored from its first token: its tokens and logprobs (null first) lead, then the
    completion's, with text offsets into the returned text; streamed, the first chunk carries the prompt's."""
    ids = tokenizer.encode("Score this prompt")
    p_texts = [tokenizer.decode([t]) for t in ids]
    out_ids = reply_ids(tokenizer)[:2]
    out_texts = [tokenizer.decode([t]) for t in out_ids]
    r = client.completions.create(model=MODEL, prompt=ids, max_tokens=2, echo=True, logprobs=1)
    assert fake_tm.received[-1].logprob_start_len == 0
    lp = r.choices[0].logprobs
    assert lp.tokens == p_texts + out_texts
    assert lp.token_logprobs == [prompt_lp_of(j) for j in range(len(ids))] + [lp_of(0), lp_of(1)]
    assert lp.top_logprobs[0] is None
    assert lp.top_logprobs[1] == {p_texts[1]: prompt_lp_of(1)}  # (the fake's top-1 is the token itself)
    prompt_len = len(tokenizer.decode(ids))
    assert lp.text_offset[: len(ids)] == [sum(len(t) for t in p_texts[:j]) for j in range(len(ids))]
    assert lp.text_offset[len(ids):] == [prompt_len, prompt_len + len(out_texts[0])]
    chunks = list(client.completions.create(model=MODEL, prompt=ids, max_tokens=2, echo=True, logprobs=1,
                                            stream=True))
    assert chunks[0].choices[0].logprobs.tokens == p_texts + out_texts[:1]
    assert sum((c.choices[0].logprobs.token_logprobs for c in chunks), []) == lp.token_logprobs
    assert sum((c.choices[0].logprobs.text_offset for c in chunks), []) == lp.text_offset
    # Without echo the prompt is not scored.
    client.completions.create(model=MODEL, prompt=ids, max_tokens=2, logprobs=1)
    assert fake_tm.received[-1].logprob_start_len == -1


# ----------------------------------------------------------------------------- /v1/chat/completions
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]


def template_ids(tokenizer, messages, **kw) -> List[int]:
    out = tokenizer.apply_chat_template(messages, tokenize=True, **kw)
    return list(out["input_ids"]) if hasattr(out, "keys") else list(out)


def test_chat_non_stream(client, fake_tm, tokenizer):
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, seed=3)
    obj = fake_tm.received[-1]
    expected_ids = template_ids(tokenizer, MESSAGES, add_generation_prompt=True)
    assert obj.input_ids == expected_ids and obj.text is None
    assert obj.sampling_params["max_new_tokens"] == fake_tm.context_len - len(expected_ids)
    assert obj.sampling_params["sampling_seed"] == 3
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    msg = r.choices[0].message
    assert (msg.role, msg.content, r.choices[0].finish_reason) == ("assistant", REPLIES[0], "stop")
    n_out = len(reply_ids(tokenizer))
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(expected_ids), n_out)
    assert r.usage.prompt_tokens_details.cached_tokens == CACHED
    # max_completion_tokens wins over the deprecated max_tokens.
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=9, max_completion_tokens=4)
    assert fake_tm.received[-1].sampling_params["max_new_tokens"] == 4
    assert r.choices[0].finish_reason == "length"
    client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=9)
    assert fake_tm.received[-1].sampling_params["max_new_tokens"] == 9


def test_chat_content_parts_and_roles(base_url, fake_tm, tokenizer):
    parts = [{"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
             {"role": "user", "content": [{"type": "text", "text": "What is"}, {"type": "text", "text": "2+2?"}]},
             {"role": "assistant", "content": None, "tool_calls": [
                 {"id": "c1", "type": "function", "function": {"name": "add", "arguments": "{}"}}]},
             {"role": "tool", "content": "4", "tool_call_id": "c1"}]
    r = requests.post(f"{base_url}/v1/chat/completions", json={"messages": parts,
                                                                "tools": [{"type": "function", "function": {"name": "add"}}]})
    assert r.status_code == 200, r.text
    flat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is\n2+2?"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "add", "arguments": {}}}]},
            {"role": "tool", "content": "4", "tool_call_id": "c1"}]
    assert fake_tm.received[-1].input_ids == template_ids(tokenizer, flat, add_generation_prompt=True,
                                                          tools=[{"type": "function", "function": {"name": "add"}}])


def test_chat_continue_final_message(base_url, fake_tm, tokenizer):
    msgs = MESSAGES + [{"role": "assistant", "content": "The answer is"}]
    r = requests.post(f"{base_url}/v1/chat/completions", json={"messages": msgs, "continue_final_message": True})
    assert r.status_code == 200, r.text
    assert fake_tm.received[-1].input_ids == template_ids(tokenizer, msgs, continue_final_message=True)
    r = requests.post(f"{base_url}/v1/chat/completions", json={"messages": MESSAGES, "continue_final_message": True})
    assert r.status_code == 400


@pytest.mark.parametrize("route", ["chat", "completions"])
def test_continuous_usage_stats(client, fake_tm, tokenizer, route):
    """stream_options.continuous_usage_stats (vLLM's, SGLang's): with include_usage every content chunk carries
    the usage so far; the counts never fall and end at the final usage chunk's. It was accepted and ignored."""
    opts = {"include_usage": True, "continuous_usage_stats": True}
    if route == "chat":
        chunks = list(client.chat.completions.create(model=MODEL, messages=MESSAGES, n=2, stream=True,
                                                     stream_options=opts))
        body = [c for c in chunks[2:-1]]  # after the two role chunks, before the usage chunk
    else:
        chunks = list(client.completions.create(model=MODEL, prompt="Hi", max_tokens=100, n=2, stream=True,
                                                stream_options=opts))
        body = chunks[:-1]
    final = chunks[-1].usage
    counts = [c.usage.completion_tokens for c in body]
    assert all(c.usage is not None and c.usage.prompt_tokens == final.prompt_tokens for c in body)
    assert counts == sorted(counts) and counts[-1] == final.completion_tokens and counts[0] < counts[-1]
    plain = list(client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True,
                                                stream_options={"include_usage": True}))
    assert all(c.usage is None for c in plain[:-1]) and plain[-1].usage is not None


def test_chat_stream_with_usage_n2(client, fake_tm, tokenizer):
    chunks = list(client.chat.completions.create(model=MODEL, messages=MESSAGES, n=2, stream=True,
                                                 stream_options={"include_usage": True}))
    assert len(fake_tm.received[-1].input_ids) == 2
    first = [c.choices[0] for c in chunks[:2]]
    assert [(ch.index, ch.delta.role, ch.delta.content) for ch in first] == [(0, "assistant", ""), (1, "assistant", "")]
    texts, finish = {0: "", 1: ""}, {}
    for c in chunks[2:-1]:
        ch = c.choices[0]
        assert ch.delta.role is None
        texts[ch.index] += ch.delta.content or ""
        if ch.finish_reason:
            finish[ch.index] = ch.finish_reason
    assert texts == {0: REPLIES[0], 1: REPLIES[1]} and finish == {0: "stop", 1: "stop"}
    usage = chunks[-1]
    assert usage.choices == [] and usage.object == "chat.completion.chunk"
    n_prompt = len(template_ids(tokenizer, MESSAGES, add_generation_prompt=True))
    assert usage.usage.prompt_tokens == n_prompt
    assert usage.usage.completion_tokens == len(reply_ids(tokenizer, 0)) + len(reply_ids(tokenizer, 1))


def test_chat_logprobs(client, fake_tm, tokenizer):
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=3, logprobs=True, top_logprobs=2)
    obj = fake_tm.received[-1]
    assert obj.return_logprob and obj.top_logprobs_num == 2
    ids = reply_ids(tokenizer)[:3]
    content = r.choices[0].logprobs.content
    assert [c.token for c in content] == [tokenizer.decode([t]) for t in ids]
    assert [c.logprob for c in content] == [lp_of(j) for j in range(3)]
    assert content[0].bytes == list(tokenizer.decode([ids[0]]).encode())
    tops = content[1].top_logprobs
    assert [(t.token, t.logprob) for t in tops] == [(tokenizer.decode([ids[1]]), lp_of(1)),
                                                    (tokenizer.decode([ids[1] + 1]), lp_of(1) - 1)]
    chunks = list(client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=3, logprobs=True,
                                                 stream=True))
    streamed = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [t.logprob for t in streamed] == [lp_of(j) for j in range(3)]
    assert all(t.top_logprobs == [] for t in streamed)
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=3)
    assert r.choices[0].logprobs is None and not fake_tm.received[-1].return_logprob


def test_chat_logprob_bytes_rebuild_characters_split_across_tokens(client, fake_tm, tokenizer, monkeypatch):
    """An emoji or a CJK character is several byte-level tokens, each decoding to U+FFFD alone; `bytes` must be
    each token's own bytes, so that joined they give the text (OpenAI's contract). They were U+FFFD's bytes."""
    reply = "Party 🎉 東京!"
    monkeypatch.setitem(globals(), "REPLIES", [reply])
    ids = reply_ids(tokenizer)
    assert sum(tokenizer.decode([t]).count("\ufffd") for t in ids) >= 4  # the case this test is about
    for stream in (False, True):
        r = client.chat.completions.create(model=MODEL, messages=MESSAGES, logprobs=True, top_logprobs=2,
                                           stream=stream)
        if stream:
            content = [t for c in r if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
        else:
            content = r.choices[0].logprobs.content
        assert bytes(b for c in content for b in c.bytes).decode("utf-8") == reply
        if not stream:  # a top alternative is the chosen token: the same bytes
            assert all(c.top_logprobs[0].bytes == c.bytes for c in content)


def test_token_bytes_of_byte_fallback_pieces():
    """SentencePiece vocabularies spell a byte they cannot merge as `<0xNN>`; whole pieces keep their text."""
    from sglx.srt.entrypoints.openai.utils import token_bytes

    class Tok:
        pieces = {5: "<0xF0>", 6: "<0x9F>", 7: "▁Paris"}

        def convert_ids_to_tokens(self, i):
            return self.pieces[i]

    assert token_bytes(Tok(), 5, "\ufffd") == [0xF0] and token_bytes(Tok(), 6, "\ufffd") == [0x9F]
    assert token_bytes(Tok(), 7, " Paris") == list(b" Paris")
    assert token_bytes(None, 5, "\ufffd") == list("\ufffd".encode())  # no tokenizer: the text's bytes


# ----------------------------------------------------------------------------- errors
def test_unknown_model_404(base_url, client):
    r = requests.post(f"{base_url}/v1/completions", json={"model": "gpt-9", "prompt": "x"})
    assert r.status_code == 404
    assert r.json() == {"object": "error", "message": "The model `gpt-9` does not exist.", "type": "NotFoundError",
                        "param": None, "code": 404}
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-9", messages=MESSAGES)
    ok = requests.post(f"{base_url}/v1/completions", json={"model": "/models/fake", "prompt": "x", "max_tokens": 1})
    assert ok.status_code == 200


@pytest.mark.parametrize("path,body", [
    ("/v1/completions", b"{not json"),
    ("/v1/completions", b"[1, 2]"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}'),
    # Not JSON, though Python's json module takes them: NaN once reached sampling as a temperature, a lone
    # surrogate the tokenizer (a 500).
    ("/v1/completions", b'{"prompt": "x", "temperature": NaN}'),
    ("/v1/completions", b'{"prompt": "x", "temperature": Infinity}'),
    ("/v1/completions", b'{"prompt": "x", "top_p": 1e999}'),
    ("/v1/completions", b'{"prompt": "a\\ud800b"}'),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "a\\udfffb"}]}'),
])
def test_bad_json_400(base_url, fake_tm, path, body):
    r = requests.post(base_url + path, data=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["object"] == "error" and r.json()["code"] == 400
    assert fake_tm.received == []


@pytest.mark.parametrize("path,body,needle", [
    ("/v1/completions", {"prompt": "x", "max_tokens": "many"}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "n": 0}, "n"),
    ("/v1/completions", {"prompt": "x", "n": 129}, "n"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "n": 2**70}, "n"),
    ("/v1/completions", {"prompt": "x", "max_tokens": True}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "temperature": "hot"}, "temperature"),
    ("/v1/completions", {"prompt": "x", "suffix": "!"}, "suffix"),
    ("/v1/completions", {"prompt": [[1, 2], []]}, "empty"),
    ("/v1/completions", {"max_tokens": 3}, "prompt"),
    ("/v1/completions", {"prompt": []}, "empty"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, "role"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": MESSAGES, "response_format": {"type": "yaml"}}, "response_format"),
    ("/v1/chat/completions", {"messages": MESSAGES, "response_format": {"type": "json_schema"}}, "json_schema.schema"),
    ("/v1/completions", {"prompt": "x", "response_format": {"type": "json_object"}, "regex": "a"}, "only one"),
    ("/v1/chat/completions", {"messages": MESSAGES, "regex": "a", "ebnf": "root ::= \"a\""}, "only one"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x"}}]}]}, "image_url"),
    ("/v1/chat/completions", {"messages": MESSAGES, "top_logprobs": 2}, "logprobs"),
    ("/v1/completions", {"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
    ("/v1/chat/completions", {"messages": [*MESSAGES, {"role": "assistant", "content": "It"}],
                              "continue_final_message": True, "add_generation_prompt": True}, "add_generation_prompt"),
])
def test_bad_request_400(base_url, fake_tm, path, body, needle):
    r = requests.post(base_url + path, json=body)
    assert r.status_code == 400, r.text
    assert r.json()["type"] == "BadRequestError" and needle in r.json()["message"]
    assert fake_tm.received == []


@pytest.mark.parametrize("path,extra,want", [
    ("/v1/chat/completions", {"response_format": {"type": "json_object"}}, {"json_schema": '{"type": "object"}'}),
    ("/v1/chat/completions", {"response_format": {"type": "json_schema", "json_schema": {
        "name": "p", "strict": True, "schema": {"type": "object", "properties": {"a": {"type": "integer"}}}}}},
     {"json_schema": '{"type": "object", "properties": {"a": {"type": "integer"}}}'}),
    ("/v1/chat/completions", {"response_format": {"type": "text"}, "regex": "[0-9]+"}, {"regex": "[0-9]+"}),
    ("/v1/completions", {"ebnf": 'root ::= "a"'}, {"ebnf": 'root ::= "a"'}),
    ("/v1/completions", {"json_schema": '{"type": "string"}'}, {"json_schema": '{"type": "string"}'}),
    ("/v1/completions", {}, {}),
])
def test_structured_output_reaches_the_sampling_params(base_url, fake_tm, path, extra, want):
    body = {"messages": MESSAGES} if "chat" in path else {"prompt": "x"}
    r = requests.post(base_url + path, json={**body, "max_tokens": 3, **extra})
    assert r.status_code == 200, r.text
    sp = fake_tm.received[0].sampling_params
    assert {k: sp[k] for k in ("json_schema", "regex", "ebnf") if k in sp} == want


@pytest.mark.parametrize("stream", [False, True])
def test_manager_value_error_400(base_url, client, fake_tm, stream):
    fake_tm.error = "temperature must be non-negative, got -1."
    r = requests.post(f"{base_url}/v1/chat/completions", json={"messages": MESSAGES, "stream": stream})
    assert r.status_code == 400 and r.json()["message"] == fake_tm.error
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="x", stream=stream)
    fake_tm.error = None
    assert client.completions.create(model=MODEL, prompt="x", max_tokens=2).choices[0].finish_reason == "length"


def test_mid_stream_error_then_done(base_url, client, fake_tm):
    fake_tm.fail_after = 2
    r = requests.post(f"{base_url}/v1/completions", json={"prompt": "x", "stream": True}, stream=True)
    assert r.status_code == 200
    events = sse_events(r)
    assert [e["choices"][0]["text"] for e in events[:2]] == [fake_tm.tokenizer.decode(reply_ids(fake_tm.tokenizer)[:1]),
                                                           fake_tm.tokenizer.decode(reply_ids(fake_tm.tokenizer)[1:2])]
    assert events[2]["error"]["code"] == 500 and "engine exploded" in events[2]["error"]["message"]
    assert events[3] == "[DONE]" and len(events) == 4
    assert fake_tm.aborted == [fake_tm.received[-1].rid]  # the unfinished request was released
    with pytest.raises(openai.APIError):
        list(client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True))
    # The server releases the chat request once its stream ends, after the client has already raised: wait for
    # it here (it once landed in the next test's list of aborts).
    deadline = time.time() + 5
    while len(fake_tm.aborted) < 2 and time.time() < deadline:
        time.sleep(0.01)
    assert fake_tm.aborted[-1] == fake_tm.received[-1].rid


@pytest.mark.parametrize("stream", [False, True])
def test_client_gone_is_a_quiet_499(base_url, fake_tm, caplog, stream):
    """The manager raises ClientDisconnected once the client left: the exchange ends without a 500, an error
    event or a logged failure (each dropped request used to log a traceback)."""
    fake_tm.client_gone = True
    for path, extra in [("/v1/completions", {"prompt": "x"}), ("/v1/chat/completions", {"messages": MESSAGES})]:
        r = requests.post(f"{base_url}{path}", json={**extra, "stream": stream})
        assert r.status_code == 499 and not r.content
    fake_tm.client_gone = False
    fake_tm.fail_after, fake_tm.fail_error = 2, ClientDisconnected("x")  # gone mid-stream
    r = requests.post(f"{base_url}/v1/completions", json={"prompt": "x", "stream": True}, stream=True)
    events = sse_events(r)
    assert len(events) == 2 and all("error" not in e for e in events)  # no error event, no [DONE]: nobody reads
    assert fake_tm.aborted == [fake_tm.received[-1].rid]
    assert not [rec for rec in caplog.records if rec.levelname == "ERROR"]


def test_client_disconnect_aborts(base_url, fake_tm):
    fake_tm.step_delay = 0.05
    with requests.post(f"{base_url}/v1/completions", json={"prompt": "x", "stream": True, "max_tokens": 100},
                       stream=True) as r:
        next(r.iter_lines())
    deadline = time.time() + 3
    while not fake_tm.aborted and time.time() < deadline:
        time.sleep(0.02)
    assert fake_tm.aborted == [fake_tm.received[-1].rid]


def test_int_list_checks_and_message_chunks():
    from sglx.srt.managers.io_struct import TokenizedEmbeddingReqInput, ids_in_range, is_int_list
    from sglx.srt.managers.tokenizer_manager import chunk_by_tokens

    assert is_int_list([]) and is_int_list([1, 2, 3]) and not is_int_list((1, 2)) and not is_int_list([1, True])
    assert not is_int_list([1, 2.0]) and not is_int_list([[1]])
    import enum

    class Tok(enum.IntEnum):
        A = 3

    assert is_int_list([1, Tok.A])  # int subclasses other than bool pass, as before
    assert ids_in_range([], 5) and ids_in_range([0, 4], 5) and not ids_in_range([0, 5], 5)
    assert not ids_in_range([-1, 2], 5)
    reqs = [TokenizedEmbeddingReqInput(str(i), None, [1] * n) for i, n in enumerate([3, 4, 1, 10, 2, 2])]
    parts = chunk_by_tokens(reqs, 5)
    assert [[r.rid for r in p] for p in parts] == [["0", "1"], ["2", "3"], ["4", "5"]]
    assert chunk_by_tokens([], 5) == [] and len(chunk_by_tokens(reqs, 10**9)) == 1


# ----------------------------------------------------------------------------- tool calls
WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                                  "parameters": {"type": "object", "properties": {
                                                      "city": {"type": "string"}}, "required": ["city"]}}}
TIME_TOOL = {"type": "function", "function": {"name": "get_time"}}
TOOL_REPLY = 'Checking.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


@pytest.fixture
def tool_parser(fake_tm, monkeypatch):
    """The fake manager's server runs with --tool-call-parser qwen25 and answers with a tool call."""
    import types

    monkeypatch.setattr(fake_tm, "server_args", types.SimpleNamespace(tool_call_parser="qwen25"), raising=False)
    monkeypatch.setitem(globals(), "REPLIES", [TOOL_REPLY])


def test_auto_tool_calls_are_parsed(client, fake_tm, tool_parser):
    chat = client.chat.completions.create(model=MODEL, messages=MESSAGES, tools=[WEATHER_TOOL, TIME_TOOL])
    choice = chat.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Checking."
    (call,) = choice.message.tool_calls
    assert call.id.startswith("call_") and call.type == "function"
    assert (call.function.name, json.loads(call.function.arguments)) == ("get_weather", {"city": "Paris"})
    assert "json_schema" not in fake_tm.received[0].sampling_params  # auto constrains nothing
    # Streamed: the text first, then the call in one delta once complete, and the same finish reason.
    chunks = list(client.chat.completions.create(model=MODEL, messages=MESSAGES, tools=[WEATHER_TOOL],
                                                 stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    calls = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert text == "Checking." and len(calls) == 1 and calls[0].index == 0
    assert (calls[0].function.name, json.loads(calls[0].function.arguments)) == ("get_weather", {"city": "Paris"})
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    # tool_choice "none": nothing is parsed, the text comes back as it is.
    plain = client.chat.completions.create(model=MODEL, messages=MESSAGES, tools=[WEATHER_TOOL], tool_choice="none")
    assert plain.choices[0].message.content == TOOL_REPLY and plain.choices[0].message.tool_calls is None
    assert plain.choices[0].finish_reason == "stop"


def test_tools_reach_the_template(base_url, fake_tm, monkeypatch):
    seen = []
    real = fake_tm.tokenizer.apply_chat_template
    monkeypatch.setattr(fake_tm.tokenizer, "apply_chat_template",
                        lambda msgs, **kw: seen.append((msgs, kw)) or real(msgs, **kw))
    history = MESSAGES + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18C"}]
    for choice, want_tools in (("auto", True), ("none", False)):
        r = requests.post(f"{base_url}/v1/chat/completions",
                          json={"messages": history, "tools": [WEATHER_TOOL], "tool_choice": choice, "max_tokens": 2})
        assert r.status_code == 200, r.text
        msgs, kw = seen[-1]
        assert ("tools" in kw) == want_tools and (not want_tools or kw["tools"][0] == WEATHER_TOOL)
        # The assistant's call reaches the template with its arguments as a mapping, as templates expect.
        assert msgs[-2]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}


def test_required_and_named_tool_choice_constrain_the_output(client, fake_tm, monkeypatch):
    monkeypatch.setitem(globals(), "REPLIES", ['[{"name": "get_time", "parameters": {}}]'])
    chat = client.chat.completions.create(model=MODEL, messages=MESSAGES, tools=[WEATHER_TOOL, TIME_TOOL],
                                          tool_choice="required", parallel_tool_calls=False)
    schema = json.loads(fake_tm.received[-1].sampling_params["json_schema"])
    assert schema["type"] == "array" and schema["maxItems"] == 1
    (call,) = chat.choices[0].message.tool_calls
    assert call.function.name == "get_time" and chat.choices[0].message.content is None
    monkeypatch.setitem(globals(), "REPLIES", ['{"city": "Oslo"}'])
    chat = client.chat.completions.create(model=MODEL, messages=MESSAGES, tools=[WEATHER_TOOL, TIME_TOOL],
                                          tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert json.loads(fake_tm.received[-1].sampling_params["json_schema"]) == WEATHER_TOOL["function"]["parameters"]
    (call,) = chat.choices[0].message.tool_calls
    assert (call.function.name, json.loads(call.function.arguments)) == ("get_weather", {"city": "Oslo"})


@pytest.mark.parametrize("extra,needle", [
    ({"tool_choice": "required"}, "needs tools"),
    ({"tools": [WEATHER_TOOL], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "not among"),
    ({"tools": [WEATHER_TOOL], "tool_choice": "required", "response_format": {"type": "json_object"}}, "combined"),
    ({"tools": [{"type": "retrieval"}]}, "tools"),
    ({"tools": [WEATHER_TOOL], "tool_choice": "sometimes"}, "tool_choice"),
])
def test_bad_tool_requests_400(base_url, fake_tm, extra, needle):
    r = requests.post(f"{base_url}/v1/chat/completions", json={"messages": MESSAGES, **extra})
    assert r.status_code == 400 and needle in r.json()["message"], r.text
    assert fake_tm.received == []


# ----------------------------------------------------------------------------- reasoning
THINK_REPLY = '<think>\nAdd them.\n</think>\n\nIt is 4.<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'


def test_reasoning_content_is_split_from_the_answer(client, base_url, fake_tm, monkeypatch):
    import types

    monkeypatch.setattr(fake_tm, "server_args", types.SimpleNamespace(tool_call_parser="qwen25",
                                                                      reasoning_parser="qwen3"), raising=False)
    monkeypatch.setitem(globals(), "REPLIES", [THINK_REPLY])
    chat = client.chat.completions.create(model=MODEL, messages=MESSAGES, tools=[TIME_TOOL])
    msg = chat.choices[0].message
    assert msg.reasoning_content == "\nAdd them.\n" and msg.content == "It is 4."
    assert [c.function.name for c in msg.tool_calls] == ["get_time"] and chat.choices[0].finish_reason == "tool_calls"
    chunks = list(client.chat.completions.create(model=MODEL, messages=MESSAGES, tools=[TIME_TOOL], stream=True))
    deltas = [c.choices[0].delta for c in chunks]
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == "\nAdd them.\n"
    assert "".join(d.content or "" for d in deltas) == "It is 4."
    assert [tc.function.name for d in deltas for tc in (d.tool_calls or [])] == ["get_time"]
    # separate_reasoning false: the thinking stays inline, as the model wrote it.
    r = requests.post(f"{base_url}/v1/chat/completions",
                      json={"messages": MESSAGES, "separate_reasoning": False}).json()
    assert r["choices"][0]["message"]["content"] == THINK_REPLY
    assert r["choices"][0]["message"]["reasoning_content"] is None


def test_constrained_output_is_all_answer_without_single_token_tags(client, fake_tm, monkeypatch):
    """DeepSeek-R1's outputs start inside the reasoning; but where no single token closes it (this tokenizer
    has no `</think>` token) a constraint can only hold from the first token, so the output is all answer."""
    import types

    monkeypatch.setattr(fake_tm, "server_args", types.SimpleNamespace(reasoning_parser="deepseek-r1"), raising=False)
    monkeypatch.setattr(fake_tm, "reasoning_tags", None, raising=False)
    monkeypatch.setitem(globals(), "REPLIES", ['{"a": 1}'])
    chat = client.chat.completions.create(model=MODEL, messages=MESSAGES, response_format={"type": "json_object"})
    assert chat.choices[0].message.content == '{"a": 1}' and chat.choices[0].message.reasoning_content is None
    assert "constrain_after_reasoning" not in fake_tm.received[-1].sampling_params
    free = client.chat.completions.create(model=MODEL, messages=MESSAGES)
    assert free.choices[0].message.reasoning_content == '{"a": 1}' and free.choices[0].message.content == ""


def test_constraint_starts_after_the_thinking(client, base_url, fake_tm, monkeypatch):
    """With single-token tags, a constrained request that thinks asks for its constraint after the thinking,
    and its answer comes apart from it; with thinking off in the template, the constraint holds from the start."""
    import types

    monkeypatch.setattr(fake_tm, "server_args", types.SimpleNamespace(reasoning_parser="qwen3"), raising=False)
    monkeypatch.setattr(fake_tm, "reasoning_tags", (7, 8), raising=False)
    monkeypatch.setitem(globals(), "REPLIES", ['<think>\nA JSON object.\n</think>\n\n{"a": 1}'])
    chat = client.chat.completions.create(model=MODEL, messages=MESSAGES, response_format={"type": "json_object"})
    assert chat.choices[0].message.reasoning_content == "\nA JSON object.\n"
    assert chat.choices[0].message.content == '{"a": 1}'
    assert fake_tm.received[-1].sampling_params["constrain_after_reasoning"] is True
    chunks = list(client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True,
                                                 response_format={"type": "json_object"}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == '{"a": 1}'
    for kwargs in ({"enable_thinking": False}, {"thinking": False}):
        r = requests.post(f"{base_url}/v1/chat/completions", json={
            "messages": MESSAGES, "response_format": {"type": "json_object"}, "chat_template_kwargs": kwargs})
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["reasoning_content"] is None
        assert "constrain_after_reasoning" not in fake_tm.received[-1].sampling_params


def test_the_prompt_opening_or_closing_the_reasoning_decides_the_split(base_url, fake_tm, monkeypatch):
    """A template that ends the prompt with `<think>` (Qwen3-Thinking-2507) makes the output start inside the
    reasoning, even with the qwen3 parser; one that ends it with `</think>` (thinking off) leaves it all answer,
    even with deepseek-r1's parser, whose outputs otherwise start inside. Shown with continue_final_message,
    where the prompt ends with the last message's text."""
    import types

    def ask(parser, prefix, reply, **extra):
        monkeypatch.setattr(fake_tm, "server_args", types.SimpleNamespace(reasoning_parser=parser), raising=False)
        monkeypatch.setattr(fake_tm, "reasoning_tags", (7, 8), raising=False)
        monkeypatch.setitem(globals(), "REPLIES", [reply])
        msgs = MESSAGES + [{"role": "assistant", "content": prefix}]
        body = {"messages": msgs, "continue_final_message": True, "add_generation_prompt": False, **extra}
        r = requests.post(f"{base_url}/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["message"], fake_tm.received[-1].sampling_params

    msg, _ = ask("qwen3", "<think>\n", "Add them.\n</think>\n\nIt is 4.")
    assert (msg["reasoning_content"], msg["content"]) == ("Add them.\n", "It is 4.")
    msg, _ = ask("deepseek-r1", "<think>\n\n</think>\n\n", "It is 4.")
    assert (msg["reasoning_content"], msg["content"]) == (None, "It is 4.")
    msg, _ = ask("qwen3", "Sure.", "It is 4.")
    assert (msg["reasoning_content"], msg["content"]) == (None, "It is 4.")
    # Constrained: opened, the constraint waits for the thinking; closed, it holds at once.
    msg, sp = ask("qwen3", "<think>\n", 'Hmm.</think>{"a": 1}', response_format={"type": "json_object"})
    assert (msg["reasoning_content"], msg["content"]) == ("Hmm.", '{"a": 1}') and sp["constrain_after_reasoning"]
    msg, sp = ask("deepseek-r1", "<think></think>", '{"a": 1}', response_format={"type": "json_object"})
    assert (msg["reasoning_content"], msg["content"]) == (None, '{"a": 1}')
    assert "constrain_after_reasoning" not in sp


def test_legacy_top_logprobs_keep_the_chosen_token_when_texts_collide():
    """Byte pieces of one character all decode to U+FFFD: in the legacy dict they share a key, which holds the
    chosen token's logprob (it once held the least likely colliding token's), and no other key is lost."""
    from sglx.srt.entrypoints.openai.utils import TokenLogprob, to_completion_logprobs

    chosen = TokenLogprob(300, -0.875, "\ufffd", [(300, -0.875, "\ufffd"), (11, -1.2, "\n"), (301, -3.9, "\ufffd")])
    sampled = TokenLogprob(302, -5.0, "\ufffd", [(11, -0.5, "\n"), (300, -1.0, "\ufffd"), (301, -2.0, "\ufffd")])
    lp = to_completion_logprobs([chosen, sampled], 0)
    assert lp.top_logprobs == [{"\ufffd": -0.875, "\n": -1.2}, {"\n": -0.5, "\ufffd": -5.0}]
    assert lp.token_logprobs == [-0.875, -5.0]

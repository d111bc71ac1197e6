"""One async request function per API flavour; each times a single request (TTFT, inter-token gaps, latency).

Timing follows `sglang.bench_serving`: TTFT is the arrival of the first chunk that carries output; every later
chunk contributes its gap since the previous one to ITL, split evenly when the chunk carries several tokens.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable, Optional

import aiohttp


@dataclass
class RequestInput:
    api_url: str
    model: str
    prompt: str
    prompt_len: int
    output_len: int
    input_ids: Optional[list[int]] = None
    stream: bool = True
    ignore_eos: bool = True
    extra_body: dict[str, Any] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class RequestOutput:
    success: bool = False
    generated_text: str = ""
    prompt_len: int = 0
    # Output tokens as the server counted them (meta_info / usage); None when it did not say.
    server_output_len: Optional[int] = None
    cached_tokens: Optional[int] = None
    ttft: float = 0.0
    latency: float = 0.0
    start_time: float = 0.0  # time.perf_counter() when the request was sent
    itl: list[float] = field(default_factory=list)
    # (perf_counter timestamp, tokens in that chunk): feeds the peak-throughput buckets.
    chunks: list[tuple[float, int]] = field(default_factory=list)
    error: str = ""


class _Timer:
    """Turns chunk arrivals into TTFT / ITL / per-chunk token counts."""

    def __init__(self, out: RequestOutput) -> None:
        self.out = out
        self.last: Optional[float] = None

    def chunk(self, tokens: int) -> None:
        now = time.perf_counter()
        tokens = max(tokens, 1)
        if self.last is None:
            self.out.ttft = now - self.out.start_time
        else:
            gap = (now - self.last) / tokens
            self.out.itl.extend([gap] * tokens)
        self.out.chunks.append((now, tokens))
        self.last = now


async def sse_data(resp: aiohttp.ClientResponse) -> AsyncIterator[str]:
    """Yield the payload of each `data:` line. Buffers raw bytes itself because aiohttp's readline refuses lines
    over 64 KiB, which a cumulative `/generate` chunk of a long answer can exceed."""
    buf = b""
    async for piece in resp.content.iter_any():
        buf += piece
        while True:
            nl = buf.find(b"\n")
            if nl < 0:
                break
            line, buf = buf[:nl].strip(), buf[nl + 1:]
            if line.startswith(b"data:"):
                yield line[5:].strip().decode("utf-8")
    line = buf.strip()
    if line.startswith(b"data:"):
        yield line[5:].strip().decode("utf-8")


def _error_text(obj: Any) -> Optional[str]:
    if isinstance(obj, dict) and obj.get("error"):
        err = obj["error"]
        return str(err.get("message", err)) if isinstance(err, dict) else str(err)
    return None


def _abort_text(finish_reason: Any) -> Optional[str]:
    """A finish reason that says the server aborted the request (native: {"type": "abort", "message": ...};
    OpenAI: "abort"): the request failed, however much it had generated."""
    if isinstance(finish_reason, dict) and finish_reason.get("type") == "abort":
        return f"aborted: {finish_reason.get('message') or 'no reason given'}"
    if finish_reason == "abort":
        return "aborted by the server (finish_reason abort)"
    return None


def _native_error(obj: Any) -> str:
    meta = obj.get("meta_info") or {} if isinstance(obj, dict) else {}
    return _error_text(obj) or _abort_text(meta.get("finish_reason")) or ""


def _openai_error(obj: Any) -> str:
    choices = obj.get("choices") or [] if isinstance(obj, dict) else []
    aborted = (_abort_text(c.get("finish_reason")) for c in choices)
    return _error_text(obj) or next(filter(None, aborted), None) or ""


async def _http_error(resp: aiohttp.ClientResponse) -> str:
    body = (await resp.text()).strip().replace("\n", " ")
    return f"HTTP {resp.status}: {body[:300]}"


# ---------------------------------------------------------------- native /generate


def native_payload(req: RequestInput) -> dict[str, Any]:
    extra = dict(req.extra_body)
    sampling = {"max_new_tokens": req.output_len, "temperature": 0.0, "ignore_eos": req.ignore_eos}
    sampling.update(extra.pop("sampling_params", {}) or {})
    payload: dict[str, Any] = {"sampling_params": sampling, "stream": req.stream}
    if req.input_ids is not None:
        payload["input_ids"] = req.input_ids
    else:
        payload["text"] = req.prompt
    payload.update(extra)
    return payload


def _native_counts(obj: dict[str, Any]) -> tuple[Optional[int], Optional[int]]:
    meta = obj.get("meta_info") or {}
    done = meta.get("completion_tokens")
    if done is None and obj.get("output_ids") is not None:
        done = len(obj["output_ids"])
    return done, meta.get("cached_tokens")


async def request_native(session: aiohttp.ClientSession, req: RequestInput) -> RequestOutput:
    out = RequestOutput(prompt_len=req.prompt_len, start_time=time.perf_counter())
    async with session.post(req.api_url, json=native_payload(req), headers=req.headers) as resp:
        if resp.status != 200:
            out.error = await _http_error(resp)
            return _finish(out)
        if not req.stream:
            obj = await resp.json(content_type=None)
            if isinstance(obj, list):
                obj = obj[0]
            out.error = _native_error(obj)
            out.generated_text = obj.get("text", "")
            out.server_output_len, out.cached_tokens = _native_counts(obj)
        else:
            timer, seen_tokens, seen_text = _Timer(out), 0, ""
            async for data in sse_data(resp):
                if data == "[DONE]":
                    break
                obj = json.loads(data)
                out.error = _native_error(obj)
                if out.error:
                    break
                text = obj.get("text", "")
                done, cached = _native_counts(obj)
                new = (done - seen_tokens) if done is not None else int(text != seen_text)
                if new > 0:
                    timer.chunk(new)
                seen_tokens = done if done is not None else seen_tokens + max(new, 0)
                seen_text = text
                out.generated_text = text
                out.server_output_len, out.cached_tokens = done, cached
    return _finish(out)


def _finish(out: RequestOutput) -> RequestOutput:
    out.latency = time.perf_counter() - out.start_time
    if not out.chunks:  # non-streamed (or empty) answers: the first token is only seen at the end
        out.ttft = out.latency
    out.success = not out.error
    return out


# ---------------------------------------------------------------- OpenAI completions / chat


def openai_payload(req: RequestInput, chat: bool) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "model": req.model,
        "temperature": 0.0,
        "max_tokens": req.output_len,
        "stream": req.stream,
        "ignore_eos": req.ignore_eos,
    }
    if chat:
        payload["messages"] = [{"role": "user", "content": req.prompt}]
    else:
        payload["prompt"] = req.prompt
    if req.stream:
        payload["stream_options"] = {"include_usage": True}
    payload.update(req.extra_body)
    return payload


def _choice_text(choice: dict[str, Any], chat: bool) -> str:
    if not chat:
        return choice.get("text") or ""
    part = choice.get("delta") or choice.get("message") or {}
    return (part.get("reasoning_content") or "") + (part.get("content") or "")


async def _request_openai(session: aiohttp.ClientSession, req: RequestInput, chat: bool) -> RequestOutput:
    out = RequestOutput(prompt_len=req.prompt_len, start_time=time.perf_counter())
    async with session.post(req.api_url, json=openai_payload(req, chat), headers=req.headers) as resp:
        if resp.status != 200:
            out.error = await _http_error(resp)
            return _finish(out)
        if not req.stream:
            obj = await resp.json(content_type=None)
            out.error = _openai_error(obj)
            choices = obj.get("choices") or [{}]
            out.generated_text = _choice_text(choices[0], chat)
            out.server_output_len = (obj.get("usage") or {}).get("completion_tokens")
            return _finish(out)
        timer, parts, usage_tokens = _Timer(out), [], 0
        async for data in sse_data(resp):
            if data == "[DONE]":
                break
            obj = json.loads(data)
            out.error = _openai_error(obj)
            if out.error:
                break
            usage = obj.get("usage") or {}
            choices = obj.get("choices") or []
            text = _choice_text(choices[0], chat) if choices else ""
            if text:
                # With continuous usage stats a chunk says how many tokens it holds; otherwise one per chunk.
                count = usage.get("completion_tokens")
                timer.chunk(count - usage_tokens if count is not None else 1)
                parts.append(text)
            if usage.get("completion_tokens") is not None:
                usage_tokens = usage["completion_tokens"]
                out.server_output_len = usage_tokens
            details = usage.get("prompt_tokens_details") or {}
            if details.get("cached_tokens") is not None:
                out.cached_tokens = details["cached_tokens"]
        out.generated_text = "".join(parts)
    return _finish(out)


async def request_completions(session: aiohttp.ClientSession, req: RequestInput) -> RequestOutput:
    return await _request_openai(session, req, chat=False)


async def request_chat(session: aiohttp.ClientSession, req: RequestInput) -> RequestOutput:
    return await _request_openai(session, req, chat=True)


async def request_embeddings(session: aiohttp.ClientSession, req: RequestInput) -> RequestOutput:
    out = RequestOutput(prompt_len=req.prompt_len, start_time=time.perf_counter(), server_output_len=0)
    payload = {"model": req.model, "input": req.prompt, **req.extra_body}
    async with session.post(req.api_url, json=payload, headers=req.headers) as resp:
        if resp.status != 200:
            out.error = await _http_error(resp)
            return _finish(out)
        obj = await resp.json(content_type=None)
        out.error = _error_text(obj) or ("" if obj.get("data") else "response holds no embedding")
    return _finish(out)


# ---------------------------------------------------------------- registry

RequestFn = Callable[[aiohttp.ClientSession, RequestInput], Awaitable[RequestOutput]]


@dataclass(frozen=True)
class Backend:
    path: str
    fn: RequestFn
    chat: bool = False
    openai: bool = True
    default_port: int = 30000


_NATIVE = Backend("/generate", request_native, openai=False)
_COMPLETIONS = Backend("/v1/completions", request_completions)
_CHAT = Backend("/v1/chat/completions", request_chat, chat=True)

BACKENDS: dict[str, Backend] = {
    "sglx": _NATIVE,
    "sglang": _NATIVE,
    "sglang-native": _NATIVE,
    "sglang-oai": _COMPLETIONS,
    "vllm": Backend("/v1/completions", request_completions, default_port=8000),
    "openai": _COMPLETIONS,
    "sglang-oai-chat": _CHAT,
    "vllm-chat": Backend("/v1/chat/completions", request_chat, chat=True, default_port=8000),
    "openai-chat": _CHAT,
    "openai-embeddings": Backend("/v1/embeddings", request_embeddings),
}

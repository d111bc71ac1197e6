"""Helpers shared by the OpenAI endpoints: error bodies, SSE framing, finish reasons, usage and logprobs."""

from __future__ import annotations

import functools
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import orjson
from fastapi import Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError

from sglx.srt.entrypoints.openai.protocol import (
    ChatCompletionLogProbs,
    ChatCompletionTokenLogprob,
    CompletionLogProbs,
    ErrorResponse,
    ModelCard,
    ModelList,
    PromptTokensDetails,
    TopLogprob,
    UsageInfo,
)

_ERROR_TYPES = {400: "BadRequestError", 404: "NotFoundError", 500: "InternalServerError"}
# JSON has no -inf; vLLM and SGLang report this floor instead of an invalid document.
_LOGPROB_FLOOR = -9999.0


# ----------------------------------------------------------------------------- errors and SSE
def error_body(message: str, status: int = 400, param: Optional[str] = None) -> Dict[str, Any]:
    err_type = _ERROR_TYPES.get(status, "BadRequestError" if status < 500 else "InternalServerError")
    return ErrorResponse(message=message, type=err_type, param=param, code=status).model_dump()


def error_response(message: str, status: int = 400, param: Optional[str] = None) -> JSONResponse:
    return JSONResponse(error_body(message, status, param), status_code=status)


async def read_json(request: Request) -> Any:
    """The body, parsed strictly (orjson) on every route alike: NaN, Infinity, numbers past a double's range and
    lone surrogates are malformed JSON (ValueError), never values that reach sampling or the tokenizer."""
    body = await request.body()
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise ValueError(f"malformed JSON body: {e}") from None


def client_closed_response() -> Response:
    """For a client that went away (ClientDisconnected): 499, nginx's "client closed request"; nobody reads it."""
    return Response(status_code=499)


def validation_message(err: ValidationError) -> Tuple[str, Optional[str]]:
    """A one-line account of a pydantic error, and the first offending field (OpenAI's `param`)."""
    parts, first = [], None
    for e in err.errors():
        loc = ".".join(str(x) for x in e.get("loc", ()))
        first = first or loc or None
        parts.append(f"{loc}: {e.get('msg')}" if loc else str(e.get("msg")))
    return "Invalid request: " + "; ".join(parts), first


def sse(payload: Any) -> str:
    if isinstance(payload, BaseModel):
        data = payload.model_dump_json()
    else:
        data = json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


SSE_DONE = "data: [DONE]\n\n"


# ----------------------------------------------------------------------------- finish reasons and usage
def finish_reason_str(fr: Optional[Dict[str, Any]]) -> Optional[str]:
    """stop -> "stop", length -> "length", abort -> "abort" (as vLLM), anything else by its type."""
    if fr is None:
        return None
    return str(fr.get("type", "stop"))


def matched_stop(fr: Optional[Dict[str, Any]]) -> Optional[Any]:
    if fr is None or fr.get("type") != "stop":
        return None
    return fr.get("matched")


def aggregate_usage(metas: Sequence[Dict[str, Any]], choices_per_prompt: int) -> UsageInfo:
    """Usage over all choices. A prompt sampled n times is counted once (as OpenAI does), so its
    prompt and cached tokens come from its first choice; completion tokens sum over every choice."""
    prompt = cached = completion = 0
    for i, meta in enumerate(metas):
        completion += int(meta.get("completion_tokens", 0) or 0)
        if i % choices_per_prompt == 0:
            prompt += int(meta.get("prompt_tokens", 0) or 0)
            cached += int(meta.get("cached_tokens", 0) or 0)
    return UsageInfo(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=cached),
    )


# ----------------------------------------------------------------------------- logprobs
@dataclass
class TokenLogprob:
    """One token's logprob and its top alternatives, independent of the API shape. A prompt's first token has
    no context: its logprob is None (and it has no top list)."""

    token_id: int
    logprob: Optional[float]
    text: str
    top: List[Tuple[int, float, str]] = field(default_factory=list)


def _finite(lp: Any) -> float:
    v = float(lp) if lp is not None else _LOGPROB_FLOOR
    return v if math.isfinite(v) else _LOGPROB_FLOOR


def _unpack(entry: Sequence[Any], tokenizer: Any) -> Tuple[int, float, str]:
    lp, tid = entry[0], int(entry[1])
    text = entry[2] if len(entry) > 2 else None
    if text is None:
        text = tokenizer.decode([tid]) if tokenizer is not None else ""
    return tid, _finite(lp), text


def _token_logprobs(chosen: Sequence[Any], tops: Sequence[Any], start: int, tokenizer: Any) -> List[TokenLogprob]:
    out: List[TokenLogprob] = []
    for i in range(start, len(chosen)):
        tid, lp, text = _unpack(chosen[i], tokenizer)
        top_i = tops[i] if i < len(tops) and tops[i] else []
        # A prompt's first token has no logprob: it stays None (JSON null), not the floor.
        out.append(TokenLogprob(tid, None if chosen[i][0] is None else lp, text, [_unpack(t, tokenizer) for t in top_i]))
    return out


def logprobs_since(meta: Dict[str, Any], start: int, tokenizer: Any) -> List[TokenLogprob]:
    """The output tokens' logprobs from index `start` on (the manager's lists are cumulative)."""
    return _token_logprobs(meta.get("output_token_logprobs") or [], meta.get("output_top_logprobs") or [], start,
                           tokenizer)


def prompt_logprobs(meta: Dict[str, Any], tokenizer: Any) -> List[TokenLogprob]:
    """The prompt tokens' logprobs (the manager's input_token_logprobs, asked for with logprob_start_len)."""
    return _token_logprobs(meta.get("input_token_logprobs") or [], meta.get("input_top_logprobs") or [], 0, tokenizer)


def to_completion_logprobs(entries: Sequence[TokenLogprob], text_offset: int) -> CompletionLogProbs:
    """OpenAI's legacy shape. The top dict holds the top-k and, like OpenAI, the chosen token too (None for a
    prompt's first token, which has no logprob). Tokens whose texts are equal (byte pieces of one character
    all read U+FFFD) share a key: the chosen token's logprob wins it, else the more likely token's. text_offset
    counts characters from the start of the returned text (the prompt, when echoed)."""
    tops: List[Optional[Dict[str, float]]] = []
    offsets: List[int] = []
    offset = text_offset
    for e in entries:
        top: Optional[Dict[str, float]] = None
        if e.logprob is not None:
            top = {}
            for _, lp, text in e.top:  # most likely first
                top.setdefault(text, lp)
            top[e.text] = e.logprob
        tops.append(top)
        offsets.append(offset)
        offset += len(e.text)
    return CompletionLogProbs(
        tokens=[e.text for e in entries],
        token_logprobs=[e.logprob for e in entries],
        top_logprobs=tops,
        text_offset=offsets,
    )


def echo_completion_logprobs(prompt: Sequence[TokenLogprob], output: Sequence[TokenLogprob],
                             prompt_text_len: int) -> CompletionLogProbs:
    """echo with logprobs: the prompt's tokens (offsets from 0), then the output's (from the prompt's end)."""
    a, b = to_completion_logprobs(prompt, 0), to_completion_logprobs(output, prompt_text_len)
    return CompletionLogProbs(tokens=a.tokens + b.tokens, token_logprobs=a.token_logprobs + b.token_logprobs,
                              top_logprobs=a.top_logprobs + b.top_logprobs, text_offset=a.text_offset + b.text_offset)


@functools.lru_cache(maxsize=1)
def _byte_level_alphabet() -> Dict[str, int]:
    """Byte-level BPE's (GPT-2's) printable stand-in for each byte, inverted: character -> byte. Bytes that
    print as themselves keep their character; the other 68 take the characters from U+0100 on, in order."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {b: chr(b) for b in kept}, 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return {c: b for b, c in chars.items()}


_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def token_bytes(tokenizer: Any, token_id: int, text: str) -> List[int]:
    """The token's own UTF-8 bytes (OpenAI's `bytes`: pieces of one character joined give the character). Its
    decoded text is exact unless it is part of a character, which decodes as U+FFFD: then the bytes come from
    the vocabulary's piece, a byte-level BPE piece (GPT-2's alphabet) or a byte-fallback `<0xNN>` piece."""
    if "\ufffd" in text and tokenizer is not None:
        piece = tokenizer.convert_ids_to_tokens(int(token_id))
        if isinstance(piece, str) and piece:
            m = _BYTE_FALLBACK.fullmatch(piece)
            if m:
                return [int(m.group(1), 16)]
            alphabet = _byte_level_alphabet()
            if all(c in alphabet for c in piece):
                return [alphabet[c] for c in piece]
    return list(text.encode("utf-8"))


def to_chat_logprobs(entries: Sequence[TokenLogprob], tokenizer: Any = None) -> ChatCompletionLogProbs:
    content = [
        ChatCompletionTokenLogprob(
            token=e.text,
            logprob=e.logprob,
            bytes=token_bytes(tokenizer, e.token_id, e.text),
            top_logprobs=[TopLogprob(token=t, logprob=lp, bytes=token_bytes(tokenizer, tid, t))
                          for tid, lp, t in e.top],
        )
        for e in entries
    ]
    return ChatCompletionLogProbs(content=content)


# ----------------------------------------------------------------------------- /v1/models
def models_response(tokenizer_manager: Any) -> Dict[str, Any]:
    """Body of GET /v1/models: the one served model."""
    card = ModelCard(
        id=tokenizer_manager.served_model_name,
        root=tokenizer_manager.model_path,
        max_model_len=tokenizer_manager.context_len,
    )
    return ModelList(data=[card]).model_dump()

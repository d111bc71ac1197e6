"""The request flow shared by /v1/completions and /v1/chat/completions.

handle_request: parse JSON -> validate (pydantic) -> check the model name -> build one GenerateReqInput
(n choices of P prompts become one batch of P*n requests, prompt-major) -> hand it to the TokenizerManager
-> answer with one JSON body or an SSE stream. Subclasses supply the endpoint-specific pieces: how the
prompt is made, and the shape of responses and chunks.

Errors: bad JSON or bad fields -> 400; an unknown model -> 404; a ValueError from building the request or
from the manager (prompt past the context, invalid sampling values) -> 400 with its message. The first
output is awaited before the response starts, so such errors still get a real status code on streams;
anything that fails later in a stream is sent as `data: {"error": {...}}` followed by `data: [DONE]`.
A choice the engine aborted is answered like vLLM does: status 200 with finish_reason "abort".
When a stream ends early (client gone, error), the choices still running are aborted by rid.
"""

from __future__ import annotations

import inspect
import json
import logging
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Dict, List, Optional, Sequence, Tuple, Type, Union

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError

from sglx.srt.entrypoints.openai.protocol import UsageInfo, _SamplingRequest
from sglx.srt.entrypoints.openai.utils import (
    SSE_DONE,
    TokenLogprob,
    aggregate_usage,
    client_closed_response,
    error_body,
    error_response,
    logprobs_since,
    read_json,
    sse,
    validation_message,
)
from sglx.srt.managers.io_struct import EMBEDDING_ONLY, GenerateReqInput, new_rid
from sglx.srt.managers.tokenizer_manager import ClientDisconnected, off_loop_if_long

logger = logging.getLogger(__name__)

Prompt = Union[str, List[int]]

# Request fields passed to the scheduler unchanged (same name on both sides).
def constraint_params(req: _SamplingRequest) -> Dict[str, str]:
    """The sampling param that constrains the output: OpenAI's response_format (json_object: any JSON object,
    as SGLang does; json_schema: its schema) or SGLang's own json_schema / regex / ebnf. At most one."""
    given: Dict[str, str] = {}
    names = []
    fmt = req.response_format
    if fmt is not None and fmt.type != "text":
        names.append("response_format")
        if fmt.type == "json_object":
            given["json_schema"] = '{"type": "object"}'
        elif fmt.json_schema is None or fmt.json_schema.schema_ is None:
            raise ValueError("response_format of type json_schema needs json_schema.schema")
        else:
            given["json_schema"] = json.dumps(fmt.json_schema.schema_)
    for field in ("json_schema", "regex", "ebnf"):
        if getattr(req, field) is not None:
            names.append(field)
            given[field] = getattr(req, field)
    if len(names) > 1:
        raise ValueError(f"only one of response_format, json_schema, regex and ebnf may be given, got {names}")
    return given


_PASSTHROUGH_SAMPLING = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "frequency_penalty",
    "presence_penalty",
    "repetition_penalty",
    "stop",
    "stop_token_ids",
    "ignore_eos",
    "skip_special_tokens",
    "spaces_between_special_tokens",
    "no_stop_trim",
    "logit_bias",
)


@dataclass
class GenPlan:
    """What was sent to the manager for one HTTP request, and what the response needs to know."""

    obj: GenerateReqInput
    rids: List[str]
    response_id: str
    model: str
    created: int
    choices_per_prompt: int
    want_logprobs: bool
    prompts: List[Prompt] = field(default_factory=list)
    tools: Any = None  # chat: a function_call.tool_plan.ToolPlan when outputs are read for tool calls
    reasoning: Any = None  # chat: the reasoning_parser.ReasoningFormat when thinking is returned apart

    @property
    def num_choices(self) -> int:
        return len(self.rids)


@dataclass
class ChoiceState:
    """Progress of one choice in a stream: how much of the cumulative text/logprobs was already sent."""

    text_len: int = 0
    num_logprobs: int = 0
    text_offset: int = 0
    started: bool = False
    finished: bool = False
    meta: Dict[str, Any] = field(default_factory=dict)
    tool_stream: Any = None  # chat with tools: the choice's ToolCallStream
    reasoning_stream: Any = None  # chat with --reasoning-parser: the choice's ReasoningStream
    tool_calls_sent: int = 0


class OpenAIServingBase(ABC):
    request_cls: Type[_SamplingRequest]
    id_prefix: str

    def __init__(self, tokenizer_manager: Any) -> None:
        self.tokenizer_manager = tokenizer_manager

    # ------------------------------------------------------------------ endpoint hooks
    @abstractmethod
    def build_plan(self, req: Any) -> GenPlan:
        """Turn a validated request into a GenPlan; raise ValueError for input we cannot serve."""

    @abstractmethod
    def build_response(self, req: Any, plan: GenPlan, outputs: List[Dict[str, Any]]) -> BaseModel:
        """The non-streaming body, from one final output per choice (in choice order)."""

    @abstractmethod
    def build_chunk(
        self,
        req: Any,
        plan: GenPlan,
        index: int,
        state: ChoiceState,
        delta: str,
        logprobs: List[TokenLogprob],
        finish_reason: Optional[Dict[str, Any]],
    ) -> Optional[BaseModel]:
        """One stream chunk for choice `index` carrying the text and logprobs new since the last one (None:
        nothing to send yet)."""

    @abstractmethod
    def build_usage_chunk(self, plan: GenPlan, usage: UsageInfo) -> BaseModel:
        """The chunk with empty choices and the usage, for stream_options.include_usage."""

    def stream_prologue(self, req: Any, plan: GenPlan) -> List[BaseModel]:
        """Chunks sent before any generated text (chat: the assistant role)."""
        return []

    # ------------------------------------------------------------------ entry point
    async def handle_request(self, raw_request: Request) -> Response:
        if getattr(self.tokenizer_manager, "is_embedding", False):  # before the chat template or sampling checks
            return error_response(EMBEDDING_ONLY, 400)
        req_or_err = await self._parse(raw_request)
        if isinstance(req_or_err, Response):
            return req_or_err
        req = req_or_err
        try:
            # (A chat template tokenizes; a huge body does so off the event loop.)
            body_len = raw_request.headers.get("content-length", "0")
            plan = await off_loop_if_long(int(body_len) if body_len.isdigit() else 0, self.build_plan, req)
            gen, first = await self._start(plan, raw_request)
        except ClientDisconnected:
            return client_closed_response()
        except ValueError as e:
            return error_response(str(e), 400)
        except Exception as e:  # noqa: BLE001 - an unexpected failure still gets an OpenAI-style body
            logger.exception("OpenAI request failed before generation")
            return error_response(f"Internal server error: {e}", 500)
        if req.stream:
            return StreamingResponse(self._stream(req, plan, gen, first), media_type="text/event-stream")
        try:
            outputs = await self._collect(plan, gen, first)
            return JSONResponse(self.build_response(req, plan, outputs).model_dump(mode="json"))
        except ClientDisconnected:
            return client_closed_response()
        except ValueError as e:
            return error_response(str(e), 400)
        except Exception as e:  # noqa: BLE001
            logger.exception("OpenAI request failed")
            return error_response(f"Internal server error: {e}", 500)

    async def _parse(self, raw_request: Request) -> Union[_SamplingRequest, Response]:
        try:
            body = await read_json(raw_request)
        except ValueError as e:
            return error_response(str(e), 400)
        if not isinstance(body, dict):
            return error_response("The request body must be a JSON object.", 400)
        try:
            req = self.request_cls.model_validate(body)
        except ValidationError as e:
            msg, param = validation_message(e)
            return error_response(msg, 400, param)
        not_found = self._check_model(req.model)
        return not_found if not_found is not None else req

    def _check_model(self, model: Optional[str]) -> Optional[Response]:
        tm = self.tokenizer_manager
        if model is None or model in (tm.served_model_name, tm.model_path):
            return None
        return error_response(f"The model `{model}` does not exist.", 404)

    # ------------------------------------------------------------------ building the manager request
    def sampling_params(self, req: _SamplingRequest, max_new_tokens: Optional[int]) -> Dict[str, Any]:
        params = {k: getattr(req, k) for k in _PASSTHROUGH_SAMPLING if getattr(req, k) is not None}
        if req.min_tokens is not None:
            params["min_new_tokens"] = req.min_tokens
        # Always explicit: None means "up to the context", while a missing key would mean the
        # scheduler's own default.
        params["max_new_tokens"] = max_new_tokens
        params.update(constraint_params(req))
        return params

    def make_plan(
        self,
        req: _SamplingRequest,
        prompts: Sequence[Prompt],
        sampling: Dict[str, Any],
        return_logprob: bool,
        top_logprobs_num: int,
        logprob_start_len: int = -1,
    ) -> GenPlan:
        n = req.num_choices
        base = new_rid()
        expanded = [p for p in prompts for _ in range(n)]
        params = []
        for i in range(len(expanded)):
            sp = dict(sampling)
            if req.seed is not None:
                # Distinct seeds make the n choices differ while staying reproducible.
                sp["sampling_seed"] = req.seed + i % n
            params.append(sp)
        single = len(expanded) == 1
        rids = [base] if single else [f"{base}-{i}" for i in range(len(expanded))]
        as_text = isinstance(expanded[0], str)
        payload: Any = expanded[0] if single else list(expanded)
        obj = GenerateReqInput(
            text=payload if as_text else None,
            input_ids=None if as_text else payload,
            sampling_params=params[0] if single else params,
            rid=rids[0] if single else rids,
            return_logprob=return_logprob,
            top_logprobs_num=top_logprobs_num,
            logprob_start_len=logprob_start_len,
            return_text_in_logprobs=True,
            stream=bool(req.stream),
        )
        return GenPlan(
            obj=obj,
            rids=rids,
            response_id=f"{self.id_prefix}{base}",
            model=req.model or self.tokenizer_manager.served_model_name,
            created=int(time.time()),
            choices_per_prompt=n,
            want_logprobs=return_logprob,
            prompts=list(prompts),
        )

    # ------------------------------------------------------------------ talking to the manager
    async def _start(self, plan: GenPlan, raw_request: Request) -> Tuple[AsyncIterator[Any], Any]:
        """Start generation and wait for the first output, so input errors surface before any byte is sent."""
        # The response id reaches every choice through /abort_request.
        it = self.tokenizer_manager.generate_request(plan.obj, raw_request, group=plan.response_id)
        if inspect.isawaitable(it):
            it = await it
        try:
            first = await it.__anext__()
        except StopAsyncIteration:
            first = None
        return it, first

    async def _collect(self, plan: GenPlan, gen: AsyncIterator[Any], first: Any) -> List[Dict[str, Any]]:
        last = first
        async for item in gen:
            last = item
        if last is None:
            raise RuntimeError("the generation produced no output")
        outputs = last if isinstance(last, list) else [last]
        if len(outputs) != plan.num_choices:
            raise RuntimeError(f"expected {plan.num_choices} outputs, got {len(outputs)}")
        return outputs

    def usage(self, plan: GenPlan, metas: Sequence[Dict[str, Any]]) -> UsageInfo:
        return aggregate_usage(metas, plan.choices_per_prompt)

    # ------------------------------------------------------------------ streaming
    async def _stream(self, req: Any, plan: GenPlan, gen: AsyncIterator[Any], first: Any) -> AsyncIterator[str]:
        states = [ChoiceState() for _ in range(plan.num_choices)]
        try:
            for chunk in self.stream_prologue(req, plan):
                yield sse(chunk)
            item = first
            while item is not None:
                for out in item if isinstance(item, list) else [item]:
                    chunk = self._on_output(req, plan, states, out)
                    if chunk is not None:
                        if req.continuous_usage:  # the usage so far, over every choice
                            chunk.usage = self.usage(plan, [s.meta for s in states])
                        yield sse(chunk)
                item = await anext(gen, None)
            if req.include_usage:
                yield sse(self.build_usage_chunk(plan, self.usage(plan, [s.meta for s in states])))
        except ClientDisconnected:
            return  # nobody is reading; `finally` frees what still runs
        except ValueError as e:
            yield sse({"error": error_body(str(e), 400)})
        except Exception as e:  # noqa: BLE001 - the status line is gone; report in-band
            logger.exception("OpenAI stream failed")
            yield sse({"error": error_body(f"Internal server error: {e}", 500)})
        finally:
            # Runs on client disconnect too (the generator is closed): free what is still running.
            self._abort_unfinished(plan, states)
        yield SSE_DONE

    def _on_output(
        self, req: Any, plan: GenPlan, states: List[ChoiceState], out: Dict[str, Any]
    ) -> Optional[BaseModel]:
        index = int(out.get("index", 0))
        state = states[index]
        if state.finished:
            return None
        meta = out.get("meta_info", {})
        state.meta = meta
        text = out.get("text", "")
        # The manager's text is cumulative; what is new is what lies past the part already sent.
        delta = text[state.text_len :]
        state.text_len = max(state.text_len, len(text))
        logprobs: List[TokenLogprob] = []
        if plan.want_logprobs:
            logprobs = logprobs_since(meta, state.num_logprobs, self.tokenizer_manager.tokenizer)
            state.num_logprobs += len(logprobs)
        finish_reason = meta.get("finish_reason")
        state.finished = finish_reason is not None
        if not delta and not logprobs and not state.finished:
            return None
        chunk = self.build_chunk(req, plan, index, state, delta, logprobs, finish_reason)
        state.started = True
        return chunk

    def _abort_unfinished(self, plan: GenPlan, states: List[ChoiceState]) -> None:
        for rid, state in zip(plan.rids, states):
            if not state.finished:
                try:
                    self.tokenizer_manager.abort_request(rid)
                except Exception:  # noqa: BLE001 - best effort; the manager also aborts on disconnect
                    logger.warning("abort of %s failed", rid, exc_info=True)

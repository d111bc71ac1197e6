"""POST /v1/chat/completions.

The prompt is the tokenizer's chat template applied to the messages (generation prompt added, or the last
assistant message continued with `continue_final_message`), sent to the manager as token ids. Message
content may be a string or a list of parts; text parts are joined with newlines, other part types
(images, audio) are refused with a 400. The `developer` role is passed to the template as `system`.

Without max_tokens/max_completion_tokens the choice may run to the end of the context
(context_len - prompt_len new tokens). `response_format` (json_object, json_schema) and SGLang's `regex` /
`ebnf` / `json_schema` constrain the output (OpenAIServingBase.sampling_params).
`tools` are passed to the chat template (unless tool_choice is "none") and `tool_choice` decides how outputs
become `tool_calls` (function_call/tool_plan.py): parsed with `--tool-call-parser` (auto), or constrained to
a list of calls (required) or to one function's arguments (named). A choice with calls that stopped normally
ends with finish_reason "tool_calls". Streamed, plain text goes out as it comes and each call in one delta
once complete. With `--reasoning-parser` (and `separate_reasoning`, SGLang's field, true by default) the
model's thinking comes apart as `reasoning_content`, and only the answer after it is read for tool calls.
"""

from __future__ import annotations

import json
import uuid
from typing import Any, Dict, List, Optional, Tuple

from sglx.srt.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionResponseChoice,
    ChatCompletionStreamChoice,
    ChatCompletionStreamResponse,
    ChatMessage,
    ChatResponseMessage,
    DeltaMessage,
    DeltaToolCall,
    FunctionCall,
    ToolCall,
    UsageInfo,
)
from sglx.srt.entrypoints.openai.serving_base import ChoiceState, GenPlan, OpenAIServingBase
from sglx.srt.entrypoints.openai.utils import (
    TokenLogprob,
    finish_reason_str,
    logprobs_since,
    matched_stop,
    to_chat_logprobs,
)
from sglx.srt.function_call.base_format_detector import ParseResult, ToolCallItem
from sglx.srt.function_call.tool_plan import ToolPlan
from sglx.srt.reasoning_parser import (
    REASONING_PARSERS,
    ReasoningStream,
    for_prompt,
    prompt_reasoning_state,
    split_reasoning,
)

# Keys of apply_chat_template that this layer decides; chat_template_kwargs may not override them.
_RESERVED_TEMPLATE_KWARGS = {"conversation", "tokenize", "add_generation_prompt", "continue_final_message",
                             "return_dict", "return_tensors", "tools"}


def content_text(content: Optional[Any]) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts = []
    for part in content:
        if part.type != "text":
            raise ValueError(f"Content part type `{part.type}` is not supported; only `text` parts are.")
        texts.append(part.text or "")
    return "\n".join(texts)


def message_to_template_dict(msg: ChatMessage) -> Dict[str, Any]:
    d: Dict[str, Any] = {"role": "system" if msg.role == "developer" else msg.role,
                         "content": content_text(msg.content)}
    for key in ("name", "tool_call_id", "tool_calls"):
        value = getattr(msg, key)
        if value is not None:
            d[key] = value
    if msg.tool_calls:
        d["tool_calls"] = [_arguments_as_dict(c) for c in msg.tool_calls]
    return d


def _arguments_as_dict(call: Dict[str, Any]) -> Dict[str, Any]:
    """OpenAI sends a call's arguments as JSON text; chat templates (Llama 3.1, Qwen2.5, ...) expect a mapping."""
    fn = call.get("function")
    if isinstance(fn, dict) and isinstance(fn.get("arguments"), str):
        try:
            args = json.loads(fn["arguments"])
        except ValueError:
            return call
        if isinstance(args, dict):
            return {**call, "function": {**fn, "arguments": args}}
    return call


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def tool_calls_of(calls: List[ToolCallItem]) -> List[ToolCall]:
    return [ToolCall(id=new_call_id(), function=FunctionCall(name=c.name, arguments=c.arguments)) for c in calls]


def chat_finish_reason(finish_reason: Optional[Dict[str, Any]], has_calls: bool) -> Optional[str]:
    reason = finish_reason_str(finish_reason)
    return "tool_calls" if reason == "stop" and has_calls else reason


def flat_token_ids(encoded: Any) -> List[int]:
    """apply_chat_template's result as List[int]: transformers 5 returns a BatchEncoding by default."""
    if hasattr(encoded, "keys") and "input_ids" in encoded:
        encoded = encoded["input_ids"]
    if hasattr(encoded, "tolist"):
        encoded = encoded.tolist()
    encoded = list(encoded)
    if encoded and isinstance(encoded[0], (list, tuple)):
        if len(encoded) != 1:
            raise ValueError("the chat template produced more than one sequence")
        encoded = list(encoded[0])
    return [int(t) for t in encoded]


class OpenAIServingChat(OpenAIServingBase):
    request_cls = ChatCompletionRequest
    id_prefix = "chatcmpl-"

    def build_plan(self, req: ChatCompletionRequest) -> GenPlan:
        if req.top_logprobs and not req.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true.")
        server_args = getattr(self.tokenizer_manager, "server_args", None)
        tools = ToolPlan.from_request(req.tools, req.tool_choice, req.parallel_tool_calls,
                                      getattr(server_args, "tool_call_parser", None))
        input_ids = self.apply_template(req)
        max_new = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        if max_new is None:
            context_len = self.tokenizer_manager.context_len
            if len(input_ids) >= context_len:
                raise ValueError(
                    f"The prompt is {len(input_ids)} tokens long, which leaves no room to generate "
                    f"in the model's context of {context_len} tokens."
                )
            max_new = context_len - len(input_ids)
        sampling = self.sampling_params(req, max_new)
        if tools is not None and tools.constraint is not None:
            if any(k in sampling for k in ("json_schema", "regex", "ebnf")):
                raise ValueError("tool_choice `required` or a named function already constrains the output: "
                                 "it cannot be combined with response_format, json_schema, regex or ebnf")
            sampling["json_schema"] = tools.constraint
        reasoning = self.reasoning_format(req, sampling, input_ids)
        plan = self.make_plan(
            req,
            [input_ids],
            sampling,
            return_logprob=bool(req.logprobs),
            top_logprobs_num=(req.top_logprobs or 0) if req.logprobs else 0,
        )
        plan.tools = tools
        plan.reasoning = reasoning if req.separate_reasoning is not False else None
        return plan

    def reasoning_format(self, req: ChatCompletionRequest, sampling: Dict[str, Any],
                         input_ids: List[int]) -> Optional[Any]:
        """With --reasoning-parser, the format whose thinking the output may start with, else None. The
        prompt's end decides first (reasoning_parser.prompt_reasoning_state): a template that opened the
        reasoning makes the output start inside it, one that closed it leaves nothing to split. A constrained
        output can think first only when the request thinks (not closed by the prompt, the template's
        `enable_thinking` / `thinking` not false) and the tags of its thinking are single tokens: its
        constraint then starts after the thinking (`constrain_after_reasoning`; constrained/reasoner_grammar.py,
        where the scheduler reads the same prompt end from its ids). Otherwise the constraint holds from the
        first token, and the output is all answer."""
        parser = getattr(getattr(self.tokenizer_manager, "server_args", None), "reasoning_parser", None)
        if parser is None:
            return None
        fmt = REASONING_PARSERS[parser]
        tail = self.tokenizer_manager.tokenizer.decode(input_ids[-16:])  # covers a tag of several tokens
        fmt = for_prompt(fmt, prompt_reasoning_state(tail, fmt))
        if fmt is None or not any(k in sampling for k in ("json_schema", "regex", "ebnf")):
            return fmt
        kwargs = req.chat_template_kwargs or {}
        thinks = kwargs.get("enable_thinking") is not False and kwargs.get("thinking") is not False
        if not thinks or getattr(self.tokenizer_manager, "reasoning_tags", None) is None:
            return None
        sampling["constrain_after_reasoning"] = True
        return fmt

    def apply_template(self, req: ChatCompletionRequest) -> List[int]:
        tokenizer = self.tokenizer_manager.tokenizer
        if tokenizer is None:
            raise ValueError("Chat completions need a tokenizer; this server runs without one.")
        messages = [message_to_template_dict(m) for m in req.messages]
        kwargs = {k: v for k, v in (req.chat_template_kwargs or {}).items() if k not in _RESERVED_TEMPLATE_KWARGS}
        if req.continue_final_message:
            if messages[-1]["role"] != "assistant":
                raise ValueError("continue_final_message needs the last message to be from the assistant.")
            if req.add_generation_prompt and "add_generation_prompt" in req.model_fields_set:
                raise ValueError("continue_final_message continues the last message: it cannot be combined "
                                 "with add_generation_prompt true, which starts a new one.")
            kwargs["continue_final_message"] = True
            add_generation_prompt = False
        else:
            add_generation_prompt = req.add_generation_prompt is not False
        if req.tools and req.tool_choice != "none":
            kwargs["tools"] = [t.model_dump(exclude_none=True) for t in req.tools]
        try:
            encoded = tokenizer.apply_chat_template(
                messages, add_generation_prompt=add_generation_prompt, tokenize=True, **kwargs
            )
        except Exception as e:  # noqa: BLE001 - template errors (jinja, role order) are the client's input
            raise ValueError(f"Could not apply the chat template: {e}") from e
        return flat_token_ids(encoded)

    # ------------------------------------------------------------------ non-streaming
    def build_response(
        self, req: ChatCompletionRequest, plan: GenPlan, outputs: List[Dict[str, Any]]
    ) -> ChatCompletionResponse:
        choices = []
        for i, out in enumerate(outputs):
            meta = out.get("meta_info", {})
            logprobs = None
            if plan.want_logprobs:
                tok = self.tokenizer_manager.tokenizer
                logprobs = to_chat_logprobs(logprobs_since(meta, 0, tok), tok)
            fr = meta.get("finish_reason")
            reasoning, content, calls = None, out.get("text", ""), []
            if plan.reasoning is not None:
                reasoning, content = split_reasoning(content, plan.reasoning)
            if plan.tools is not None:
                parsed = plan.tools.detector.parse(content, plan.tools.tool_names)
                content, calls = parsed.normal_text, parsed.calls
            choices.append(
                ChatCompletionResponseChoice(
                    index=i,
                    message=ChatResponseMessage(content=content if content or not calls else None,
                                                reasoning_content=reasoning or None,
                                                tool_calls=tool_calls_of(calls) or None),
                    logprobs=logprobs,
                    finish_reason=chat_finish_reason(fr, bool(calls)),
                    matched_stop=matched_stop(fr),
                )
            )
        return ChatCompletionResponse(
            id=plan.response_id,
            created=plan.created,
            model=plan.model,
            choices=choices,
            usage=self.usage(plan, [o.get("meta_info", {}) for o in outputs]),
        )

    # ------------------------------------------------------------------ streaming
    def _chunk(self, plan: GenPlan, choice: ChatCompletionStreamChoice) -> ChatCompletionStreamResponse:
        return ChatCompletionStreamResponse(
            id=plan.response_id, created=plan.created, model=plan.model, choices=[choice]
        )

    def stream_prologue(self, req: ChatCompletionRequest, plan: GenPlan) -> List[ChatCompletionStreamResponse]:
        return [
            self._chunk(plan, ChatCompletionStreamChoice(index=i, delta=DeltaMessage(role="assistant", content="")))
            for i in range(plan.num_choices)
        ]

    def build_chunk(
        self,
        req: ChatCompletionRequest,
        plan: GenPlan,
        index: int,
        state: ChoiceState,
        delta: str,
        logprobs: List[TokenLogprob],
        finish_reason: Optional[Dict[str, Any]],
    ) -> Optional[ChatCompletionStreamResponse]:
        last = finish_reason is not None
        reasoning, delta = self._reasoning_delta(plan, state, delta, last)
        content, calls = self._tool_delta(plan, state, delta, last)
        if not reasoning and not content and not calls and not logprobs and not last:
            return None  # (text held back while it may start a tag or a tool call)
        deltas = [DeltaToolCall(index=state.tool_calls_sent + j, **c.model_dump()) for j, c in enumerate(calls)]
        state.tool_calls_sent += len(calls)
        choice = ChatCompletionStreamChoice(
            index=index,
            delta=DeltaMessage(content=content or None, reasoning_content=reasoning or None,
                               tool_calls=deltas or None),
            logprobs=to_chat_logprobs(logprobs, self.tokenizer_manager.tokenizer) if plan.want_logprobs else None,
            finish_reason=chat_finish_reason(finish_reason, state.tool_calls_sent > 0),
            matched_stop=matched_stop(finish_reason),
        )
        return self._chunk(plan, choice)

    @staticmethod
    def _reasoning_delta(plan: GenPlan, state: ChoiceState, delta: str, last: bool) -> Tuple[str, str]:
        """This chunk's text as (reasoning, answer)."""
        if plan.reasoning is None:
            return "", delta
        if state.reasoning_stream is None:
            state.reasoning_stream = ReasoningStream(plan.reasoning)
        reasoning, answer = state.reasoning_stream.feed(delta)
        if last:
            more_reasoning, more_answer = state.reasoning_stream.flush()
            reasoning, answer = reasoning + more_reasoning, answer + more_answer
        return reasoning, answer

    @staticmethod
    def _tool_delta(plan: GenPlan, state: ChoiceState, delta: str, last: bool) -> Tuple[str, List[ToolCall]]:
        """The text of this chunk and the tool calls completed in it."""
        if plan.tools is None:
            return delta, []
        if state.tool_stream is None:
            state.tool_stream = plan.tools.stream()
        parsed: ParseResult = state.tool_stream.feed(delta)
        if last:
            parsed.extend(state.tool_stream.flush())
        return parsed.normal_text, tool_calls_of(parsed.calls)

    def build_usage_chunk(self, plan: GenPlan, usage: UsageInfo) -> ChatCompletionStreamResponse:
        return ChatCompletionStreamResponse(
            id=plan.response_id, created=plan.created, model=plan.model, choices=[], usage=usage
        )

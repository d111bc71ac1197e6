"""Pydantic (v2) models of the OpenAI-compatible API: requests as clients send them, responses as we send them.

Requests accept OpenAI's fields plus the SGLang/vLLM sampling extras (top_k, min_p, repetition_penalty,
min_tokens, ignore_eos, stop_token_ids, ...). Unknown fields are ignored, as OpenAI-compatible servers do,
so clients written for newer API versions keep working.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Dict, List, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, Strict, model_serializer, model_validator

from sglx.srt.sampling.sampling_params import MAX_PARALLEL_SAMPLES

# Request numbers and flags are strict, as JSON types are: "5", 5.5 or true is no max_tokens (an int is
# still a valid float).
SInt = Annotated[int, Strict()]
SFloat = Annotated[float, Strict()]
SBool = Annotated[bool, Strict()]

# OpenAI caps top logprobs at 20 for chat; we use the same bound for completions.
MAX_TOP_LOGPROBS = 20


# ----------------------------------------------------------------------------- shared pieces
class StreamOptions(BaseModel):
    include_usage: Optional[SBool] = False
    # vLLM's and SGLang's extension: with include_usage, every chunk carries the usage so far.
    continuous_usage_stats: Optional[SBool] = False


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: Optional[PromptTokensDetails] = None


class ErrorResponse(BaseModel):
    """vLLM/SGLang's error body; the openai SDK reads `message` from it."""

    object: str = "error"
    message: str
    type: str
    param: Optional[str] = None
    code: int


class JsonSchemaFormat(BaseModel):
    """OpenAI's response_format.json_schema: the schema itself is under `schema`."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    name: Optional[str] = None
    description: Optional[str] = None
    schema_: Optional[Dict[str, Any]] = Field(default=None, alias="schema")
    strict: Optional[SBool] = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JsonSchemaFormat] = None


class _SamplingRequest(BaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model_config = ConfigDict(extra="ignore")

    model: Optional[str] = None
    frequency_penalty: Optional[SFloat] = None
    presence_penalty: Optional[SFloat] = None
    logit_bias: Optional[Dict[str, SFloat]] = None
    n: Optional[SInt] = Field(default=1, ge=1, le=MAX_PARALLEL_SAMPLES)
    seed: Optional[SInt] = None
    stop: Optional[Union[str, List[str]]] = None
    stream: Optional[SBool] = False
    stream_options: Optional[StreamOptions] = None
    temperature: Optional[SFloat] = None
    top_p: Optional[SFloat] = None
    user: Optional[str] = None
    # SGLang / vLLM extras
    top_k: Optional[SInt] = None
    min_p: Optional[SFloat] = None
    repetition_penalty: Optional[SFloat] = None
    min_tokens: Optional[SInt] = Field(default=None, ge=0)
    ignore_eos: Optional[SBool] = None
    stop_token_ids: Optional[List[SInt]] = None
    skip_special_tokens: Optional[SBool] = None
    spaces_between_special_tokens: Optional[SBool] = None
    no_stop_trim: Optional[SBool] = None
    # Structured output: OpenAI's response_format, or SGLang's json_schema / regex / ebnf (at most one).
    response_format: Optional[ResponseFormat] = None
    json_schema: Optional[str] = None
    regex: Optional[str] = None
    ebnf: Optional[str] = None

    @model_validator(mode="after")
    def _stream_options_need_a_stream(self) -> "_SamplingRequest":
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    @property
    def num_choices(self) -> int:
        return self.n or 1

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        return self.include_usage and bool(self.stream_options.continuous_usage_stats)


# ----------------------------------------------------------------------------- /v1/completions
class CompletionRequest(_SamplingRequest):
    # Smart-mode union: an exact match wins, so [1, 2] is token ids and ["a"] is a list of prompts.
    prompt: Union[str, List[str], List[SInt], List[List[SInt]]]
    max_tokens: Optional[SInt] = Field(default=16, ge=0)
    echo: Optional[SBool] = False
    logprobs: Optional[SInt] = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    best_of: Optional[SInt] = Field(default=None, ge=1)
    suffix: Optional[str] = None


class CompletionLogProbs(BaseModel):
    tokens: List[str] = Field(default_factory=list)
    token_logprobs: List[Optional[float]] = Field(default_factory=list)
    top_logprobs: List[Optional[Dict[str, float]]] = Field(default_factory=list)
    text_offset: List[int] = Field(default_factory=list)


class CompletionResponseChoice(BaseModel):
    index: int
    text: str
    logprobs: Optional[CompletionLogProbs] = None
    finish_reason: Optional[str] = None
    # SGLang extra: the stop string or token id that ended the choice.
    matched_stop: Optional[Union[int, str]] = None


class CompletionResponse(BaseModel):
    id: str
    object: str = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: List[CompletionResponseChoice]
    usage: UsageInfo


class CompletionStreamChoice(BaseModel):
    index: int
    text: str
    logprobs: Optional[CompletionLogProbs] = None
    finish_reason: Optional[str] = None
    matched_stop: Optional[Union[int, str]] = None


class CompletionStreamResponse(BaseModel):
    id: str
    object: str = "text_completion"
    created: int
    model: str
    choices: List[CompletionStreamChoice]
    usage: Optional[UsageInfo] = None


# ----------------------------------------------------------------------------- /v1/chat/completions
class ChatContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: str
    text: Optional[str] = None


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str = Field(min_length=1)
    description: Optional[str] = None
    parameters: Optional[Dict[str, Any]] = None
    strict: Optional[SBool] = None


class Tool(BaseModel):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class ToolChoiceFunction(BaseModel):
    name: str


class ToolChoice(BaseModel):
    """tool_choice naming one function: {"type": "function", "function": {"name": ...}}."""

    type: Literal["function"] = "function"
    function: ToolChoiceFunction


class ChatMessage(BaseModel):
    """A message of the conversation. Tool-call fields are passed to the chat template."""

    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Optional[Union[str, List[ChatContentPart]]] = None
    name: Optional[str] = None
    tool_call_id: Optional[str] = None
    tool_calls: Optional[List[Dict[str, Any]]] = None


class ChatCompletionRequest(_SamplingRequest):
    messages: List[ChatMessage] = Field(min_length=1)
    max_tokens: Optional[SInt] = Field(default=None, ge=0)
    max_completion_tokens: Optional[SInt] = Field(default=None, ge=0)
    logprobs: Optional[SBool] = False
    top_logprobs: Optional[SInt] = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    # Tool calling (function_call/tool_plan.py says what each tool_choice does).
    tools: Optional[List[Tool]] = None
    tool_choice: Optional[Union[Literal["none", "auto", "required"], ToolChoice]] = None
    parallel_tool_calls: Optional[SBool] = None
    # vLLM / SGLang template controls
    # SGLang: with --reasoning-parser, return the thinking apart as reasoning_content (false: keep it inline).
    separate_reasoning: Optional[SBool] = True
    add_generation_prompt: Optional[SBool] = True
    continue_final_message: Optional[SBool] = False
    chat_template_kwargs: Optional[Dict[str, Any]] = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: Optional[List[int]] = None


class ChatCompletionTokenLogprob(TopLogprob):
    top_logprobs: List[TopLogprob] = Field(default_factory=list)


class ChatCompletionLogProbs(BaseModel):
    content: Optional[List[ChatCompletionTokenLogprob]] = None


class FunctionCall(BaseModel):
    name: Optional[str] = None
    arguments: Optional[str] = None


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class DeltaToolCall(ToolCall):
    index: int


class ChatResponseMessage(BaseModel):
    role: str = "assistant"
    content: Optional[str] = None
    reasoning_content: Optional[str] = None
    tool_calls: Optional[List[ToolCall]] = None


class ChatCompletionResponseChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: Optional[ChatCompletionLogProbs] = None
    finish_reason: Optional[str] = None
    matched_stop: Optional[Union[int, str]] = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: str = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: List[ChatCompletionResponseChoice]
    usage: UsageInfo


class DeltaMessage(BaseModel):
    role: Optional[str] = None
    content: Optional[str] = None
    reasoning_content: Optional[str] = None
    tool_calls: Optional[List[DeltaToolCall]] = None

    @model_serializer(mode="wrap")
    def _drop_none(self, handler: Any) -> Dict[str, Any]:
        # OpenAI sends {"content": "x"}, not {"role": null, "content": "x"}.
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatCompletionStreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: Optional[ChatCompletionLogProbs] = None
    finish_reason: Optional[str] = None
    matched_stop: Optional[Union[int, str]] = None


class ChatCompletionStreamResponse(BaseModel):
    id: str
    object: str = "chat.completion.chunk"
    created: int
    model: str
    choices: List[ChatCompletionStreamChoice]
    usage: Optional[UsageInfo] = None


# ----------------------------------------------------------------------------- /v1/models
class ModelCard(BaseModel):
    id: str
    object: str = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "sglx"
    root: Optional[str] = None
    max_model_len: Optional[int] = None


class ModelList(BaseModel):
    object: str = "list"
    data: List[ModelCard] = Field(default_factory=list)

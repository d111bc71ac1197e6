"""POST /v1/embeddings in OpenAI's shape.

`input`: a string, a list of strings, a list of token ids, or a list of such lists (all inputs of one request
go to the scheduler together and are batched). `dimensions`: keep the first d components, then L2-normalize
again when the model's embeddings are normalized (Matryoshka-style truncation; with --no-normalize the
truncated vector is returned as is). `encoding_format`: "float" (JSON numbers) or "base64" (little-endian
float32 bytes, what the openai SDK asks for by default). `truncate` (an sglx extension, as SGLang's /encode):
cut inputs past the context instead of answering 400.

Errors: bad JSON or fields -> 400; an unknown model -> 404; empty inputs, bad token ids, inputs past the
context, a dimensions value out of range -> 400 with the reason.
"""

from __future__ import annotations

import base64
import logging
import math
import struct
from typing import Any, Dict, List, Literal, Optional, Union

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, StrictBool, StrictInt, StrictStr, ValidationError

from sglx.srt.entrypoints.openai.utils import (
    client_closed_response,
    error_response,
    read_json,
    validation_message,
)
from sglx.srt.managers.io_struct import EmbeddingReqInput
from sglx.srt.managers.tokenizer_manager import ClientDisconnected

logger = logging.getLogger(__name__)


class EmbeddingRequest(BaseModel):
    input: Union[StrictStr, List[StrictStr], List[StrictInt], List[List[StrictInt]]]
    model: Optional[str] = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Optional[StrictInt] = None
    user: Optional[str] = None
    truncate: StrictBool = False


class EmbeddingObject(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: Union[List[float], str]


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: List[EmbeddingObject]
    model: str
    usage: EmbeddingUsage


def to_req_input(inp: Union[str, List[Any]], truncate: bool) -> EmbeddingReqInput:
    """OpenAI's `input` as the manager's request: strings go as text, token ids as input_ids."""
    if isinstance(inp, str):
        return EmbeddingReqInput(text=inp, truncate=truncate)
    if not inp:
        raise ValueError("input must not be an empty list.")
    if isinstance(inp[0], str):
        return EmbeddingReqInput(text=list(inp), truncate=truncate)
    if isinstance(inp[0], int):
        return EmbeddingReqInput(input_ids=list(inp), truncate=truncate)
    return EmbeddingReqInput(input_ids=[list(x) for x in inp], truncate=truncate)


def shorten(vec: List[float], dims: Optional[int], renormalize: bool) -> List[float]:
    if dims is None or dims >= len(vec):
        return vec
    head = vec[:dims]
    if not renormalize:
        return head
    norm = math.sqrt(sum(x * x for x in head))
    return [x / norm for x in head] if norm > 0 else head


def encode_base64(vec: List[float]) -> str:
    return base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode("ascii")


class OpenAIServingEmbedding:
    def __init__(self, tokenizer_manager: Any) -> None:
        self.tokenizer_manager = tokenizer_manager

    async def handle_request(self, raw_request: Request) -> Response:
        req = await self._parse(raw_request)
        if isinstance(req, Response):
            return req
        tm = self.tokenizer_manager
        try:
            self._check_dimensions(req.dimensions)
            outs = await tm.embedding_request(to_req_input(req.input, req.truncate), raw_request)
        except ClientDisconnected:
            return client_closed_response()
        except ValueError as e:
            return error_response(str(e), 400)
        except Exception as e:  # noqa: BLE001 - an unexpected failure still gets an OpenAI-style body
            logger.exception("embedding request failed")
            return error_response(f"Internal server error: {e}", 500)
        outs = outs if isinstance(outs, list) else [outs]
        return JSONResponse(self.build_response(req, outs).model_dump(mode="json"))

    async def _parse(self, raw_request: Request) -> Union[EmbeddingRequest, Response]:
        try:
            body = await read_json(raw_request)
        except ValueError as e:
            return error_response(str(e), 400)
        if not isinstance(body, dict):
            return error_response("The request body must be a JSON object.", 400)
        try:
            req = EmbeddingRequest.model_validate(body)
        except ValidationError as e:
            msg, param = validation_message(e)
            return error_response(msg, 400, param)
        tm = self.tokenizer_manager
        if req.model is not None and req.model not in (tm.served_model_name, tm.model_path):
            return error_response(f"The model `{req.model}` does not exist.", 404)
        return req

    def _check_dimensions(self, dims: Optional[int]) -> None:
        full = self.tokenizer_manager.embedding_dim
        if dims is not None and (dims < 1 or (full is not None and dims > full)):
            raise ValueError(f"dimensions must be in [1, {full}]; got {dims}.")

    def build_response(self, req: EmbeddingRequest, outs: List[Dict[str, Any]]) -> EmbeddingResponse:
        renorm = self.tokenizer_manager.embedding_normalized
        data = []
        for i, out in enumerate(outs):
            vec = shorten(out["embedding"], req.dimensions, renorm)
            emb: Union[List[float], str] = encode_base64(vec) if req.encoding_format == "base64" else vec
            data.append(EmbeddingObject(index=i, embedding=emb))
        tokens = sum(int(o["meta_info"].get("prompt_tokens", 0)) for o in outs)
        return EmbeddingResponse(
            data=data,
            model=req.model or self.tokenizer_manager.served_model_name,
            usage=EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens),
        )

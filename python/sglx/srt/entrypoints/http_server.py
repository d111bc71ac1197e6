"""The HTTP process: FastAPI app with SGLang's native API and the OpenAI-compatible API."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import Any, AsyncIterator, Dict, Optional

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.requests import ClientDisconnect

from sglx import __version__
from sglx.srt.entrypoints.openai.serving_chat import OpenAIServingChat
from sglx.srt.entrypoints.openai.serving_completions import OpenAIServingCompletion
from sglx.srt.entrypoints.openai.serving_embedding import OpenAIServingEmbedding
from sglx.srt.entrypoints.openai.utils import client_closed_response, models_response, read_json
from sglx.srt.managers.io_struct import EmbeddingReqInput, GenerateReqInput, ProfileReq, ProfileReqOutput
from sglx.srt.managers.tokenizer_manager import ClientDisconnected, TokenizerManager
from sglx.srt.metrics.collector import CONTENT_TYPE as METRICS_CONTENT_TYPE

logger = logging.getLogger(__name__)

HEALTH_GENERATE_TIMEOUT_S = 60


def error_response(message: str, status: int = 400, err_type: str = "BadRequestError") -> JSONResponse:
    return JSONResponse(
        {"object": "error", "message": message, "type": err_type, "param": None, "code": status},
        status_code=status,
    )


_PROFILE_FIELDS = {"output_dir": str, "num_steps": int, "activities": list, "record_shapes": bool, "with_stack": bool}


def profile_request(body: Any) -> ProfileReq:
    """A /start_profile body as a ProfileReq; ValueError names what is wrong."""
    if not isinstance(body, dict):
        raise ValueError("the body must be a JSON object")
    for key, value in body.items():
        kind = _PROFILE_FIELDS.get(key)
        if kind is None:
            raise ValueError(f"unknown field {key!r}; expected some of {sorted(_PROFILE_FIELDS)}")
        if value is not None and (not isinstance(value, kind) or (kind is int and isinstance(value, bool))):
            raise ValueError(f"{key} must be a {kind.__name__}")
    if not all(isinstance(a, str) for a in body.get("activities") or []):
        raise ValueError("activities must be a list of strings")
    return ProfileReq("start", **{k: v for k, v in body.items() if v is not None})


def profile_response(res: ProfileReqOutput) -> Response:
    return PlainTextResponse(res.message + "\n", status_code=200 if res.success else 400)


def json_response(obj: Any) -> Response:
    # orjson directly: fastapi deprecated ORJSONResponse, and the stdlib encoder is slower on long id lists.
    return Response(orjson.dumps(obj), media_type="application/json")


def sse(obj: Any) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def build_app(tm: TokenizerManager, procs_alive=lambda: True) -> FastAPI:
    app = FastAPI(title="sglx", version=__version__)
    app.state.tokenizer_manager = tm
    chat, completion = OpenAIServingChat(tm), OpenAIServingCompletion(tm)
    embedding = OpenAIServingEmbedding(tm)
    api_key = tm.server_args.api_key

    @app.exception_handler(ClientDisconnect)
    async def client_left_while_sending(request: Request, exc: ClientDisconnect) -> Response:
        return client_closed_response()  # gone before its body was whole: nothing ran, nobody reads this

    if api_key:
        @app.middleware("http")
        async def check_api_key(request: Request, call_next):
            open_paths = ("/health", "/metrics")
            if request.url.path not in open_paths and request.headers.get("Authorization") != f"Bearer {api_key}":
                return error_response("invalid API key", 401, "AuthenticationError")
            return await call_next(request)

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200 if procs_alive() else 503)

    @app.get("/health_generate")
    async def health_generate() -> Response:
        obj = GenerateReqInput(input_ids=[0], sampling_params={"max_new_tokens": 1, "temperature": 0})
        try:
            async def one():
                if tm.is_embedding:  # one forward through the model, whichever kind it is
                    await tm.embedding_request(EmbeddingReqInput(input_ids=[0]))
                    return
                async for _ in tm.generate_request(obj):
                    pass
            await asyncio.wait_for(one(), HEALTH_GENERATE_TIMEOUT_S)
        except Exception as e:  # noqa: BLE001 - any failure means unhealthy
            logger.error("health_generate failed: %s", e)
            return Response(status_code=503)
        return Response(status_code=200)

    @app.get("/get_model_info")
    async def get_model_info() -> Dict[str, Any]:
        return {"model_path": tm.model_path, "tokenizer_path": tm.server_args.tokenizer_path,
                "served_model_name": tm.served_model_name, "is_generation": not tm.is_embedding,
                "context_length": tm.context_len}

    @app.get("/get_server_info")
    async def get_server_info() -> Dict[str, Any]:
        state = await tm.get_internal_state()
        return {**dataclasses.asdict(tm.server_args), **tm.scheduler_info, "internal_state": state,
                "version": __version__}

    @app.api_route("/flush_cache", methods=["GET", "POST"])
    async def flush_cache() -> Response:
        res = await tm.flush_cache()
        return PlainTextResponse(res.message, status_code=200 if res.success else 400)

    @app.api_route("/start_profile", methods=["GET", "POST"])
    async def start_profile(request: Request) -> Response:
        """Optional JSON body: output_dir, num_steps, activities (["CPU", "GPU"]), record_shapes, with_stack."""
        try:
            body = await read_json(request) if await request.body() else {}
            req = profile_request(body)
        except ValueError as e:
            return error_response(str(e))
        return profile_response(await tm.profile(req))

    @app.api_route("/stop_profile", methods=["GET", "POST"])
    async def stop_profile() -> Response:
        return profile_response(await tm.profile(ProfileReq("stop")))

    @app.post("/abort_request")
    async def abort_request(request: Request) -> Response:
        try:
            body = await read_json(request)
        except ValueError as e:
            return error_response(str(e))
        if not isinstance(body, dict) or not isinstance(body.get("rid", ""), str) or \
                not isinstance(body.get("abort_all", False), bool):
            return error_response("expected {\"rid\": str} or {\"abort_all\": true}")
        tm.abort_request(body.get("rid", ""), abort_all=body.get("abort_all", False))
        return Response(status_code=200)

    @app.api_route("/generate", methods=["POST", "PUT"])
    async def generate(request: Request) -> Response:
        try:
            body = await read_json(request)
            if not isinstance(body, dict):
                raise ValueError("the body must be a JSON object")
            obj = GenerateReqInput(**body)
        except TypeError as e:
            return error_response(f"invalid request: {e}")
        except ValueError as e:
            return error_response(str(e))
        if obj.stream:
            gen = tm.generate_request(obj, request)
            try:
                first = await gen.__anext__()  # validation errors surface here, as a 400
            except StopAsyncIteration:
                first = None
            except ClientDisconnected:
                return client_closed_response()
            except ValueError as e:
                return error_response(str(e))
            return StreamingResponse(_stream_native(first, gen), media_type="text/event-stream")
        try:
            out = None
            async for out in tm.generate_request(obj, request):
                pass
            return json_response(out)
        except ClientDisconnected:
            return client_closed_response()
        except ValueError as e:
            return error_response(str(e))

    @app.api_route("/encode", methods=["POST", "PUT"])
    async def encode(request: Request) -> Response:
        try:
            body = await read_json(request)
            if not isinstance(body, dict):
                raise ValueError("the body must be a JSON object")
            out = await tm.embedding_request(EmbeddingReqInput(**body), request)
        except ClientDisconnected:
            return client_closed_response()
        except TypeError as e:
            return error_response(f"invalid request: {e}")
        except ValueError as e:
            return error_response(str(e))
        return json_response(out)

    @app.post("/v1/embeddings")
    async def v1_embeddings(request: Request) -> Response:
        return await embedding.handle_request(request)

    @app.post("/v1/completions")
    async def v1_completions(request: Request) -> Response:
        return await completion.handle_request(request)

    @app.post("/v1/chat/completions")
    async def v1_chat(request: Request) -> Response:
        return await chat.handle_request(request)

    @app.get("/v1/models")
    async def v1_models() -> Dict[str, Any]:
        return models_response(tm)

    @app.get("/metrics")
    async def metrics() -> Response:
        if tm.metrics is None:
            return PlainTextResponse("metrics are off; start with --enable-metrics", status_code=404)
        state = await tm.get_internal_state()
        return Response(tm.metrics.render(state), media_type=METRICS_CONTENT_TYPE)

    return app


async def _stream_native(first: Optional[Dict], gen: AsyncIterator[Dict]) -> AsyncIterator[bytes]:
    try:
        if first is not None:
            yield sse(first)
        async for out in gen:
            yield sse(out)
    except ClientDisconnected:
        return  # nobody is reading
    except ValueError as e:
        yield sse({"error": {"message": str(e), "code": 400}})
    yield b"data: [DONE]\n\n"

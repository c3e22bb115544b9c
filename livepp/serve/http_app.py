"""The ASGI application of ``livepp serve`` (FastAPI), on one port: the live
page at ``/``, the websocket API at ``/ws``, the OpenAI-compatible API under
``/v1``, ``/healthz``, ``/metrics`` (Prometheus), ``/status`` (the live
requests) and ``/openapi.json``. Every route sits behind
:class:`~livepp.serve.access.AccessMiddleware`; every error is a JSON body in
OpenAI's schema; every ``GET`` also answers ``HEAD``.
"""

from __future__ import annotations

import asyncio
import json
import re
from importlib import resources
from typing import TYPE_CHECKING, Any, Callable

import orjson
from fastapi import FastAPI, Request, WebSocket
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException
from starlette.responses import HTMLResponse, JSONResponse, Response

from livepp.serve.access import AccessMiddleware
from livepp.serve.openai_api import OpenAIApi, OrjsonResponse, error_response, openai_error
from livepp.core.params import LiveppError
from livepp.serve.openai_models import (ChatCompletion, ChatCompletionRequest, Completion, CompletionRequest, DetokenizeRequest, ErrorResponse,
                                        ModelCard, ModelList, TokenizeRequest)
from livepp.serve.openai_schema import OpenAIError, chat_prompt as _messages
from livepp.serve.ws_session import Session

if TYPE_CHECKING:
    from livepp.serve.service import Service

__all__ = ["create_app"]

_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": why} for status, why in (
        (400, "A bad request: `error.param` names the field."), (401, "Missing or wrong token."),
        (403, "Unknown Host header or origin."), (404, "No such model or route."), (413, "The body is too large."),
        (429, "The server runs as many requests as it takes."), (503, "The engine's queue is full, or the server is shutting down."))
}


def _page() -> str:
    return resources.files("livepp.serve").joinpath("static/index.html").read_text(encoding="utf-8")


def _param(loc: tuple[Any, ...]) -> str | None:
    """A pydantic error location as the field a client sent: ``messages[0].content``."""
    out = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", part) and part not in _TYPE_TAGS:
            out += f".{part}" if out else part
    return out or None


_OWN_ERRORS = {"lone_surrogate", "bad_policy", "bad_steps", "unsupported", "empty_stop"}
_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "function", "tagged", "union", "literal"}


def _validation_error(exc: RequestValidationError) -> OpenAIError:
    errors = exc.errors()
    # In a union (a string or a list of strings) pydantic reports every branch:
    # livepp's own checks say what is wrong better than "not a string".
    ours = [e for e in errors if e.get("type") in _OWN_ERRORS]
    first = (ours or errors or [{"loc": (), "msg": "bad request", "type": ""}])[0]
    if first.get("type") == "json_invalid":
        why = (first.get("ctx") or {}).get("error", "")
        return OpenAIError(400, f"the body is not valid JSON: {why}".rstrip(": "))
    param = _param(tuple(first.get("loc", ())))
    if param is None:
        return OpenAIError(400, "the body must be a JSON object: " + str(first.get("msg", "")))
    return OpenAIError(400, f"{param}: {first.get('msg', 'invalid')}", param=param)


def _wide_float(value: Any) -> bool:
    """Whether ``value`` holds a float of magnitude 2**63 or more anywhere:
    what orjson makes of an integer too wide for 64 bits."""
    if isinstance(value, float):
        return not abs(value) < 2.0**63
    if isinstance(value, dict):
        return any(_wide_float(v) for v in value.values())
    if isinstance(value, list):
        return any(_wide_float(v) for v in value if not isinstance(v, (int, str)))
    return False


class _OrjsonRequest(Request):
    """A request whose JSON body orjson parses (a megabyte of prompt in
    0.3 ms here, against 1.6 ms for the standard library, all of it holding
    the GIL the batch's steps need). What orjson refuses (a lone surrogate's
    escape, NaN, UTF-16) or reads otherwise (an integer past 64 bits, which
    it makes a float) goes to ``json.loads``, so what is accepted, and every
    error, stay the standard library's."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            body = await self.body()
            try:
                parsed = orjson.loads(body)
            except orjson.JSONDecodeError:
                parsed = None
            self._json = json.loads(body) if parsed is None or _wide_float(parsed) else parsed
        return self._json


class _Route(APIRoute):
    def get_route_handler(self) -> Callable[[Request], Any]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            return await handler(_OrjsonRequest(request.scope, request.receive))

        return route


def create_app(service: "Service") -> FastAPI:
    from importlib.metadata import version

    api = OpenAIApi(service)
    page = _page()
    app = FastAPI(title="livepp", version=version("livepp"), docs_url=None, redoc_url=None, default_response_class=OrjsonResponse,
                  description="Perplexity, live: an OpenAI-compatible API whose answers carry each token's statistics, "
                              "a websocket API (/ws) and a live page (/).")
    app.router.route_class = _Route

    def get(path: str, endpoint: Callable[..., Any], **kwargs: Any) -> None:
        app.add_api_route(path, endpoint, methods=["GET"], **kwargs)
        app.add_api_route(path, endpoint, methods=["HEAD"], include_in_schema=False)

    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "model": service.engine.name, **service.status()}

    async def metrics() -> Response:
        return Response(service.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    async def status() -> dict[str, Any]:
        return {**service.status(), "model": service.engine.name, "requests": service.metrics.live()}

    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [api.model_card()]}

    async def model(model_id: str) -> dict[str, Any]:
        if model_id != service.engine.name:
            raise OpenAIError(404, f"The model '{model_id}' does not exist", param="model", code="model_not_found")
        return api.model_card()

    get("/", index, include_in_schema=False, response_class=HTMLResponse)
    get("/index.html", index, include_in_schema=False, response_class=HTMLResponse)
    get("/healthz", healthz, summary="Health, and the engine's batch and queue")
    get("/metrics", metrics, summary="Prometheus metrics", response_class=Response,
        responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}})
    get("/status", status, summary="The live requests (needs the token)", responses=_ERRORS)
    get("/v1/models", models, response_model=ModelList, summary="The model this server serves", responses=_ERRORS)
    get("/v1/models/{model_id:path}", model, response_model=ModelCard, summary="One model", responses=_ERRORS)

    streamed = {"text/event-stream": {"schema": {"type": "string", "description": "Server-sent events (stream: true)."}}}

    @app.post("/v1/chat/completions", summary="Chat completion, with each token's live statistics",
              responses={200: {"model": ChatCompletion, "content": streamed}, **_ERRORS}, response_model=None)
    async def chat(body: ChatCompletionRequest, request: Request) -> Response:
        return await api.complete("chat", body, request)

    @app.post("/v1/completions", summary="Text completion, with each token's live statistics",
              responses={200: {"model": Completion, "content": streamed}, **_ERRORS}, response_model=None)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await api.complete("completions", body, request)

    def encoder() -> Any:
        if service.scheduler is None:
            raise OpenAIError(400, "tokenizer endpoints need a local torch or llama.cpp model served with continuous batching",
                              code="unsupported")
        return service.scheduler.encoder

    def checked_model(name: str | None) -> None:
        if name is not None and name != service.engine.name:
            raise OpenAIError(404, f"The model '{name}' does not exist", param="model", code="model_not_found")

    @app.post("/tokenize", summary="Token ids of a prompt or of chat messages (vLLM's shape)", responses=_ERRORS)
    async def tokenize(body: TokenizeRequest) -> dict[str, Any]:
        checked_model(body.model)
        enc = encoder()
        if (body.prompt is None) == (body.messages is None):
            raise OpenAIError(400, "give a prompt or messages", param="prompt")
        try:
            if body.prompt is not None:
                ids = await asyncio.to_thread(enc.tokenize, body.prompt, add_special_tokens=body.add_special_tokens)
            else:
                ids = await asyncio.to_thread(enc.chat_ids, _messages(body.messages), add_generation_prompt=body.add_generation_prompt)
        except LiveppError as exc:
            raise openai_error(exc, prompt_param="prompt" if body.prompt is not None else "messages") from None
        out: dict[str, Any] = {"count": len(ids), "max_model_len": enc.context_length, "tokens": ids}
        if body.return_token_strs:
            out["token_strs"] = await asyncio.to_thread(enc.token_texts, ids)
        return out

    @app.post("/detokenize", summary="The text of token ids (vLLM's shape)", responses=_ERRORS)
    async def detokenize(body: DetokenizeRequest) -> dict[str, Any]:
        checked_model(body.model)
        enc = encoder()
        vocab = service.scheduler.backend.vocab_size
        bad = next((t for t in body.tokens if t >= vocab), None)
        if bad is not None:
            raise OpenAIError(400, f"token id {bad} is not in this model's vocabulary of {vocab}", param="tokens")
        return {"prompt": await asyncio.to_thread(enc.decode, body.tokens)}

    async def tokenizer_info() -> dict[str, Any]:
        return encoder().info()

    get("/tokenizer_info", tokenizer_info, summary="The tokenizer: special tokens, chat template, context (vLLM's shape)",
        responses=_ERRORS)

    @app.websocket("/ws")
    async def websocket(ws: WebSocket) -> None:
        limit = service.config.max_connections
        if service.shutting_down or len(service.sessions) >= limit:
            why = "the server is shutting down" if service.shutting_down else f"too many connections (at most {limit})"
            await ws.send_denial_response(error_response(OpenAIError(503, why, type="server_error", code="busy")))
            return
        await ws.accept()
        await Session(service, ws).run()

    @app.exception_handler(OpenAIError)
    async def on_openai_error(request: Request, exc: OpenAIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(_validation_error(exc))

    @app.exception_handler(HTTPException)
    async def on_http_error(request: Request, exc: HTTPException) -> JSONResponse:
        if exc.status_code == 404:
            error = OpenAIError(404, f"no such endpoint: {request.method} {request.url.path}", code="not_found")
        elif exc.status_code == 405:
            error = OpenAIError(405, f"{request.method} is not allowed on {request.url.path}", code="method_not_allowed")
        else:
            error = OpenAIError(exc.status_code, str(exc.detail))
        return error_response(error, dict(exc.headers or {}))

    @app.exception_handler(Exception)
    async def on_bug(request: Request, exc: Exception) -> JSONResponse:
        return error_response(openai_error(exc))

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            # The one model name this server answers to (others get 404 model_not_found).
            for name in ("ChatCompletionRequest", "CompletionRequest"):
                schema["components"]["schemas"][name]["properties"]["model"]["enum"] = [service.engine.name]
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    app.add_middleware(AccessMiddleware, service=service)
    return app

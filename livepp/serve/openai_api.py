"""The OpenAI-compatible API of ``livepp serve``: ``/v1/models``,
``/v1/chat/completions`` and ``/v1/completions``, streamed (server-sent
events ending with ``data: [DONE]``) or not.

Every request runs like a websocket ``generate``: through the server's
engine (the continuous batch of a local model, or the upstream engine of a
gateway), its own monitor (the server's default policies plus the request's
``livepp.policies``) and the live list of the page. ``n`` > 1 decodes the
samples as rows of one batch. A client that goes away stops its request
before the next forward pass (a gateway closes the upstream request). The
shapes and livepp's additions are described in :mod:`livepp.serve.openai_schema`.
"""

from __future__ import annotations

import asyncio
import sys
import traceback
import uuid
from typing import TYPE_CHECKING, Any, Callable

from livepp.core.batch_monitor import MonitoredBatch
from livepp.core.events import Event, TokenEvent, dumps
from livepp.core.monitor import Monitor
from livepp.core.params import DEFAULT_MAX_NEW_TOKENS, EngineBusy, LiveppError, PromptTooLong
from livepp.core.policies import parse_policy
from livepp.core.tracker import Tracker
from livepp.serve.http_front import HttpReply, HttpRequest, bearer
from livepp.serve.jobs import Job, JobEngine
from livepp.serve.openai_schema import ChoiceBuilder, CompletionRequest, OpenAIError, envelope, now, parse_request, usage

if TYPE_CHECKING:
    from livepp.serve.app import LiveppServer

__all__ = ["OpenAIApi", "openai_error"]

_ROUTES = {"/v1/chat/completions": "chat", "/v1/completions": "completions"}
# The websocket API's parameter names as the OpenAI API calls them.
_OPENAI_NAMES = {"max_new_tokens": "max_tokens", "policies": "livepp.policies"}


def openai_error(exc: BaseException, *, prompt_param: str = "messages") -> OpenAIError:
    """The OpenAI-shaped error for a failure, chosen by its type."""
    from livepp.engines.remote import RemoteError

    if isinstance(exc, OpenAIError):
        return exc
    if isinstance(exc, EngineBusy):
        return OpenAIError(503, str(exc), type="server_error", code="busy")
    if isinstance(exc, PromptTooLong):
        return OpenAIError(400, str(exc), param=prompt_param, code="context_length_exceeded")
    if isinstance(exc, RemoteError):
        upstream = exc.upstream or {}
        if exc.status is not None and 400 <= exc.status < 600:
            return OpenAIError(exc.status, upstream.get("message") or str(exc), type=upstream.get("type") or "upstream_error",
                               param=upstream.get("param"), code=upstream.get("code"))
        return OpenAIError(502, str(exc), type="upstream_error", code="upstream_error")
    if isinstance(exc, LiveppError):
        return OpenAIError(400, str(exc))
    return OpenAIError(500, f"{type(exc).__name__}: {exc}", type="server_error", code="internal")


class _Emit:
    """A monitor sink that hands one row's events to the event loop."""

    def __init__(self, emit: Callable[[int, Any], None], row: int) -> None:
        self.put, self.row = emit, row

    def emit(self, event: Event) -> None:
        self.put(self.row, event)


class OpenAIApi:
    def __init__(self, server: "LiveppServer") -> None:
        self.server = server
        self.created = now()

    # ---- entry ---------------------------------------------------------------
    async def handle(self, request: HttpRequest, reply: HttpReply) -> None:
        try:
            origin = request.header("origin")
            if origin is not None and origin in self.server.config.allowed_origins:
                # A page of an origin the operator allowed (--allow-origin) may read the answers.
                reply.headers += [("Access-Control-Allow-Origin", origin), ("Vary", "Origin")]
            if request.method == "OPTIONS":
                self._check_access(request, preflight=True)
                asked = request.header("access-control-request-headers") or "Authorization, Content-Type"
                reply.send(204, b"", "text/plain", [("Access-Control-Allow-Methods", "GET, POST, OPTIONS"),
                                                    ("Access-Control-Allow-Headers", asked), ("Access-Control-Max-Age", "600")])
                return
            self._check_access(request)
            kind = _ROUTES.get(request.path)
            if request.path == "/v1/models":
                if request.method != "GET":
                    raise OpenAIError(405, "use GET /v1/models")
                reply.send_json(200, {"object": "list", "data": [self._model_card()]})
                return
            if kind is None:
                raise OpenAIError(404, f"no such endpoint: {request.method} {request.path}; this server has /v1/models, "
                                       "/v1/chat/completions and /v1/completions", code="not_found")
            if request.method != "POST":
                raise OpenAIError(405, f"use POST {request.path}")
            await self._completion(kind, request, reply)
        except OpenAIError as exc:
            reply.send_json(exc.status, exc.body())
        except Exception as exc:  # a bug of ours: say so in the schema clients parse
            traceback.print_exc(file=sys.stderr)
            error = openai_error(exc)
            reply.send_json(error.status, error.body())

    def _check_access(self, request: HttpRequest, *, preflight: bool = False) -> None:
        """Host, Origin and, unless this is a browser's CORS preflight (which
        carries no credentials), the token."""
        server = self.server
        hosts = request.header_all("host")
        if len(hosts) != 1 or not server.host_allowed(hosts[0]):
            raise OpenAIError(403, "unknown Host header (allow it with --allow-host)", code="forbidden")
        origin = request.header("origin")
        if not server.origin_allowed(origin, hosts[0]):
            raise OpenAIError(403, f"origin {origin} not allowed", code="forbidden")
        if not preflight and not server.token_ok(bearer(request.header("authorization"))):
            raise OpenAIError(401, "missing or wrong API key: send 'Authorization: Bearer TOKEN' with the server's --token",
                              code="invalid_api_key")

    def _model_card(self) -> dict[str, Any]:
        return {"id": self.server.engine.name, "object": "model", "created": self.created, "owned_by": "livepp"}

    def _engine_for(self, kind: str) -> Any:
        engine = self.server.engine
        # A gateway asks its upstream through the same API the client used.
        if getattr(engine, "kind", None) == "openai" and getattr(engine, "api", kind) != kind:
            engine = engine.with_api(kind)
        return engine

    # ---- one completion --------------------------------------------------------
    async def _completion(self, kind: str, request: HttpRequest, reply: HttpReply) -> None:
        server, config = self.server, self.server.config
        default_max = min(DEFAULT_MAX_NEW_TOKENS, config.max_new_tokens_cap)
        req = parse_request(kind, request.body, models=(server.engine.name,), default_max_tokens=default_max,
                            max_n=max(1, min(config.max_batch, 16)), max_step_regex=config.max_stop_length)
        over = server.over_limit(req.params, len(req.policies), names=_OPENAI_NAMES)
        if over is not None:
            raise OpenAIError(400, over[1], param=over[0])
        prefix = "chatcmpl-" if kind == "chat" else "cmpl-"
        job = server.admit(Job(prefix + uuid.uuid4().hex[:24]))
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[int | None, Any]] = asyncio.Queue()

        def emit(row: int | None, item: Any) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, (row, item))

        def work() -> None:
            failure: BaseException | None = None
            try:
                self._generate(job, kind, req, emit)
            except BaseException as exc:  # noqa: BLE001 - reported to the client
                failure = exc
            finally:
                emit(None, failure)

        watcher = loop.create_task(self._watch(reply, job))
        job.done = loop.run_in_executor(server._workers, work)
        try:
            await self._respond(req, job, queue, reply)
        finally:
            watcher.cancel()
            job.stop("cancelled")  # no-op after a normal end
            await asyncio.gather(job.done, return_exceptions=True)
            server.release(job)

    async def _watch(self, reply: HttpReply, job: Job) -> None:
        await reply.gone.wait()
        job.stop("cancelled")  # the client left: stop before the next forward pass

    def _generate(self, job: Job, kind: str, req: CompletionRequest, emit: Callable[[int | None, Any], None]) -> None:
        """Worker thread: decode every choice, monitored; events go to ``emit``."""
        from livepp.api import prompt_rows

        server = self.server
        engine = JobEngine(self._engine_for(kind), server.runner, job)
        rows, row_params = prompt_rows(req.prompts, req.n, req.params)
        specs = list(server.config.default_policies) + req.policies
        settings = {"window": req.window}

        def tracker() -> Tracker:
            return Tracker(window=req.window)

        if len(rows) == 1:
            stream = engine.open(rows[0], row_params[0])  # validates before any compute
            monitor = Monitor(policies=[parse_policy(s) for s in specs], keep_events=False, tracker_factory=tracker, steps=req.steps,
                              sinks=[_Emit(emit, 0), server.metrics.sink(job.id, kind, job.accepted_at)])
            monitor.run(stream, model=engine.name, params=row_params[0].to_dict() | settings, engine=engine.kind)
            return
        metrics = [server.metrics.sink(f"{job.id}/{i}", kind, job.accepted_at) for i in range(len(rows))]
        batch = MonitoredBatch(engine.open_batch(rows, row_params), row_params, model=engine.name, engine=engine.kind,
                               policies=lambda i: [parse_policy(s) for s in specs], tracker_factory=tracker,
                               run_params=settings, steps=req.steps)
        for row, event in batch:
            metrics[row].emit(event)
            emit(row, event)

    async def _respond(self, req: CompletionRequest, job: Job, queue: asyncio.Queue, reply: HttpReply) -> None:
        builders = [ChoiceBuilder(i, req) for i in range(req.rows)]
        head = envelope(req, job.id, now(), chunk=req.stream)
        pending: list[dict[str, Any]] = []  # chunks before the stream starts
        prompt_param = "messages" if req.kind == "chat" else "prompt"

        async def send(chunk: dict[str, Any]) -> None:
            await reply.write(b"data: " + dumps(chunk).encode("utf-8") + b"\n\n")

        async def start() -> None:
            reply.start(200, "text/event-stream", [("X-Request-Id", job.id)])
            if req.kind == "chat":
                for b in builders:
                    await send(head | {"choices": [{"index": b.index, "delta": {"role": "assistant", "content": ""},
                                                     "logprobs": None, "finish_reason": None}]})
            for chunk in pending:
                await send(chunk)
            pending.clear()

        while True:
            row, item = await queue.get()
            if row is None:
                failure = item
                break
            part = builders[row].on_event(item)
            if part is None or not req.stream:
                continue
            chunk = head | {"choices": [part]}
            if reply.started:
                await send(chunk)
            else:
                pending.append(chunk)
                if isinstance(item, TokenEvent):
                    await start()
        if failure is not None and not isinstance(failure, Exception):
            raise failure
        if reply.gone.is_set():
            return
        if failure is not None:
            error = openai_error(failure, prompt_param=prompt_param)
            if error.status >= 500 and error.code == "internal":
                traceback.print_exception(failure, file=sys.stderr)
            if not reply.started:
                reply.send_json(error.status, error.body())
            else:
                await send(error.body())
            return
        if not req.stream:
            reply.send_json(200, head | {"choices": [b.choice() for b in builders], "usage": usage(builders, req.n)},
                            [("X-Request-Id", job.id)])
            return
        if not reply.started:
            await start()
        if req.include_usage:
            await send(head | {"choices": [], "usage": usage(builders, req.n)})
        await reply.write(b"data: [DONE]\n\n")


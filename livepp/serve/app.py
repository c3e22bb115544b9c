"""`livepp serve`: a websocket endpoint, a live page, health, status and metrics.

One model per process. A local model (torch or llama.cpp) runs behind a continuous-batching
:class:`~livepp.engines.scheduler.Scheduler` (``max_batch`` rows in one
forward pass per step, a bounded queue beyond); with ``max_batch`` 1, or a
serial engine of another kind, every model step goes through one FIFO
:class:`ModelRunner` instead. Each request runs its own monitor (tracker,
policies) in a worker thread; each event is handed to the client's
:class:`Outbox` through the event loop; the outbox coalesces token events for
slow readers and never drops ``end``.

Protocol (JSON text messages on ``/ws``):
  → {"type":"generate","id":str,"prompt":str,"params":{...},"policies":[SPEC,...],"steps":bool|REGEX}
  → {"type":"route","id":str,"question":str,"params":{...}}   (CAR routing)
  → {"type":"think","id":str,"question":str,"params":{...}}   (DeepConf traces)
  → {"type":"watch","id":str,"prompt":str|null,"chat":bool,"text":str}, then
    {"type":"text","id":str,"text":str} ... {"type":"text","id":str,"done":true}
    (proxy-model PPL of the client's text, :mod:`livepp.serve.watching`)
  → {"type":"cancel","id":str}
  ← {"type":"queued","id","position"} when a request waits for room in the batch
  ← start / token / policy / end events as ``livepp generate --json``, each with "id"
  ← {"type":"error","id":str|null,"code":str,"message":str}; the connection stays open
HTTP: ``/healthz`` (JSON: running, queued, batch size), ``/metrics``
(Prometheus text), ``/status`` (live requests; needs the token like ``/ws``),
and the OpenAI-compatible API: ``/v1/models``, ``/v1/chat/completions``,
``/v1/completions`` (:mod:`livepp.serve.openai_api`; ``Authorization: Bearer``
with the same token).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import secrets
import signal
import sys
import traceback
from dataclasses import dataclass
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, urlsplit

from websockets.exceptions import ConnectionClosed

from livepp.engines.protocol import Engine
from livepp.engines.select import as_engine
from livepp.core.events import dumps
from livepp.core.monitor import Monitor
from livepp.serve.http_front import bearer
from livepp.serve.jobs import ClientError, Job, JobEngine, ModelRunner, OutboxSink, error_code, one_line
from livepp.serve.metrics import ServerMetrics
from livepp.serve.reasoning import start_route, start_think
from livepp.serve.watching import add_text, start_watch
from livepp.serve.outbox import Outbox
from livepp.core.params import DEFAULT_MAX_NEW_TOKENS, GenerationParams, LiveppError
from livepp.core.policies import parse_policy
from livepp.core.steps import step_rule

__all__ = ["ServerConfig", "ModelRunner", "LiveppServer", "serve_forever"]


LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")

# Every code an error message from this server can carry (the README lists them).
ERROR_CODES = (
    "bad_json", "bad_message", "unknown_type", "bad_params", "message_too_large", "prompt_too_long",
    "too_many_requests", "busy", "duplicate_id", "unknown_id", "shutting_down", "upstream_error", "internal",
)


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8765
    token: str | None = None
    max_new_tokens_cap: int = 1024
    max_requests_per_connection: int = 4
    max_message_bytes: int = 64 * 1024
    outbox_limit: int = 256
    allowed_origins: tuple[str, ...] = ()
    # Host header values accepted besides loopback and the bound address
    # (DNS rebinding defence); "*" accepts any.
    allowed_hosts: tuple[str, ...] = ()
    max_connections: int = 64
    max_running_jobs: int = 32
    # Continuous batching of a local model: rows per forward pass, rows that
    # may wait beyond them (then "busy"), and the prefill chunk in tokens.
    max_batch: int = 8
    max_queue: int = 24
    prefill_chunk: int = 256
    max_stop_strings: int = 8
    max_stop_length: int = 200
    max_top_logprobs: int = 20
    max_policies: int = 8
    calibration: str | None = None  # for "route"; default: the shipped one
    # Policies every generate and /v1 request runs, before the request's own.
    default_policies: tuple[str, ...] = ()
    max_body_bytes: int = 1 << 20  # a /v1 request body


def _host_name(host_header: str) -> str:
    """The host part of a Host header: "[::1]:8765" -> "::1", "a.b:80" -> "a.b"."""
    h = host_header.strip().lower()
    if h.startswith("["):
        return h[1 : h.find("]")] if "]" in h else h
    return h.rsplit(":", 1)[0] if h.count(":") == 1 else h


def _page() -> str:
    return resources.files("livepp.serve").joinpath("static/index.html").read_text(encoding="utf-8")


def _respond(connection: Any, status: int, body: str, content_type: str) -> Any:
    response = connection.respond(status, body)
    # respond() always says text/plain, and assigning a header appends.
    del response.headers["Content-Type"]
    response.headers["Content-Type"] = content_type
    return response


class LiveppServer:
    def __init__(self, engine: Engine, config: ServerConfig) -> None:
        engine = as_engine(engine)
        self.config = config
        self.scheduler: Any = None
        if config.max_batch > 1 and engine.serial:
            from livepp.engines.select import supports_continuous_batching

            if supports_continuous_batching(engine):  # a local torch or llama.cpp engine
                from livepp.engines.scheduler import Scheduler

                self.scheduler = Scheduler(engine, max_batch=config.max_batch, max_queue=config.max_queue,
                                           prefill_chunk=config.prefill_chunk)
                engine = self.scheduler
        self.engine = engine
        for spec in config.default_policies:
            parse_policy(spec)  # a bad default is the operator's error, now
        self.metrics = ServerMetrics(self.status)
        self.runner = ModelRunner()
        self.jobs: set[Job] = set()
        self.outboxes: set[Outbox] = set()
        self._workers = concurrent.futures.ThreadPoolExecutor(max_workers=64, thread_name_prefix="livepp-job")
        self._shutting_down = False
        self._page = _page()
        self.front_connections: set[Any] = set()
        from livepp.serve.openai_api import OpenAIApi

        self.openai = OpenAIApi(self)

    # ---- HTTP side: page, health, auth and origin checks -----------------
    def host_allowed(self, host_header: str | None) -> bool:
        """DNS rebinding defence: the Host header must name this server."""
        allowed = self.config.allowed_hosts
        if "*" in allowed:
            return True
        if not host_header:
            return False
        name = _host_name(host_header)
        known = {*LOOPBACK_HOSTS, self.config.host.lower(), *(h.lower() for h in allowed)}
        return name in known and name not in ("0.0.0.0", "::")

    def origin_allowed(self, origin: str | None, host: str) -> bool:
        """A request from a browser page: its own origin (the Host header was
        checked, so that is safe) or one allowed with --allow-origin."""
        return origin is None or origin == f"http://{host}" or origin in self.config.allowed_origins

    def token_ok(self, given: str | None) -> bool:
        """The server's token, if it has one, was given."""
        if self.config.token is None:
            return True
        # Bytes: compare_digest refuses non-ASCII str.
        return given is not None and secrets.compare_digest(given.encode("utf-8"), self.config.token.encode("utf-8"))

    def process_request(self, connection: Any, request: Any) -> Any:
        url = urlsplit(request.path)
        hosts = request.headers.get_all("Host")
        if len(hosts) != 1 or not self.host_allowed(hosts[0]):
            return connection.respond(403, "unknown Host header (allow it with --allow-host)\n")
        if url.path == "/healthz":
            return _respond(connection, 200, dumps({"status": "ok", "model": self.engine.name, **self.status()}) + "\n", "application/json")
        if url.path == "/metrics":
            return _respond(connection, 200, self.metrics.render().decode("utf-8"), "text/plain; version=0.0.4; charset=utf-8")
        if url.path in ("/", "/index.html"):
            return _respond(connection, 200, self._page, "text/html; charset=utf-8")
        if url.path not in ("/ws", "/status"):
            return connection.respond(404, "not found\n")
        origin = request.headers.get("Origin")
        if not self.origin_allowed(origin, hosts[0]):
            return connection.respond(403, f"origin {origin} not allowed\n")
        given = bearer(request.headers.get("Authorization")) or parse_qs(url.query).get("token", [None])[0]
        if not self.token_ok(given):
            return connection.respond(401, "missing or wrong token\n")
        if url.path == "/status":
            body = {**self.status(), "model": self.engine.name, "requests": self.metrics.live()}
            return _respond(connection, 200, dumps(body) + "\n", "application/json")
        if len(self.outboxes) >= self.config.max_connections:
            return connection.respond(503, f"too many connections (at most {self.config.max_connections})\n")
        return None

    def status(self) -> dict[str, int]:
        """Rows running and queued, the batch size and its limit."""
        if self.scheduler is not None:
            return self.scheduler.status()
        running = len(self.jobs)
        return {"running": running, "queued": 0, "batch_size": min(running, 1), "max_batch": 1, "max_queue": 0}

    # ---- websocket side --------------------------------------------------
    async def handler(self, ws: Any) -> None:
        loop = asyncio.get_running_loop()
        outbox = Outbox(self.config.outbox_limit)
        self.outboxes.add(outbox)
        jobs: dict[str, Job] = {}

        async def send_loop() -> None:
            while True:
                event = await outbox.get()
                await ws.send(dumps(event))

        sender = asyncio.create_task(send_loop())
        try:
            async for message in ws:
                try:
                    self._dispatch(message, jobs, outbox, loop)
                except ClientError as exc:
                    request_id = exc.__dict__.get("request_id")
                    # A refused message's error may be dropped if the client
                    # does not read (a flood of bad messages cannot grow memory).
                    outbox.put({"type": "error", "id": request_id, "code": exc.code, "message": str(exc)}, droppable=True)
                except Exception as exc:  # a bug of ours: say so, keep the connection
                    traceback.print_exc(file=sys.stderr)
                    outbox.put({"type": "error", "id": None, "code": "internal", "message": f"{type(exc).__name__}: {exc}"}, droppable=True)
        except ConnectionClosed:
            pass  # a dropped connection ends the loop; the jobs are stopped below
        finally:
            for job in jobs.values():
                job.stop("cancelled")
            pending = [j.done for j in jobs.values() if j.done is not None]
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
            # Let queued events (every end) go out while the socket is open.
            while len(outbox) and ws.state.name == "OPEN":
                await asyncio.sleep(0.01)
            sender.cancel()
            self.outboxes.discard(outbox)

    def _dispatch(self, message: Any, jobs: dict[str, Job], outbox: Outbox, loop: asyncio.AbstractEventLoop) -> None:
        if isinstance(message, bytes):
            raise ClientError("bad_message", "send JSON text messages, not binary")
        if len(message.encode("utf-8")) > self.config.max_message_bytes:
            raise ClientError("message_too_large", f"messages are limited to {self.config.max_message_bytes} bytes")
        try:
            data = json.loads(message)
        except json.JSONDecodeError as exc:
            raise ClientError("bad_json", f"malformed JSON: {exc.msg} at position {exc.pos}") from None
        except RecursionError:
            raise ClientError("bad_json", "JSON nested too deeply") from None
        if not isinstance(data, dict):
            raise ClientError("bad_message", "a message must be a JSON object")
        kind = data.get("type")
        request_id = data.get("id")
        try:
            if kind == "generate":
                self._start_generate(data, jobs, outbox, loop)
            elif kind == "route":
                start_route(self, data, jobs, outbox, loop)
            elif kind == "think":
                start_think(self, data, jobs, outbox, loop)
            elif kind == "watch":
                start_watch(self, data, jobs, outbox, loop)
            elif kind == "text":
                job = jobs.get(request_id) if isinstance(request_id, str) else None
                if job is None:
                    raise ClientError("unknown_id", f"no running watch request with id {request_id!r}")
                text, done = data.get("text"), data.get("done", False)
                if (text is not None and not isinstance(text, str)) or not isinstance(done, bool):
                    raise ClientError("bad_params", "text must be a string and done true or false")
                add_text(job, text, done=done)
            elif kind == "cancel":
                job = jobs.get(request_id) if isinstance(request_id, str) else None
                if job is None:
                    raise ClientError("unknown_id", f"no running request with id {request_id!r}")
                job.stop("cancelled")
            else:
                raise ClientError("unknown_type", f"unknown message type {kind!r}; use generate, route, think, watch, text or cancel")
        except ClientError as exc:
            exc.__dict__["request_id"] = request_id if isinstance(request_id, str) else None
            raise

    def _start_generate(self, data: dict[str, Any], jobs: dict[str, Job], outbox: Outbox, loop: asyncio.AbstractEventLoop) -> None:
        prompt = data.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise ClientError("bad_params", "prompt must be a non-empty string")
        try:
            raw_params = data.get("params") or {}
            if isinstance(raw_params, dict) and "max_new_tokens" not in raw_params:
                # An unstated length defaults within this server's cap.
                raw_params = raw_params | {"max_new_tokens": min(DEFAULT_MAX_NEW_TOKENS, self.config.max_new_tokens_cap)}
            params = GenerationParams.from_dict(raw_params)
            specs = data.get("policies") or []
            if not isinstance(specs, list) or not all(isinstance(s, str) for s in specs):
                raise LiveppError("policies must be a list of policy specs such as 'early-stop:threshold=8'")
            [parse_policy(s) for s in specs]
            steps = step_rule(data.get("steps"), max_length=self.config.max_stop_length)
        except (LiveppError, TypeError) as exc:
            raise ClientError("bad_params", str(exc)) from None
        over = self.over_limit(params, len(specs))
        if over is not None:
            raise ClientError("bad_params", over[1])
        job = self._new_job(data, jobs)
        self._launch(job, jobs, outbox, loop, self._run_job, prompt, params, specs, steps, OutboxSink(loop, outbox, job.id, job))

    def over_limit(self, params: GenerationParams, n_policies: int, *,
                   names: dict[str, str] | None = None) -> tuple[str, str] | None:
        """The first of this server's limits a request breaks, as (the
        parameter, what to tell the client), or None. ``names`` renames
        parameters for an API that calls them otherwise (OpenAI's max_tokens)."""
        c = self.config
        name = (names or {}).get
        if params.max_new_tokens > c.max_new_tokens_cap:
            field = name("max_new_tokens", "max_new_tokens")
            return field, f"{field} {params.max_new_tokens} is above this server's cap of {c.max_new_tokens_cap}"
        if len(params.stop) > c.max_stop_strings or any(len(s) > c.max_stop_length for s in params.stop):
            return name("stop", "stop"), f"at most {c.max_stop_strings} stop strings of at most {c.max_stop_length} characters each"
        if params.top_logprobs > c.max_top_logprobs:
            return name("top_logprobs", "top_logprobs"), f"top_logprobs is limited to {c.max_top_logprobs} on this server"
        if n_policies > c.max_policies:
            return name("policies", "policies"), f"at most {c.max_policies} policies per request"
        return None

    def _new_job(self, data: dict[str, Any], jobs: dict[str, Job]) -> Job:
        request_id = data.get("id")
        if not isinstance(request_id, str) or not request_id:
            raise ClientError("bad_message", f"{data.get('type')} needs a non-empty string id")
        if request_id in jobs:
            raise ClientError("duplicate_id", f"request {request_id!r} is still running")
        if len(jobs) >= self.config.max_requests_per_connection:
            raise ClientError("too_many_requests", f"at most {self.config.max_requests_per_connection} concurrent requests per connection")
        if self._shutting_down:
            raise ClientError("shutting_down", "the server is shutting down")
        if len(self.jobs) >= self.config.max_running_jobs:
            raise ClientError("busy", f"the server runs at most {self.config.max_running_jobs} requests at once; try again later")
        return Job(request_id)

    def admit(self, job: Job) -> Job:
        """Count a request that is not tied to a websocket connection (a /v1 request)."""
        if self._shutting_down:
            from livepp.serve.openai_schema import OpenAIError

            raise OpenAIError(503, "the server is shutting down", type="server_error", code="shutting_down")
        if len(self.jobs) >= self.config.max_running_jobs:
            from livepp.serve.openai_schema import OpenAIError

            raise OpenAIError(429, f"the server runs at most {self.config.max_running_jobs} requests at once; try again later",
                              type="server_error", code="busy")
        self.jobs.add(job)
        return job

    def release(self, job: Job) -> None:
        self.jobs.discard(job)

    def _launch(self, job: Job, jobs: dict[str, Job], outbox: Outbox, loop: asyncio.AbstractEventLoop, fn: Any, *args: Any) -> None:
        jobs[job.id] = job
        self.jobs.add(job)

        def release() -> None:
            # On the loop thread: leave the tables first, then say the last word.
            jobs.pop(job.id, None)
            self.jobs.discard(job)
            for event in job.final:
                outbox.put(event)

        def work() -> None:
            try:
                fn(job, *args)
            finally:
                loop.call_soon_threadsafe(release)

        job.done = loop.run_in_executor(self._workers, work)

    def _run_job(self, job: Job, prompt: str, params: GenerationParams, specs: list[str], steps: str | None, sink: OutboxSink) -> None:
        """Worker thread: one generation, monitored here, decoded by the engine."""
        engine = self.job_engine(job, sink)
        try:
            stream = engine.open(prompt, params)  # validates before any compute
        except LiveppError as exc:
            job.final.append({"type": "error", "id": job.id, "code": error_code(exc), "message": one_line(exc)})
            return
        metrics = self.metrics.sink(job.id, "generate", job.accepted_at)
        specs = [*self.config.default_policies, *specs]
        monitor = Monitor(policies=[parse_policy(s) for s in specs], sinks=[sink, metrics], keep_events=False, steps=steps)
        try:
            monitor.run(stream, model=engine.name, params=params.to_dict() | {"window": 32}, engine=engine.kind)
        except Exception as exc:  # the end event (reason "error") is queued before this
            job.final.append({"type": "error", "id": job.id, "code": error_code(exc), "message": one_line(exc)})

    def job_engine(self, job: Job, sink: OutboxSink) -> JobEngine:
        """The engine as ``job`` sees it; a wait for room in the batch is told
        to the client as a ``queued`` event."""
        def queued(position: int) -> None:
            sink.loop.call_soon_threadsafe(sink.outbox.put, {"type": "queued", "id": job.id, "position": position})

        return JobEngine(self.engine, self.runner, job, on_queued=queued)

    async def shutdown(self) -> None:
        """Stop every running generation with reason "shutdown" and wait for their ends."""
        self._shutting_down = True
        for job in list(self.jobs):
            job.stop("shutdown")
        pending = [j.done for j in list(self.jobs) if j.done is not None]
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        for connection in list(self.front_connections):
            connection.abort_http()  # idle or half-sent HTTP requests
        self.runner.shutdown()
        if self.scheduler is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.scheduler.close)


class Interrupts:
    """Ctrl-C handling: the first asks for a clean shutdown (running requests
    end with reason "shutdown"), a second one forces the process out even if
    the shutdown hangs."""

    def __init__(self, stop: asyncio.Event, *, force_exit: Any = None) -> None:
        self.stop = stop
        self.count = 0
        self.force_exit = force_exit or (lambda: os._exit(130))

    def __call__(self) -> None:
        self.count += 1
        if self.count == 1:
            print("livepp: shutting down (Ctrl-C again to force)", file=sys.stderr, flush=True)
            self.stop.set()
        else:
            print("livepp: forced exit", file=sys.stderr, flush=True)
            self.force_exit()


async def serve_forever(
    server: LiveppServer,
    *,
    ready: Any = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Serve until ``stop`` is set (or SIGINT/SIGTERM), then shut down cleanly:
    running generations end with reason "shutdown" and their end events are
    sent before connections close. ``ready(port)`` is called once listening."""
    import functools

    from websockets.asyncio.server import serve

    from livepp.serve.http_front import FrontConnection

    config = server.config
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    interrupts = Interrupts(stop)
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, interrupts)
        except (NotImplementedError, RuntimeError, ValueError):
            pass  # not the main thread (tests) or not supported here
    # Frames above max_size close the connection at the protocol level; the
    # smaller max_message_bytes is checked per message with an error event.
    async with serve(
        server.handler,
        config.host,
        config.port,
        process_request=server.process_request,
        max_size=max(1 << 20, 4 * config.max_message_bytes),
        # The OpenAI API's POSTs and streamed replies are answered before websockets sees them.
        create_connection=functools.partial(FrontConnection, http_handler=server.openai.handle,
                                            max_body=config.max_body_bytes, registry=server.front_connections),
    ) as ws_server:
        port = ws_server.sockets[0].getsockname()[1]
        if ready is not None:
            ready(port)
        await stop.wait()
        await server.shutdown()
        # Let the last end events, and the last chunks of /v1 answers, reach
        # the sockets before connections close.
        for _ in range(500):
            answering = [c.http_task for c in server.front_connections if c.http_task is not None and not c.http_task.done()]
            if not any(len(o) for o in server.outboxes) and not answering:
                break
            await asyncio.sleep(0.01)

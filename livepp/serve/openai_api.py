"""The OpenAI-compatible API of ``livepp serve``: ``/v1/chat/completions`` and
``/v1/completions``, streamed (server-sent events ending with ``data: [DONE]``)
or not.

Every request runs like a websocket ``generate``: through the service's
engine (the continuous batch of a local model, or the upstream engine of a
gateway), its own monitor (the server's default policies plus the request's
``livepp.policies``) and the live list of the page. ``n`` > 1 decodes the
samples as rows of one batch. The request's slot is freed when its
generation ends, whether or not its client has read the answer; a client
that goes away stops its request before the next forward pass (a gateway
closes the upstream request). Shapes: :mod:`livepp.serve.openai_schema`.
"""

from __future__ import annotations

import asyncio
import sys
import traceback
import uuid
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable

import orjson
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from livepp.core.batch_monitor import MonitoredBatch
from livepp.core.events import Event, TokenEvent
from livepp.core.monitor import Monitor
from livepp.core.params import DEFAULT_MAX_NEW_TOKENS, EngineBusy, LiveppError, PromptTooLong
from livepp.core.policies import parse_policy
from livepp.core.tracker import Tracker
from livepp.serve.jobs import ClientError, Job, JobEngine
from livepp.serve.openai_models import ChatCompletionRequest, CompletionRequest
from livepp.engines.protocol import ScoreSpec, is_token_ids
from livepp.serve.openai_schema import ChoiceBuilder, OpenAIError, ParsedRequest, envelope, now, parse_request, usage
from livepp.serve.openai_scoring import ScoredPrompt

if TYPE_CHECKING:
    from livepp.serve.service import Service

__all__ = ["OpenAIApi", "OrjsonResponse", "openai_error", "error_response"]

# The websocket API's parameter names as the OpenAI API calls them.
_OPENAI_NAMES = {"max_new_tokens": "max_tokens", "policies": "livepp.policies"}
_END = object()


def openai_error(exc: BaseException, *, prompt_param: str = "messages") -> OpenAIError:
    """The OpenAI-shaped error for a failure, chosen by its type."""
    from livepp.engines.remote import RemoteError

    if isinstance(exc, OpenAIError):
        return exc
    if isinstance(exc, ClientError):
        status = 429 if exc.code == "busy" else 503
        return OpenAIError(status, str(exc), type="server_error", code=exc.code)
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


class OrjsonResponse(JSONResponse):
    """JSON written by orjson: fast, UTF-8 kept, NaN and infinity as null (JSON has neither)."""

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content) + b"\n"


def error_response(error: OpenAIError, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


class _Emit:
    """A monitor sink that hands one row's events to the event loop."""

    def __init__(self, emit: Callable[[int, Any], None], row: int) -> None:
        self.put, self.row = emit, row

    def emit(self, event: Event) -> None:
        self.put(self.row, event)


class OpenAIApi:
    def __init__(self, service: "Service") -> None:
        self.service = service
        self.created = now()

    def model_card(self) -> dict[str, Any]:
        return {"id": self.service.engine.name, "object": "model", "created": self.created, "owned_by": "livepp"}

    def _engine_for(self, kind: str) -> Any:
        engine = self.service.engine
        # A gateway asks its upstream through the same API the client used.
        if getattr(engine, "kind", None) == "openai" and getattr(engine, "api", kind) != kind:
            engine = engine.with_api(kind)
        return engine

    # ---- one completion --------------------------------------------------------
    async def complete(self, kind: str, body: ChatCompletionRequest | CompletionRequest, request: Request) -> Response:
        service, config = self.service, self.service.config
        default_max = min(DEFAULT_MAX_NEW_TOKENS, config.max_new_tokens_cap)
        req = parse_request(kind, body, models=(service.engine.name,), default_max_tokens=default_max,
                            max_n=max(1, min(config.max_batch, 16)), max_step_regex=config.max_stop_length)
        over = service.over_limit(req.params, len(req.policies), names=_OPENAI_NAMES)
        if over is not None:
            raise OpenAIError(400, over[1], param=over[0])
        engine = self._engine_for(kind)
        if getattr(engine, "kind", None) == "openai" and (req.echo or req.prompt_logprobs is not None
                                                          or any(is_token_ids(p) for p in req.prompts)):
            return await self._pass_through(engine, kind, body, req)
        prefix = "chatcmpl-" if kind == "chat" else "cmpl-"
        try:
            job = service.admit(Job(prefix + uuid.uuid4().hex[:24]))
        except ClientError as exc:
            raise openai_error(exc) from None
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple[Any, Any]] = asyncio.Queue()
        if getattr(engine, "kind", None) == "openai":
            # A gateway: the upstream streams are read in this event loop.
            def put(row: int | None, item: Any) -> None:
                events.put_nowait((row, item))

            async def upstream() -> None:
                failure: BaseException | None = None
                try:
                    await self._generate_remote(job, engine, kind, req, put)
                except BaseException as exc:  # noqa: BLE001 - reported to the client
                    failure = exc
                finally:
                    service.release(job)  # the generation has ended, read or not
                    put(_END, failure)

            job.done = loop.create_task(upstream())
        else:
            def emit(row: int | None, item: Any) -> None:
                loop.call_soon_threadsafe(events.put_nowait, (row, item))

            def work(job: Job) -> None:
                failure: BaseException | None = None
                try:
                    self._generate(job, kind, req, emit)
                except BaseException as exc:  # noqa: BLE001 - reported to the client
                    failure = exc
                finally:
                    emit(_END, failure)

            # The slot is freed (release) when the generation ends, not when the client has read it.
            service.run_job(job, work, on_end=lambda: None)
        answer = _Answer(service, req, job, events)
        watcher = loop.create_task(_stop_on_disconnect(request, job))
        try:
            response = await answer.head()
        except BaseException:
            watcher.cancel()
            job.stop("cancelled")
            raise
        if isinstance(response, StreamingResponse):
            watcher.cancel()  # the streaming response watches for the client leaving itself
        else:
            watcher.cancel()
            job.stop("cancelled")  # a no-op after a normal end
        return response

    async def _pass_through(self, engine: Any, kind: str, body: ChatCompletionRequest | CompletionRequest, req: ParsedRequest) -> Response:
        """A gateway's scoring request (echo, prompt_logprobs, token ids): the
        upstream engine scores it; its answer, or its error, comes back as it is.
        (Nothing is generated to monitor beyond what the upstream returns.)"""
        from livepp.serve.passthrough import forward

        try:
            job = self.service.admit(Job(("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]))
        except ClientError as exc:
            raise openai_error(exc) from None
        payload = body.model_dump(exclude_unset=True, exclude={"livepp"}) | {"model": engine.model}
        try:
            return await forward(engine, "/chat/completions" if kind == "chat" else "/completions", payload, stream=req.stream,
                                 on_end=lambda: self.service.release(job))
        except BaseException:
            self.service.release(job)
            raise

    async def _generate_remote(self, job: Job, engine: Any, kind: str, req: ParsedRequest, put: Callable[[Any, Any], None]) -> None:
        """Event loop: every choice one upstream stream, read together, each monitored."""
        from livepp.api import prompt_rows
        from livepp.serve.gateway import monitored

        service = self.service
        rows, row_params = prompt_rows(req.prompts, req.n, req.params)
        specs = list(service.config.default_policies) + req.policies
        streams, runs = [], []
        for i, (prompt, params) in enumerate(zip(rows, row_params)):
            stream = service.upstream.open(engine, prompt, params, top_k=params.top_logprobs)
            streams.append(stream)
            job.streams.append(stream)  # a stop (cancel, client gone, shutdown) aborts it
            metrics = service.metrics.sink(job.id if len(rows) == 1 else f"{job.id}/{i}", kind, job.accepted_at)
            monitor = Monitor(policies=[parse_policy(s) for s in specs], sinks=[_Emit(put, i), metrics], keep_events=False,
                              tracker_factory=lambda: Tracker(window=req.window), steps=req.steps)
            session = monitor.session(model=engine.name, params=params.to_dict() | {"window": req.window}, engine=engine.kind)
            runs.append(monitored(stream, session, lambda: job.stop_reason))
        try:
            await asyncio.gather(*runs)
        finally:
            for stream in streams:
                if stream.finish_reason is None:
                    stream.abort()  # a failed sibling ends the request: its other streams stop too

    def _generate(self, job: Job, kind: str, req: ParsedRequest, emit: Callable[[Any, Any], None]) -> None:
        """Worker thread: decode every choice, monitored; events go to ``emit``."""
        from livepp.api import prompt_rows

        service = self.service
        engine = JobEngine(self._engine_for(kind), service.runner, job)
        rows, row_params = prompt_rows(req.prompts, req.n, req.params)
        specs = list(service.config.default_policies) + req.policies
        settings = {"window": req.window}
        scoring: dict[str, Any] = {}
        if req.echo or req.scores_prompt or any(is_token_ids(r) for r in rows):
            rows, scoring = self._prompts(kind, req, rows, emit)

        def tracker() -> Tracker:
            return Tracker(window=req.window)

        if len(rows) == 1:
            one = {"score": scoring["scores"][0], "on_scores": scoring["on_scores"]} if scoring else {}
            stream = engine.open(rows[0], row_params[0], **one)  # validates before any compute
            monitor = Monitor(policies=[parse_policy(s) for s in specs], keep_events=False, tracker_factory=tracker, steps=req.steps,
                              sinks=[_Emit(emit, 0), service.metrics.sink(job.id, kind, job.accepted_at)])
            monitor.run(stream, model=engine.name, params=row_params[0].to_dict() | settings, engine=engine.kind)
            return
        metrics = [service.metrics.sink(f"{job.id}/{i}", kind, job.accepted_at) for i in range(len(rows))]
        batch = MonitoredBatch(engine.open_batch(rows, row_params, **scoring), row_params, model=engine.name, engine=engine.kind,
                               policies=lambda i: [parse_policy(s) for s in specs], tracker_factory=tracker,
                               run_params=settings, steps=req.steps)
        for row, event in batch:
            metrics[row].emit(event)
            emit(row, event)


    def _prompts(self, kind: str, req: ParsedRequest, rows: list[Any], emit: Callable[[Any, Any], None]) -> tuple[list[Any], dict[str, Any]]:
        """Worker thread: each row's prompt as token ids (given, or encoded as
        the row would be) with its texts, echoed or scored; the options that
        make the engine score the prompts as it prefills them."""
        scheduler = self.service.scheduler
        if scheduler is None:
            raise LiveppError("echo, prompt_logprobs and token-id prompts need a local torch or llama.cpp model "
                              "served with continuous batching")
        encoder = scheduler.encoder
        ids = [list(r) if is_token_ids(r) else encoder.encode(r, raw=kind == "completions") for r in rows]
        prompts = []
        for row, row_ids in zip(rows, ids):
            pieces = encoder.pieces(row_ids)
            prompts.append(ScoredPrompt(row_ids, pieces, row if isinstance(row, str) else "".join(pieces),
                                        path=getattr(scheduler.engine, "scoring_path", None) if req.scores_prompt else None))
        if not req.scores_prompt:
            for i, prompt in enumerate(prompts):
                emit(i, prompt)  # echoed as it is
            return ids, {}

        def on_scores(row: int, scores: list[Any]) -> None:
            prompt = prompts[row]
            prompt.add(scores, encoder.token_texts)
            if prompt.complete:
                emit(row, prompt)

        for i, prompt in enumerate(prompts):
            if prompt.complete:  # one token: nothing to score
                emit(i, prompt)
        # The OpenAI shapes carry no entropy; only vLLM's prompt_logprobs carry a rank.
        spec = ScoreSpec(first=1, top=req.prompt_top, generate=req.generate, entropy=False, rank=req.prompt_logprobs is not None)
        return ids, {"scores": [spec] * len(rows), "on_scores": on_scores}


async def _stop_on_disconnect(request: Request, job: Job) -> None:
    """Stop the job when the client goes away (before the next forward pass)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            job.stop("cancelled")
            return


class _Answer:
    """One request's events as its HTTP answer: a JSON body at the end, or a
    stream of server-sent events that starts with the first token (so a
    request refused before any token gets an HTTP error, not a broken stream)."""

    def __init__(self, service: "Service", req: ParsedRequest, job: Job, events: asyncio.Queue) -> None:
        self.service, self.req, self.job, self.events = service, req, job, events
        self.builders = [ChoiceBuilder(i, req) for i in range(req.rows)]
        self.head_fields = envelope(req, job.id, now(), chunk=req.stream)
        self.pending: list[bytes] = []  # chunks before the stream starts
        self.failure: BaseException | None = None
        self.ended = False
        self.started = False  # a token has come: the stream may start

    def _chunk(self, part: dict[str, Any]) -> bytes:
        # orjson: fast, UTF-8 kept, and NaN or infinity written as null (JSON has neither).
        return b"data: " + orjson.dumps(self.head_fields | part) + b"\n\n"

    def _take(self, row: Any, item: Any) -> None:
        if row is _END:
            self.ended, self.failure = True, item
            return
        part = self.builders[row].on_event(item)
        if part is not None and self.req.stream:
            self.pending.append(self._chunk({"choices": [part]}))
            if isinstance(item, TokenEvent):
                self.started = True

    async def _next(self) -> bool:
        """Take the next event into the builders, and every other one already
        waiting (a client behind gets them in one write); False once the
        generation has ended."""
        self._take(*await self.events.get())
        while not self.ended and not self.events.empty():
            self._take(*self.events.get_nowait())
        return not self.ended

    async def head(self) -> Response:
        headers = {"X-Request-Id": self.job.id}
        while not self.started and await self._next():
            pass
        if self.failure is not None and not self.started:
            return self._error_response(headers)
        if not self.req.stream:
            body = self.head_fields | {"choices": [b.choice() for b in self.builders], "usage": usage(self.builders, self.req.n)}
            return OrjsonResponse(body, headers=headers)
        return StreamingResponse(self._stream(), media_type="text/event-stream", headers=headers | {"Cache-Control": "no-cache"})

    def _error_response(self, headers: dict[str, str]) -> JSONResponse:
        failure = self.failure
        if not isinstance(failure, Exception):
            raise failure  # type: ignore[misc]  # KeyboardInterrupt and the like go on
        error = openai_error(failure, prompt_param="messages" if self.req.kind == "chat" else "prompt")
        if error.status >= 500 and error.code == "internal":
            traceback.print_exception(failure, file=sys.stderr)
        return error_response(error, headers)

    async def _stream(self) -> AsyncIterator[bytes]:
        self.service.streaming += 1
        try:
            if self.req.kind == "chat":
                self.pending[:0] = [self._chunk({"choices": [{"index": b.index, "delta": {"role": "assistant", "content": ""},
                                                              "logprobs": None, "finish_reason": None}]}) for b in self.builders]
            while True:
                if self.pending:
                    out = b"".join(self.pending)
                    self.pending.clear()
                    yield out
                if self.ended:
                    break
                await self._next()
            if self.failure is not None:
                if not isinstance(self.failure, Exception):
                    raise self.failure
                error = openai_error(self.failure, prompt_param="messages" if self.req.kind == "chat" else "prompt")
                if error.status >= 500 and error.code == "internal":
                    traceback.print_exception(self.failure, file=sys.stderr)
                yield b"data: " + orjson.dumps(error.body()) + b"\n\n"
                return
            if self.req.include_usage:
                yield self._chunk({"choices": [], "usage": usage(self.builders, self.req.n)})
            yield b"data: [DONE]\n\n"
        finally:
            self.service.streaming -= 1
            self.job.stop("cancelled")  # the client left mid-stream: stop before the next forward pass (a no-op after the end)

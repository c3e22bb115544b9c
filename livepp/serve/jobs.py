"""Server jobs: the FIFO model runner, a request's job and its token stream.

Every model step of every request goes through one :class:`ModelRunner`
thread, so the model is never used by two threads at once. A :class:`Job`
is one request: stopping it (cancel, disconnect, shutdown) ends its stream
before the next forward pass and wakes a remote read at once; its last
messages (``final``) are sent only after it has left its connection's table.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from livepp.core.events import Event, TokenRecord, to_json_dict
from livepp.serve.outbox import Outbox
from livepp.core.params import EngineBusy, GenerationParams, LiveppError, PromptTooLong
from livepp.core.stream import BatchTokenStream, SequentialBatch, TokenStream, WrappedStream
from livepp.engines.protocol import Engine, Prompt

__all__ = ["ClientError", "ModelRunner", "RunnerStream", "Job", "JobStream", "JobEngine", "OutboxSink", "error_code", "one_line"]


class ModelRunner:
    """Runs model steps one at a time, first come first served."""

    def __init__(self) -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="livepp-model")

    def call(self, fn: Any, *args: Any) -> Any:
        return self._pool.submit(fn, *args).result()

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class RunnerStream(WrappedStream):
    """A serial engine's token stream pulled through the runner, one token
    per turn; closing it closes the inner stream on the runner (no further
    forward pass)."""

    def __init__(self, runner: ModelRunner, stream: TokenStream) -> None:
        super().__init__(stream)
        self.runner = runner

    def __next__(self) -> TokenRecord:
        record = self.runner.call(next, self.inner, _END)
        if record is _END:
            raise StopIteration
        return record

    def close(self) -> None:
        self.runner.call(self.inner.close)


_END = object()


class ClientError(Exception):
    """A request refused with an error code (the README lists them), and
    the id of the request it refuses when it has one."""

    def __init__(self, code: str, message: str, request_id: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.request_id = request_id


@dataclass(eq=False)  # identity, so jobs can live in a set
class Job:
    id: str
    accepted_at: float = field(default_factory=time.perf_counter)
    stop_reason: str | None = None
    done: asyncio.Future | None = None
    # The request's last messages: sent only after the job has left its
    # connection's table, so a client that reuses the id or sends its next
    # request on seeing them is never refused as a duplicate or over limit.
    final: list[dict[str, Any]] = field(default_factory=list)
    # Remote streams to wake when the job is stopped from the event loop.
    streams: list[Any] = field(default_factory=list)

    def stop(self, reason: str) -> None:
        self.stop_reason = self.stop_reason or reason
        for stream in list(self.streams):
            stream.abort()  # a remote read waiting for its next token wakes now


class OutboxSink:
    """Sends monitor events to a client's outbox, tagged with the request id."""

    def __init__(self, loop: asyncio.AbstractEventLoop, outbox: Outbox, request_id: str, job: "Job | None" = None) -> None:
        self.loop, self.outbox, self.request_id, self.job = loop, outbox, request_id, job

    def emit(self, event: Event) -> None:
        data = to_json_dict(event)
        data["id"] = self.request_id
        if event.type == "end" and self.job is not None:
            self.job.final.append(data)  # sent when the job is released
            return
        self.loop.call_soon_threadsafe(self.outbox.put, data)


def _pull(job: Job, inner: Any, close: Callable[[], None]) -> Any:
    """The next item of ``inner``, unless the job was stopped: checked before
    each pull, so before the forward pass of the next token."""
    if job.stop_reason is not None:
        close()
        raise StopIteration
    try:
        return next(inner)
    except Exception:  # StopIteration included
        if job.stop_reason is None:
            raise
        # The stop woke a waiting remote read; that is a stop, not a failure.
        raise StopIteration from None


class JobStream(WrappedStream):
    """A request's token stream that ends as soon as its job is stopped
    (cancel, disconnect, shutdown), reporting that as its finish reason."""

    def __init__(self, stream: TokenStream, job: Job) -> None:
        super().__init__(stream)
        self.job = job
        self._stopped: str | None = None
        job.streams.append(stream)

    @property
    def finish_reason(self) -> str | None:
        return self._stopped or self.inner.finish_reason

    def __next__(self) -> TokenRecord:
        try:
            return _pull(self.job, self.inner, self.close)
        except StopIteration:
            self._stopped = self.job.stop_reason
            raise

    def close(self) -> None:
        self.inner.close()
        if self.inner in self.job.streams:
            self.job.streams.remove(self.inner)


class JobBatch:
    """A request's batch stream that ends as soon as its job is stopped."""

    def __init__(self, batch: BatchTokenStream, job: Job) -> None:
        self.inner, self.job = batch, job
        self.prompt_token_ids = batch.prompt_token_ids
        job.streams.append(batch)

    @property
    def finish_reasons(self) -> list[str | None]:
        return self.inner.finish_reasons

    def __iter__(self) -> "JobBatch":
        return self

    def __next__(self) -> tuple[int, TokenRecord]:
        return _pull(self.job, self.inner, self.close)

    def stop(self, index: int, reason: str = "policy") -> None:
        self.inner.stop(index, reason)

    def __getattr__(self, name: str) -> Any:
        if name == "inject":  # only when the inner batch can take text
            return getattr(self.inner, "inject")
        raise AttributeError(name)

    def close(self) -> None:
        self.inner.close()
        if self.inner in self.job.streams:
            self.job.streams.remove(self.inner)

    def abort(self) -> None:
        self.inner.abort()


class JobEngine:
    """The server's engine as one job sees it: every stream it opens ends
    when the job is stopped. A serial engine's every step (prompt encoding
    included) goes through the runner and a batch runs its rows one after
    another; an engine that schedules itself (the continuous batch, a remote
    endpoint) opens streams and batches directly. ``on_queued(position)`` is
    told when a stream has to wait for room in the batch."""

    serial = False

    def __init__(self, engine: Engine, runner: ModelRunner, job: Job, *, on_queued: Callable[[int], None] | None = None) -> None:
        self.engine, self.runner, self.job = engine, runner, job
        self.name, self.kind = engine.name, engine.kind
        self.on_queued = on_queued

    def open(self, prompt: Prompt, params: GenerationParams, **scoring: Any) -> JobStream:
        """A stream of the job; ``scoring`` (``score``, ``on_scores``) goes to
        an engine that scores prompts (the continuous batch)."""
        if self.engine.serial:
            _no_scoring(scoring)
            # engine.open validates (and encodes) before any compute.
            stream: TokenStream = RunnerStream(self.runner, self.runner.call(self.engine.open, prompt, params))
        else:
            stream = self.engine.open(prompt, params, **scoring) if scoring else self.engine.open(prompt, params)
            self._queued(stream)
        return JobStream(stream, self.job)

    def open_batch(self, prompts: Sequence[Prompt], params: Sequence[GenerationParams], **scoring: Any) -> BatchTokenStream:
        if self.engine.serial:
            _no_scoring(scoring)
            return SequentialBatch([functools.partial(self.open, pr, p) for pr, p in zip(prompts, params)])
        batch = self.engine.open_batch(prompts, params, **scoring) if scoring else self.engine.open_batch(prompts, params)
        self._queued(batch)
        return JobBatch(batch, self.job)

    def _queued(self, stream: Any) -> None:
        # The continuous batch's streams say where they wait (None: running).
        position = getattr(stream, "queue_position", None) if self.on_queued is not None else None
        if position is not None:
            self.on_queued(position)


def _no_scoring(scoring: dict[str, Any]) -> None:
    if any(v is not None for v in scoring.values()):
        raise LiveppError("scoring a prompt needs a local torch or llama.cpp model served with continuous batching")


def error_code(exc: BaseException) -> str:
    """The error code for a failure, chosen by its type, never by its text."""
    from livepp.engines.remote import RemoteError

    if isinstance(exc, EngineBusy):
        return "busy"
    if isinstance(exc, PromptTooLong):
        return "prompt_too_long"
    if isinstance(exc, RemoteError):
        return "upstream_error"
    if isinstance(exc, LiveppError):
        return "bad_params"
    return "internal"


def one_line(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, LiveppError) else f"{type(exc).__name__}: {exc}"

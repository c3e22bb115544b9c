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
from dataclasses import dataclass, field
from typing import Any, Iterator

from .decoder import Decoder
from .events import Event, TokenRecord, to_json_dict
from .outbox import Outbox
from .params import GenerationParams, LiveppError

__all__ = ["ModelRunner", "Job", "JobStream", "RunnerEngine", "OutboxSink", "error_code", "one_line"]


class ModelRunner:
    """Runs model steps one at a time, first come first served."""

    def __init__(self) -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="livepp-model")

    def call(self, fn: Any, *args: Any) -> Any:
        return self._pool.submit(fn, *args).result()

    def iterate(self, source: Iterator[TokenRecord]) -> Iterator[TokenRecord]:
        """Pull ``source`` through the runner, one token per turn."""
        sentinel = object()
        try:
            while True:
                record = self.call(next, source, sentinel)
                if record is sentinel:
                    return
                yield record
        finally:
            # Closing the decoder generator ends it without another forward pass.
            self.call(source.close)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


@dataclass(eq=False)  # identity, so jobs can live in a set
class Job:
    id: str
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
            abort = getattr(stream, "abort", None)
            if abort is not None:
                abort()  # a remote read waiting for its next token wakes now


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


class JobStream:
    """A request's token source that ends as soon as its job is stopped
    (cancel, disconnect, shutdown), reporting that as its finish reason.

    The monitor reads ``finish_reason`` and ``tokens_after_stop`` from its
    source, so the wrapper passes the inner stream's values through."""

    def __init__(self, source: Iterator[TokenRecord], job: Job) -> None:
        self._it = source
        self.job = job
        self._stopped: str | None = None
        job.streams.append(source)

    @property
    def finish_reason(self) -> str | None:
        return self._stopped or getattr(self._it, "finish_reason", None)

    @property
    def tokens_after_stop(self) -> int | None:
        return getattr(self._it, "tokens_after_stop", None)

    @property
    def engine_finish_reason(self) -> str | None:
        return getattr(self._it, "engine_finish_reason", None)

    def __iter__(self) -> "JobStream":
        return self

    def __next__(self) -> TokenRecord:
        # Checked before each pull, so before the forward pass of the next token.
        if self.job.stop_reason is not None:
            self._stopped = self.job.stop_reason
            self.close()
            raise StopIteration
        try:
            return next(self._it)
        except Exception:  # StopIteration included
            if self.job.stop_reason is None:
                raise
            # The stop woke a waiting remote read; that is a stop, not a failure.
            self._stopped = self.job.stop_reason
            raise StopIteration from None

    def close(self) -> None:
        close = getattr(self._it, "close", None)
        if close is not None:
            close()
        if self._it in self.job.streams:
            self.job.streams.remove(self._it)


class RunnerEngine:
    """The local decoder as routing sees it, with every model step through the runner."""

    def __init__(self, decoder: Decoder, runner: ModelRunner, job: Job) -> None:
        self.decoder, self.runner, self.job = decoder, runner, job
        self.loaded = decoder.loaded

    def encode(self, prompt: str, *, raw: bool = False) -> list[int]:
        return self.runner.call(functools.partial(self.decoder.encode, prompt, raw=raw))

    def stream(self, prompt_ids: Any, params: GenerationParams) -> JobStream:
        return JobStream(self.runner.iterate(self.decoder.stream(prompt_ids, params)), self.job)


def error_code(exc: BaseException) -> str:
    """The error code for a failure, chosen by its type, never by its text."""
    from .decoder import PromptTooLong
    from .remote import RemoteError

    if isinstance(exc, PromptTooLong):
        return "prompt_too_long"
    if isinstance(exc, RemoteError):
        return "upstream_error"
    if isinstance(exc, LiveppError):
        return "bad_params"
    return "internal"


def one_line(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, LiveppError) else f"{type(exc).__name__}: {exc}"

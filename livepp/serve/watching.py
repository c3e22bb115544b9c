"""The service's ``watch`` request: proxy-model PPL of text the client sends
as it goes (``livepp watch`` over the websocket), scored by the server's
local model.

  → {"type":"watch","id","prompt":str|null,"chat":bool,"policies":[SPEC,...],"steps":bool|REGEX,"text":str}
  → {"type":"text","id","text":str}             more text, as it arrives
  → {"type":"text","id","done":true}            the text is complete
  ← start / token / policy / step / end events, as ``livepp watch --json``

The text is scored as it arrives, each token once; the end (after ``done``)
equals ``livepp score --prompt P --target TEXT`` on the whole text.
"""

from __future__ import annotations

import queue
from typing import Any, Iterator

from livepp.core.monitor import Monitor
from livepp.core.params import GenerationParams, LiveppError
from livepp.core.policies import parse_policy
from livepp.core.stream import WrappedStream
from livepp.serve.jobs import ClientError, Job, OutboxSink, error_code, one_line
from livepp.serve.ws_protocol import Message, SessionHandle, WatchRequest, parse_text, parse_watch

__all__ = ["start_watch", "add_text", "MAX_WATCH_CHARS"]

MAX_WATCH_CHARS = 1_000_000  # text per watch request
_DONE = object()


def _proxy_model(session: SessionHandle) -> Any:
    """What scores watched text: the continuous batch (a fed row of it, on
    torch or llama.cpp), else the server's local torch model."""
    service = session.service
    if service.scheduler is not None:
        return service.scheduler
    loaded = getattr(service.engine, "loaded", None)
    if loaded is None:
        raise ClientError("bad_params", "watch needs a local model on this server (not a remote engine)")
    return loaded


class _WatchText:
    """A watch request's text as the client sends it: a queue the scoring
    thread reads, and how much has come."""

    def __init__(self) -> None:
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.chars = 0


def start_watch(session: SessionHandle, message: Message) -> None:
    request = parse_watch(message.data, session.limits)
    policies = [parse_policy(s) for s in [*session.service.config.default_policies, *request.policies]]
    loaded = _proxy_model(session)
    text = _WatchText()
    if request.text:
        _add(text, request.text)
    session.start(message, _run_watch, loaded, request, policies, text, text=text)


def add_text(session: SessionHandle, message: Message) -> None:
    """More of a watch request's text (on the event loop thread)."""
    request_id = session.state.target(message, "running watch request")
    text = session.texts.get(request_id)
    if text is None:
        raise ClientError("bad_message", f"request {request_id!r} is not a watch request", request_id)
    chunk, done = parse_text(message.data)
    _add(text, chunk, done=done)


def _add(text: _WatchText, chunk: str | None, *, done: bool = False) -> None:
    if chunk:
        text.chars += len(chunk)
        if text.chars > MAX_WATCH_CHARS:
            raise ClientError("message_too_large", f"a watch request takes at most {MAX_WATCH_CHARS} characters of text")
        text.queue.put(chunk)
    if done:
        text.queue.put(_DONE)


def _texts(job: Job, text: _WatchText) -> Iterator[str]:
    """The client's text as it arrives, until done or the job is stopped."""
    while True:
        if job.stop_reason is not None:
            return
        try:
            item = text.queue.get(timeout=0.1)
        except queue.Empty:
            continue
        if item is _DONE:
            return
        yield item


class _WatchStream(WrappedStream):
    """The proxy's stream, ending with the job's stop (a cancel, a
    shutdown, a client gone) rather than eos when the job was stopped."""

    def __init__(self, inner: Any, job: Job) -> None:
        super().__init__(inner)
        self.job = job

    @property
    def finish_reason(self) -> str | None:
        return self.job.stop_reason or self.inner.finish_reason


def _run_watch(job: Job, sink: OutboxSink, session: SessionHandle, loaded: Any, request: WatchRequest, policies: list[Any],
               text: _WatchText) -> None:
    from livepp.engines.feeding import ScheduledScorer
    from livepp.engines.torch.proxy import BufferedText, ProxyStream

    params = GenerationParams(top_logprobs=5)
    scheduler = loaded if hasattr(loaded, "open_fed") else None
    try:
        # Read ahead: text that arrives while a pass runs is scored together in the next.
        chunks = BufferedText(_texts(job, text))
        if scheduler is not None:  # rows of the batch: its forward passes score the text
            scorer = ScheduledScorer(scheduler, params)
            try:
                proxy = ProxyStream(scheduler.text, chunks, params, prompt=request.prompt, chat=request.chat, scorer=scorer,
                                    tokenizer=scheduler.encoder.locked())
            except BaseException:
                scorer.close()
                raise
        else:
            proxy = ProxyStream(loaded, chunks, params, prompt=request.prompt, chat=request.chat)
        stream = _WatchStream(proxy, job)
    except LiveppError as exc:
        job.final.append({"type": "error", "id": job.id, "code": "bad_params", "message": one_line(exc)})
        return
    metrics = session.service.metrics.sink(job.id, "watch", job.accepted_at)
    monitor = Monitor(policies=policies, sinks=[sink, metrics], keep_events=False, steps=request.steps)
    try:
        monitor.run(stream, model=loaded.name, params={"proxy": loaded.name, "window": 32}, engine="proxy")
    except Exception as exc:
        job.final.append({"type": "error", "id": job.id, "code": error_code(exc), "message": one_line(exc)})
    finally:
        text.queue.put(_DONE)  # a policy stop: the reader thread ends too

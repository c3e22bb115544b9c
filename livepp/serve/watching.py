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

import asyncio
import queue
from typing import TYPE_CHECKING, Any, Iterator

from livepp.core.monitor import Monitor
from livepp.core.params import GenerationParams, LiveppError
from livepp.core.policies import parse_policy
from livepp.core.steps import step_rule
from livepp.core.stream import WrappedStream
from livepp.serve.jobs import ClientError, Job, OutboxSink, error_code, one_line
from livepp.serve.outbox import Outbox

if TYPE_CHECKING:
    from livepp.serve.app import LiveppServer

__all__ = ["start_watch", "add_text", "MAX_WATCH_CHARS"]

MAX_WATCH_CHARS = 1_000_000  # text per watch request
_DONE = object()


def proxy_model(server: "LiveppServer") -> Any:
    """The server's local torch model, which scores watched text."""
    engine = server.scheduler.engine if server.scheduler is not None else server.engine
    loaded = getattr(engine, "loaded", None)
    if loaded is None:
        raise ClientError("bad_params", "watch needs a local torch model on this server (not a remote or llama.cpp engine)")
    return loaded


def start_watch(server: "LiveppServer", data: dict[str, Any], jobs: dict[str, Job], outbox: Outbox,
                loop: asyncio.AbstractEventLoop) -> None:
    prompt, chat, text = data.get("prompt"), data.get("chat", False), data.get("text", "")
    if prompt is not None and (not isinstance(prompt, str) or not prompt.strip()):
        raise ClientError("bad_params", "prompt must be a non-empty string or null")
    if not isinstance(chat, bool) or not isinstance(text, str):
        raise ClientError("bad_params", "chat must be true or false and text a string")
    specs = data.get("policies") or []
    if not isinstance(specs, list) or not all(isinstance(s, str) for s in specs) or len(specs) > server.config.max_policies:
        raise ClientError("bad_params", f"policies must be a list of at most {server.config.max_policies} policy specs")
    try:
        policies = [parse_policy(s) for s in [*server.config.default_policies, *specs]]
        steps = step_rule(data.get("steps"), max_length=server.config.max_stop_length)
    except LiveppError as exc:
        raise ClientError("bad_params", str(exc)) from None
    loaded = proxy_model(server)
    job = server._new_job(data, jobs)
    job.text = queue.SimpleQueue()  # type: ignore[attr-defined]
    job.chars = 0  # type: ignore[attr-defined]
    if text:
        add_text(job, text)
    sink = OutboxSink(loop, outbox, job.id, job)
    server._launch(job, jobs, outbox, loop, _run_watch, server, loaded, prompt, chat, policies, steps, sink)


def add_text(job: Job, text: str | None, *, done: bool = False) -> None:
    """More of a watch request's text (on the event loop thread)."""
    source = getattr(job, "text", None)
    if source is None:
        raise ClientError("bad_message", f"request {job.id!r} is not a watch request")
    if text:
        job.chars += len(text)  # type: ignore[attr-defined]
        if job.chars > MAX_WATCH_CHARS:  # type: ignore[attr-defined]
            raise ClientError("message_too_large", f"a watch request takes at most {MAX_WATCH_CHARS} characters of text")
        source.put(text)
    if done:
        source.put(_DONE)


def _texts(job: Job) -> Iterator[str]:
    """The client's text as it arrives, until done or the job is stopped."""
    source: queue.SimpleQueue = job.text  # type: ignore[attr-defined]
    while True:
        if job.stop_reason is not None:
            return
        try:
            item = source.get(timeout=0.1)
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


def _run_watch(job: Job, server: "LiveppServer", loaded: Any, prompt: str | None, chat: bool, policies: list[Any],
               steps: str | None, sink: OutboxSink) -> None:
    from livepp.engines.torch.proxy import BufferedText, ProxyStream

    try:
        # Read ahead: text that arrives while a pass runs is scored together in the next.
        stream = _WatchStream(ProxyStream(loaded, BufferedText(_texts(job)), GenerationParams(top_logprobs=5), prompt=prompt,
                                          chat=chat), job)
    except LiveppError as exc:
        job.final.append({"type": "error", "id": job.id, "code": "bad_params", "message": one_line(exc)})
        return
    metrics = server.metrics.sink(job.id, "watch", job.accepted_at)
    monitor = Monitor(policies=policies, sinks=[sink, metrics], keep_events=False, steps=steps)
    try:
        monitor.run(stream, model=loaded.name, params={"proxy": loaded.name, "window": 32}, engine="proxy")
    except Exception as exc:
        job.final.append({"type": "error", "id": job.id, "code": error_code(exc), "message": one_line(exc)})
    finally:
        job.text.put(_DONE)  # type: ignore[attr-defined]  # a policy stop: the reader thread ends too

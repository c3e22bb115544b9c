"""One websocket connection of ``livepp serve`` (``/ws``): reads the client's
messages, runs its requests, and sends their events.

The protocol itself (parsing, limits, which ids run) is pure code in
:mod:`livepp.serve.ws_protocol`; this module moves messages and runs jobs.
Each request runs its monitor in a worker thread and hands its events to the
connection's :class:`~livepp.serve.outbox.Outbox` through the event loop; one
task sends the outbox, so a client that reads slowly gets coalesced token
events and never holds up a generation. A request ends with its ``end`` (or
``answer`` / ``vote``) or an ``error``, whatever happens inside it; a failure
of one request, or of one event's encoding, never ends the connection.
"""

from __future__ import annotations

import asyncio
import sys
import traceback
from typing import TYPE_CHECKING, Any, Callable

from livepp.core.events import dumps
from livepp.serve.generation import start_generate
from livepp.serve.jobs import ClientError, Job, OutboxSink
from livepp.serve.outbox import Outbox
from livepp.serve.reasoning import start_route, start_think
from livepp.serve.scoring import start_score
from livepp.serve.watching import add_text, start_watch
from livepp.serve.ws_protocol import ConnectionState, Limits, Message, parse_message

if TYPE_CHECKING:
    from starlette.websockets import WebSocket

    from livepp.serve.service import Service

__all__ = ["Session", "limits_of"]

_STARTERS: dict[str, Callable[["Session", Message], None]] = {
    "generate": start_generate, "route": start_route, "think": start_think, "watch": start_watch, "score": start_score,
}


def limits_of(service: "Service") -> Limits:
    c = service.config
    return Limits(max_message_bytes=c.max_message_bytes, max_new_tokens_cap=c.max_new_tokens_cap, max_stop_length=c.max_stop_length,
                  max_policies=c.max_policies, max_requests_per_connection=c.max_requests_per_connection,
                  default_policies=c.default_policies)


class Session:
    def __init__(self, service: "Service", websocket: "WebSocket") -> None:
        self.service, self.websocket = service, websocket
        self.limits = limits_of(service)
        self.state = ConnectionState(self.limits)
        self.outbox = Outbox(service.config.outbox_limit)
        self.jobs: dict[str, Job] = {}
        self.texts: dict[str, Any] = {}  # watch requests' text, by id
        self.loop = asyncio.get_running_loop()

    async def run(self) -> None:
        """Serve the connection until the client leaves (its requests are then cancelled)."""
        service = self.service
        service.sessions.add(self)
        sender = asyncio.create_task(self._send_loop())
        try:
            while True:
                message = await self.websocket.receive()
                if message["type"] == "websocket.disconnect":
                    break
                raw = message.get("text")
                self.handle(raw if raw is not None else message.get("bytes") or b"")
        finally:
            for job in self.jobs.values():
                job.stop("cancelled")
            pending = [j.done for j in self.jobs.values() if j.done is not None]
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
            sender.cancel()
            service.sessions.discard(self)

    def handle(self, raw: str | bytes) -> None:
        """One message from the client; a refusal or a bug of ours is told as
        an ``error`` and the connection stays open."""
        message: Message | None = None
        try:
            message = parse_message(raw, self.limits)
            if message.kind == "text":
                add_text(self, message)
            elif message.kind == "cancel":
                self.jobs[self.state.target(message)].stop("cancelled")
            else:
                _STARTERS[message.kind](self, message)
        except ClientError as exc:
            if exc.request_id is None and message is not None:
                exc.request_id = message.id  # the refusal names the request it refuses
            # A refused message's error may be dropped if the client does not
            # read (a flood of bad messages cannot grow memory).
            self.outbox.put({"type": "error", "id": exc.request_id, "code": exc.code, "message": str(exc)}, droppable=True)
        except Exception as exc:  # a bug of ours: say so, keep the connection
            traceback.print_exc(file=sys.stderr)
            self.outbox.put({"type": "error", "id": None, "code": "internal", "message": f"{type(exc).__name__}: {exc}"}, droppable=True)

    def start(self, message: Message, fn: Callable[..., None], *args: Any, end_is_final: bool = True, text: Any = None) -> None:
        """Run ``fn(job, sink, self, *args)`` as the request ``message`` opens.
        With ``end_is_final`` the stream's ``end`` is the request's last word
        (sent once the request has left this connection's table, so a client
        may reuse the id on seeing it); otherwise ``fn`` appends its own."""
        service = self.service
        refused = service.refusal()
        request_id = self.state.open(message)  # duplicate ids and the per-connection limit first
        if refused is not None:
            self.state.close(request_id)
            refused.request_id = request_id
            raise refused
        job = service.admit(Job(request_id))
        self.jobs[request_id] = job
        if text is not None:
            self.texts[request_id] = text
        sink = OutboxSink(self.loop, self.outbox, request_id, job if end_is_final else None)

        def ended() -> None:
            # On the loop: leave the tables first, then say the last word.
            self.jobs.pop(request_id, None)
            self.texts.pop(request_id, None)
            self.state.close(request_id)
            for event in job.final:
                self.outbox.put(event)

        service.run_job(job, _guarded, fn, sink, self, *args, on_end=ended)

    async def _send_loop(self) -> None:
        while True:
            event = await self.outbox.get()
            try:
                text = dumps(event)
            except Exception as exc:  # one event that cannot be encoded costs only itself
                text = dumps({"type": "error", "id": event.get("id") if isinstance(event.get("id"), str) else None,
                              "code": "internal", "message": f"an event could not be encoded: {type(exc).__name__}"})
            try:
                await self.websocket.send_text(text)
            except Exception:  # the client is gone; the receive side ends the session
                return


def _guarded(job: Job, fn: Callable[..., None], sink: OutboxSink, session: Session, *args: Any) -> None:
    """Worker thread: the request, with a last word whatever happens inside it."""
    try:
        fn(job, sink, session, *args)
    except Exception as exc:  # a bug of ours: the request ends with an error, the connection stays
        traceback.print_exc(file=sys.stderr)
        job.final.append({"type": "error", "id": job.id, "code": "internal", "message": f"{type(exc).__name__}: {exc}"})
    if not job.final:
        job.final.append({"type": "error", "id": job.id, "code": "internal", "message": "the request ended without a result"})

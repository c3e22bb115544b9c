"""One port for the page, the websocket API and the OpenAI-compatible API.

websockets' server answers the page, ``/ws`` and the small GET endpoints,
but its ``process_request`` hook can only return a complete response to a
GET: it cannot read a POST body or stream server-sent events. So every
connection starts in :class:`FrontConnection`, which reads the request head
first: a GET outside ``/v1/`` goes on to websockets untouched (the buffered
bytes are replayed to it), anything else is a plain HTTP/1.1 exchange
handled by ``http_handler(request, reply)``. Each such exchange answers one
request and closes the connection (``Connection: close``).
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any, Awaitable, Callable
from urllib.parse import urlsplit

from websockets.asyncio.server import ServerConnection

__all__ = ["HttpRequest", "HttpReply", "bearer", "FrontConnection", "MAX_HEAD_BYTES", "HEAD_TIMEOUT_S"]

MAX_HEAD_BYTES = 64 * 1024
HEAD_TIMEOUT_S = 30.0

_REASONS = {200: "OK", 204: "No Content", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
            405: "Method Not Allowed", 408: "Request Timeout", 411: "Length Required", 413: "Content Too Large",
            429: "Too Many Requests", 431: "Request Header Fields Too Large", 500: "Internal Server Error",
            501: "Not Implemented", 502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout"}


@dataclass
class HttpRequest:
    method: str
    target: str
    headers: list[tuple[str, str]]  # names lower-cased, in arrival order
    body: bytes = b""

    @property
    def path(self) -> str:
        return urlsplit(self.target).path

    def header(self, name: str) -> str | None:
        values = self.header_all(name)
        return values[0] if values else None

    def header_all(self, name: str) -> list[str]:
        name = name.lower()
        return [v for k, v in self.headers if k == name]


def bearer(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer TOKEN`` header."""
    if authorization and authorization.startswith("Bearer "):
        return authorization[len("Bearer "):]
    return None


class HttpReply:
    """The answer to one request on a transport: a whole body
    (:meth:`send`) or a stream (:meth:`start`, :meth:`write`, :meth:`end`).
    ``gone`` is set when the peer goes away."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.gone = asyncio.Event()
        self.started = False
        self.headers: list[tuple[str, str]] = []  # sent with every answer (e.g. CORS)
        self._paused = False
        self._drained: list[asyncio.Future[None]] = []

    def _head(self, status: int, headers: list[tuple[str, str]]) -> bytes:
        lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}", "Connection: close", "Server: livepp"]
        lines += [f"{k}: {v}" for k, v in [*self.headers, *headers]]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def send(self, status: int, body: bytes, content_type: str, headers: list[tuple[str, str]] = ()) -> None:  # type: ignore[assignment]
        """A complete response; the connection closes once it is written."""
        if self.started or self.transport.is_closing():
            return
        self.started = True
        head = self._head(status, [("Content-Type", content_type), ("Content-Length", str(len(body))), *headers])
        self.transport.write(head + body)
        self.transport.close()

    def send_json(self, status: int, value: Any, headers: list[tuple[str, str]] = ()) -> None:  # type: ignore[assignment]
        self.send(status, (json.dumps(value, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8"),
                  "application/json", headers)

    def start(self, status: int, content_type: str, headers: list[tuple[str, str]] = ()) -> None:  # type: ignore[assignment]
        """The head of a streamed response; its end is the connection's close."""
        self.started = True
        self.transport.write(self._head(status, [("Content-Type", content_type), ("Cache-Control", "no-cache"), *headers]))

    async def write(self, data: bytes) -> None:
        """Write and wait while the peer's buffer is full (a slow reader
        holds back its own stream, nobody else's)."""
        if self.transport.is_closing():
            return
        self.transport.write(data)
        while self._paused and not self.gone.is_set():
            waiter = asyncio.get_running_loop().create_future()
            self._drained.append(waiter)
            await waiter

    def end(self) -> None:
        self.transport.close()

    # flow control, from the connection
    def pause(self) -> None:
        self._paused = True

    def resume(self) -> None:
        self._paused = False
        for waiter in self._drained:
            if not waiter.done():
                waiter.set_result(None)
        self._drained.clear()

    def lost(self) -> None:
        self.gone.set()
        self.resume()


class FrontConnection(ServerConnection):
    """A websockets server connection that first looks at the request head;
    see the module docstring. ``http_handler`` serves what is not for
    websockets; ``max_body`` bounds a request body."""

    def __init__(self, *args: Any, http_handler: Callable[[HttpRequest, HttpReply], Awaitable[None]],
                 max_body: int, registry: set["FrontConnection"] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._http_handler = http_handler
        self._max_body = max_body
        self._registry = registry
        self._mode: str | None = None  # None (reading the head), "ws" or "http"
        self._buffer = bytearray()
        self._request: HttpRequest | None = None
        self._body_length = 0
        self._reply: HttpReply | None = None
        self._front_transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self.http_task: asyncio.Task[None] | None = None

    # ---- asyncio protocol ---------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._front_transport = transport  # type: ignore[assignment]
        if self._registry is not None:
            self._registry.add(self)
        self._timer = asyncio.get_running_loop().call_later(HEAD_TIMEOUT_S, self._timed_out)

    def data_received(self, data: bytes) -> None:
        if self._mode == "ws":
            super().data_received(data)
            return
        if self._mode == "http" and (self._request is None or self.http_task is not None):
            return  # an answer is on its way; ignore what follows
        self._buffer += data
        if self._mode is None:
            self._read_head()
        if self._mode == "http" and self._request is not None and self.http_task is None:
            self._read_body()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        if self._registry is not None:
            self._registry.discard(self)
        if self._mode == "ws":
            super().connection_lost(exc)
        elif self._reply is not None:
            self._reply.lost()

    def pause_writing(self) -> None:
        if self._mode == "ws":
            super().pause_writing()
        elif self._reply is not None:
            self._reply.pause()

    def resume_writing(self) -> None:
        if self._mode == "ws":
            super().resume_writing()
        elif self._reply is not None:
            self._reply.resume()

    def eof_received(self) -> bool | None:
        if self._mode == "ws":
            return super().eof_received()
        return None  # close our side too

    # ---- the request head and body ------------------------------------------
    def _read_head(self) -> None:
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buffer) > MAX_HEAD_BYTES:
                self._refuse(431, "request head too large")
            return
        first = bytes(self._buffer[: self._buffer.find(b"\r\n")]).decode("latin-1")
        parts = first.split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            self._refuse(400, "malformed request line")
            return
        method, target = parts[0], parts[1]
        if method == "GET" and not urlsplit(target).path.startswith("/v1/"):
            self._hand_to_websockets()
            return
        self._mode = "http"
        self._reply = HttpReply(self._front_transport)  # type: ignore[arg-type]
        headers: list[tuple[str, str]] = []
        for line in bytes(self._buffer[:end]).decode("latin-1").split("\r\n")[1:]:
            name, sep, value = line.partition(":")
            if not sep or not name or name != name.strip():
                self._refuse(400, "malformed header line")
                return
            headers.append((name.lower(), value.strip()))
        request = HttpRequest(method, target, headers)
        del self._buffer[: end + 4]
        if request.header("transfer-encoding") is not None:
            self._refuse(411, "send the body with a Content-Length, not chunked")
            return
        lengths = request.header_all("content-length")
        if len(lengths) > 1 or (lengths and not lengths[0].isdigit()):
            self._refuse(400, "bad Content-Length")
            return
        self._body_length = int(lengths[0]) if lengths else 0
        if self._body_length > self._max_body:
            self._refuse(413, f"request bodies are limited to {self._max_body} bytes")
            return
        if (request.header("expect") or "").lower() == "100-continue" and len(self._buffer) < self._body_length:
            self._front_transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # curl waits a second for this otherwise
        self._request = request

    def _read_body(self) -> None:
        assert self._request is not None and self._reply is not None
        if len(self._buffer) < self._body_length:
            return
        self._cancel_timer()
        self._request.body = bytes(self._buffer[: self._body_length])
        self._buffer.clear()
        self.http_task = asyncio.get_running_loop().create_task(self._serve(self._request, self._reply))

    async def _serve(self, request: HttpRequest, reply: HttpReply) -> None:
        try:
            await self._http_handler(request, reply)
        finally:
            if not reply.started:
                reply.send(500, b"no response\n", "text/plain")
            reply.end()

    def _hand_to_websockets(self) -> None:
        self._cancel_timer()  # websockets applies its own open timeout
        self._mode = "ws"
        buffered, self._buffer = bytes(self._buffer), bytearray()
        super().connection_made(self._front_transport)  # type: ignore[arg-type]
        super().data_received(buffered)

    def _refuse(self, status: int, message: str) -> None:
        self._mode = "http"
        self._request = None
        self._buffer.clear()
        reply = self._reply or HttpReply(self._front_transport)  # type: ignore[arg-type]
        self._reply = reply
        reply.send_json(status, {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": None}})

    def _timed_out(self) -> None:
        if self._mode != "ws" and self.http_task is None:
            self._refuse(408, f"no complete request within {HEAD_TIMEOUT_S:g} s")

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def abort_http(self) -> None:
        """Server shutdown: drop a connection that is idle or still sending
        its request (one being answered finishes its answer)."""
        if self._mode != "ws" and self.http_task is None and self._front_transport is not None:
            self._front_transport.close()

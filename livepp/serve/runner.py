"""Running the service: uvicorn (httptools for HTTP/1.1, the ``websockets``
library's sans-I/O protocol for ``/ws``) on one port, with what a public
service adds on top:

* a head (request line and headers) of at most ``MAX_HEAD_BYTES``, and a
  request (head and body) read within ``request_timeout`` seconds of its first
  byte (or of the connection, for the first request): a client that trickles
  its request cannot hold a connection slot;
* a connection whose writes stay paused (its client reads nothing) for
  ``send_timeout`` seconds is dropped, so its requests are cancelled and its
  buffered output freed; the generation itself never waits for a client;
* shutdown (Ctrl-C, SIGTERM or ``stop``): running requests end with reason
  "shutdown", their last messages get up to ``shutdown_grace`` seconds to
  reach clients that read (a connection whose writes stay paused for a second
  is dropped), then uvicorn closes the rest within a second: the process is
  out within ``shutdown_grace`` + about 1.5 s whatever its clients do
  (Python 3.12's ``Server.wait_closed`` waits for every open connection:
  none is left).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
from typing import Any, Callable, Iterator

from livepp.serve.service import Service

__all__ = ["serve_forever", "listen", "Interrupts", "MAX_HEAD_BYTES"]

MAX_HEAD_BYTES = 64 * 1024


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


class _HeadTooLarge(Exception):
    pass


def _protocols(send_timeout: float, request_timeout: float) -> tuple[type, type, set[Any]]:
    """uvicorn's HTTP and websocket protocols with the stall guard (and the
    head limit and request timeout for HTTP); the set of connections whose
    writes are paused now."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

    paused: set[Any] = set()

    class StallGuard:
        transport: asyncio.Transport
        _stall: asyncio.TimerHandle | None = None

        def pause_writing(self) -> None:
            super().pause_writing()  # type: ignore[misc]
            paused.add(self)
            if self._stall is None:
                self._stall = asyncio.get_running_loop().call_later(send_timeout, self._stalled)

        def resume_writing(self) -> None:
            self._unpause()
            super().resume_writing()  # type: ignore[misc]

        def connection_lost(self, exc: Exception | None) -> None:
            self._unpause()
            super().connection_lost(exc)  # type: ignore[misc]

        def _unpause(self) -> None:
            paused.discard(self)
            if self._stall is not None:
                self._stall.cancel()
                self._stall = None

        def _stalled(self) -> None:
            self._stall = None
            self.transport.abort()  # connection_lost follows: the app sees the client gone

    class Http(StallGuard, HttpToolsProtocol):  # type: ignore[misc]
        _head = 0
        _reading: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.BaseTransport) -> None:  # type: ignore[override]
            super().connection_made(transport)  # type: ignore[arg-type]
            self._read_by_deadline()

        def on_message_begin(self) -> None:
            self._head = 0
            self._read_by_deadline()
            super().on_message_begin()

        def on_message_complete(self) -> None:
            self._read_done()
            super().on_message_complete()

        def handle_websocket_upgrade(self) -> None:
            self._read_done()
            super().handle_websocket_upgrade()

        def connection_lost(self, exc: Exception | None) -> None:
            self._read_done()
            super().connection_lost(exc)

        def _read_by_deadline(self) -> None:
            if self._reading is None:
                self._reading = asyncio.get_running_loop().call_later(request_timeout, self._too_slow)

        def _read_done(self) -> None:
            if self._reading is not None:
                self._reading.cancel()
                self._reading = None

        def _too_slow(self) -> None:
            self._reading = None
            self.transport.close()

        def on_url(self, url: bytes) -> None:
            self._grow(len(url))
            super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            self._grow(len(name) + len(value) + 4)
            super().on_header(name, value)

        def _grow(self, n: int) -> None:
            self._head += n
            if self._head > MAX_HEAD_BYTES:
                raise _HeadTooLarge  # the parser fails: uvicorn answers 400 and closes

    class Ws(StallGuard, WebSocketsSansIOProtocol):  # type: ignore[misc]
        pass

    return Http, Ws, paused


class _Uvicorn:
    """A uvicorn server that leaves signals to livepp (the first Ctrl-C asks
    livepp's shutdown, which goes first)."""

    @staticmethod
    def make(config: Any) -> Any:
        import uvicorn

        class Server(uvicorn.Server):
            @contextlib.contextmanager
            def capture_signals(self) -> Iterator[None]:
                yield

        return Server(config)


async def _publish(server: Service) -> None:
    """A worker of several: its live requests for the others' /status, four times a second."""
    while True:
        try:
            server.metrics.publish()
        except OSError:
            pass  # the shared directory is going away: the service is stopping
        await asyncio.sleep(0.25)


async def _shut_down(server: Service, paused: set[Any]) -> None:
    """Stop every request; give their last messages up to ``shutdown_grace``
    to reach clients that read; drop the connections that do not (paused
    for a second, or still busy at the end)."""
    loop = asyncio.get_running_loop()
    grace = server.config.shutdown_grace
    started = loop.time()
    await server.stop_jobs()
    stalled_since: dict[Any, float] = {}
    while loop.time() < started + grace and (server.streaming or any(len(s.outbox) for s in list(server.sessions))):
        now = loop.time()
        for connection in list(paused):
            if now - stalled_since.setdefault(connection, now) >= min(1.0, grace):
                connection.transport.abort()  # it reads nothing: its last messages cannot reach it
        await asyncio.sleep(0.02)
    for connection in list(paused):
        connection.transport.abort()


def listen(host: str, port: int, *, reuse_port: bool = False) -> socket.socket:
    """A bound socket (listening starts when it is served). ``reuse_port``:
    one of several sockets on one port, each its own accept queue, among which
    the kernel spreads new connections (Linux's SO_REUSEPORT)."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


async def serve_forever(
    server: Service,
    *,
    ready: Callable[[int], Any] | None = None,
    stop: asyncio.Event | None = None,
    sock: socket.socket | None = None,
    signals: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM),
) -> None:
    """Serve until ``stop`` is set (or one of ``signals``), then shut down as
    the module docstring says. ``ready(port)`` is called once listening;
    ``sock``: a socket bound already (one that several worker processes share)."""
    import uvicorn

    from livepp.serve.http_app import create_app

    config = server.config
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    interrupts = Interrupts(stop)
    for sig in signals:
        try:
            loop.add_signal_handler(sig, interrupts)
        except (NotImplementedError, RuntimeError, ValueError):
            pass  # not the main thread (tests) or not supported here
    http, ws, paused = _protocols(config.send_timeout, config.request_timeout)
    own_socket = sock is None
    sock = sock or listen(config.host, config.port)
    uv = _Uvicorn.make(uvicorn.Config(
        create_app(server), http=http, ws=ws, lifespan="off", log_level="warning", access_log=False,
        # Frames above ws_max_size close the connection at the protocol level; the
        # smaller max_message_bytes is checked per message with an error event.
        ws_max_size=max(1 << 20, 4 * config.max_message_bytes), ws_per_message_deflate=False,
        # livepp's own shutdown (below) has let every answer that can end end: uvicorn waits 1 s more at most.
        timeout_keep_alive=5, timeout_graceful_shutdown=1,
        limit_concurrency=2 * config.max_connections + config.max_running_jobs,
    ))
    serving = asyncio.create_task(uv.serve(sockets=[sock]))
    try:
        while not uv.started and not serving.done():
            await asyncio.sleep(0.01)
        if serving.done():
            serving.result()  # startup failed: say why
            return
        if ready is not None:
            ready(sock.getsockname()[1])
        publishing = asyncio.create_task(_publish(server)) if server.metrics.shared_dir else None
        stopped = asyncio.create_task(stop.wait())
        await asyncio.wait({serving, stopped}, return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        if publishing is not None:
            publishing.cancel()
        await _shut_down(server, paused)
        uv.should_exit = True
        await serving
    finally:
        if not serving.done():
            uv.should_exit = True
            await serving
        await server.close()
        if own_socket:
            sock.close()

"""``livepp serve --remote ... --workers N``: N gateway processes on one port.

The parent reserves the port and starts N worker processes (spawned, each
its own interpreter and event loop). Where the system has SO_REUSEPORT
(Linux), each worker listens on its own socket of that port and the kernel
spreads new connections over them by their addresses, so a burst of
connections is shared out (on one shared listening socket, the worker that
wakes first accepts every connection waiting); elsewhere the workers serve
one listening socket the parent opened. The workers share a
directory (prometheus_client's multiprocess mode): ``/metrics`` on any worker
adds up every worker's counters and histograms, and ``/status`` (so the
page) lists every worker's live requests, each tagged with its worker's pid.
Ctrl-C or SIGTERM to the parent stops every worker cleanly (a second Ctrl-C
forces them out). Only a gateway runs this way: a local model lives in one
process.

Behind a load balancer, run one ``serve --remote --workers N`` per host with
the same ``--policy`` and ``--token``; each host's ``/metrics`` covers its own
workers (scrape every host), and ``/status`` shows each host's live requests.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from dataclasses import replace
from typing import Any, Callable

from livepp.core.params import LiveppError
from livepp.serve.service import ServerConfig

__all__ = ["serve_workers"]


def _worker(engine: Any, config: ServerConfig, sock: Any, listening: Any) -> None:
    import asyncio

    from livepp.engines.heap import settle
    from livepp.serve.app import LiveppServer, serve_forever
    from livepp.serve.runner import listen

    if sock is None:  # a socket of its own in the port's SO_REUSEPORT group
        sock = listen(config.host, config.port, reuse_port=True)

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent turns Ctrl-C into one SIGTERM for every worker
    settle(freeze=True)  # a worker process of livepp's own: what its start made leaves every later collection
    asyncio.run(serve_forever(LiveppServer(engine, config), sock=sock, signals=(signal.SIGTERM,), ready=lambda port: listening.set()))


def serve_workers(engine: Any, config: ServerConfig, workers: int, *, ready: Callable[[int], Any] | None = None) -> None:
    """Run ``workers`` gateway processes on ``config``'s port until Ctrl-C or SIGTERM."""
    if getattr(engine, "kind", None) != "openai":
        raise LiveppError("--workers runs several gateway processes: it goes with --remote (a local model lives in one process)")
    from livepp.serve.runner import listen

    shared = tempfile.mkdtemp(prefix="livepp-workers-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = shared  # read by prometheus_client when each worker imports it
    config = replace(config, shared_dir=shared)
    reuse_port = hasattr(socket, "SO_REUSEPORT")
    sock = listen(config.host, config.port, reuse_port=reuse_port)  # bound, so the port is ours; with SO_REUSEPORT, never listening
    if reuse_port:
        config = replace(config, port=sock.getsockname()[1])
    else:
        sock.listen(2048)
    context = multiprocessing.get_context("spawn")
    listening = [context.Event() for _ in range(workers)]
    procs = [context.Process(target=_worker, args=(engine, config, None if reuse_port else sock, listening[i]), name=f"livepp-worker-{i}")
             for i in range(workers)]
    stops = []

    def stop(signum: int, frame: Any) -> None:
        stops.append(signum)
        for p in procs:
            if p.pid is not None and p.is_alive():
                os.kill(p.pid, signal.SIGKILL if len(stops) > 1 else signal.SIGTERM)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        for p in procs:
            p.start()
        _wait_listening(config, sock, listening, procs)
        if ready is not None:
            ready(sock.getsockname()[1])
        while any(p.is_alive() for p in procs):
            for p in procs:
                p.join(0.2)
            if not stops and any(p.exitcode not in (None, 0) for p in procs):
                print("livepp: a worker failed; stopping the others", file=sys.stderr, flush=True)
                stop(signal.SIGTERM, None)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        sock.close()
        shutil.rmtree(shared, ignore_errors=True)


def _wait_listening(config: ServerConfig, sock: Any, listening: list[Any], procs: list[Any], timeout: float = 60.0) -> None:
    """Until every worker listens (else the first connections all go to the
    workers that started first) and one answers /healthz on the shared port."""
    import http.client

    port = sock.getsockname()[1]
    host = "127.0.0.1" if config.host in ("0.0.0.0", "localhost") else config.host.strip("[]")
    deadline = time.monotonic() + timeout
    for event, proc in zip(listening, procs):
        while not event.wait(0.1):
            if not proc.is_alive():
                raise LiveppError(f"worker {proc.name} ended before it listened (exit code {proc.exitcode})")
            if time.monotonic() > deadline:
                raise LiveppError(f"worker {proc.name} did not listen on port {port} within {timeout:g} s")
    while time.monotonic() < deadline:
        try:
            conn = http.client.HTTPConnection(host, port, timeout=2)
            conn.request("GET", "/healthz", headers={"Host": f"127.0.0.1:{port}"})
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise LiveppError(f"no worker answered on port {port} within {timeout:g} s")

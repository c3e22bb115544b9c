"""The service object: what every route and handler of ``livepp serve`` receives.

One model per process. A local model (torch or llama.cpp) runs behind a
continuous-batching :class:`~livepp.engines.scheduler.Scheduler` (``max_batch``
rows in one forward pass per step, a bounded queue beyond; ``max_batch`` 1
runs requests a token at a time in turn); a serial engine of another kind
(a model whose cache cannot be batched) has every model step go through one
FIFO :class:`ModelRunner` instead. The service holds the engine,
admission (the running requests and the global cap), the limits of
:class:`ServerConfig`, the live registry (:class:`ServerMetrics`) and the
worker threads requests run their monitors in. It knows nothing of HTTP or
websockets: the handlers above it do.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import secrets
from dataclasses import dataclass
from typing import Any, Callable

from livepp.core.params import GenerationParams, LiveppError
from livepp.core.policies import parse_policy
from livepp.engines.protocol import Engine
from livepp.engines.select import as_engine, supports_continuous_batching
from livepp.serve.jobs import ClientError, Job, JobEngine, ModelRunner, OutboxSink
from livepp.serve.metrics import ServerMetrics

__all__ = ["ServerConfig", "Service", "LOOPBACK_HOSTS", "ERROR_CODES", "host_name"]

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
    max_body_bytes: int = 1 << 20  # a request body
    # A client whose connection takes nothing for this long while output
    # waits for it is disconnected and its requests cancelled.
    send_timeout: float = 60.0
    # A request (head and body) must arrive within this long of its first byte.
    request_timeout: float = 30.0
    # Shutdown: running requests stop at once; their last messages get this
    # long to reach clients that read, then every connection is closed.
    shutdown_grace: float = 5.0
    # serve --workers: the directory the workers share their metrics and live requests in.
    shared_dir: str | None = None


def host_name(host_header: str) -> str:
    """The host part of a Host header: "[::1]:8765" -> "::1", "a.b:80" -> "a.b"."""
    h = host_header.strip().lower()
    if h.startswith("["):
        return h[1 : h.find("]")] if "]" in h else h
    return h.rsplit(":", 1)[0] if h.count(":") == 1 else h


class Service:
    """Engine, scheduler, admission, limits and the live registry (see the module docstring)."""

    def __init__(self, engine: Engine, config: ServerConfig) -> None:
        engine = as_engine(engine)
        self.config = config
        self.scheduler: Any = None
        if engine.serial and supports_continuous_batching(engine):  # --max-batch 1: a batch of one, in turn
            from livepp.engines.scheduler import Scheduler

            try:
                self.scheduler = Scheduler(engine, max_batch=config.max_batch, max_queue=config.max_queue,
                                           prefill_chunk=config.prefill_chunk)
                engine = self.scheduler
            except LiveppError:
                if config.max_batch > 1:
                    raise  # e.g. a cache that cannot be batched: the message says to serve it with --max-batch 1
                # --max-batch 1 of such a model: its steps go through the runner.
        self.engine = engine
        self.upstream: Any = None
        if getattr(engine, "kind", None) == "openai":  # a gateway: one pooled client for the upstream engine
            from livepp.serve.gateway import Upstream

            self.upstream = Upstream(max_connections=config.max_running_jobs)
        for spec in config.default_policies:
            parse_policy(spec)  # a bad default is the operator's error, now
        self.metrics = ServerMetrics(self.status, shared_dir=config.shared_dir)
        self.runner = ModelRunner()
        self.jobs: set[Job] = set()
        self.sessions: set[Any] = set()  # open websocket sessions
        self.streaming = 0  # /v1 answers being streamed now
        self.workers = concurrent.futures.ThreadPoolExecutor(max_workers=64, thread_name_prefix="livepp-job")
        self.shutting_down = False

    # ---- access --------------------------------------------------------------
    def host_allowed(self, host_header: str | None) -> bool:
        """DNS rebinding defence: the Host header must name this server."""
        allowed = self.config.allowed_hosts
        if "*" in allowed:
            return True
        if not host_header:
            return False
        name = host_name(host_header)
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
        return given is not None and secrets.compare_digest(given.encode("utf-8", "surrogatepass"), self.config.token.encode("utf-8"))

    # ---- limits ------------------------------------------------------------
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

    # ---- admission -----------------------------------------------------------
    def refusal(self) -> ClientError | None:
        """Why no new request can start now, or None."""
        if self.shutting_down:
            return ClientError("shutting_down", "the server is shutting down")
        if len(self.jobs) >= self.config.max_running_jobs:
            return ClientError("busy", f"the server runs at most {self.config.max_running_jobs} requests at once; try again later")
        return None

    def admit(self, job: Job) -> Job:
        """Count a running request, or raise the :class:`ClientError` that refuses it."""
        refused = self.refusal()
        if refused is not None:
            raise refused
        self.jobs.add(job)
        return job

    def release(self, job: Job) -> None:
        """The request's generation has ended: its slot is free, whether or
        not its client has read what it produced."""
        self.jobs.discard(job)

    def run_job(self, job: Job, fn: Callable[..., Any], *args: Any, on_end: Callable[[], None]) -> None:
        """Run ``fn(job, *args)`` in a worker thread; ``on_end`` runs on the
        event loop once it returns (or raises), and the job is released first."""
        loop = asyncio.get_running_loop()

        def ended() -> None:
            self.release(job)
            on_end()

        def work() -> None:
            try:
                fn(job, *args)
            finally:
                loop.call_soon_threadsafe(ended)

        job.done = loop.run_in_executor(self.workers, work)

    def job_engine(self, job: Job, sink: OutboxSink | None = None) -> JobEngine:
        """The engine as ``job`` sees it; a wait for room in the batch is told
        to a websocket client as a ``queued`` event."""
        on_queued = None
        if sink is not None:
            def on_queued(position: int) -> None:
                sink.loop.call_soon_threadsafe(sink.outbox.put, {"type": "queued", "id": job.id, "position": position})

        return JobEngine(self.engine, self.runner, job, on_queued=on_queued)

    def status(self) -> dict[str, int]:
        """Rows running and queued, the batch size and its limit."""
        if self.scheduler is not None:
            return self.scheduler.status()
        running = len(self.jobs)
        return {"running": running, "queued": 0, "batch_size": min(running, 1), "max_batch": 1, "max_queue": 0}

    # ---- shutdown --------------------------------------------------------------
    async def stop_jobs(self) -> None:
        """Stop every running request with reason "shutdown" and wait until
        each has ended (its last messages are queued for its client)."""
        self.shutting_down = True
        for job in list(self.jobs):
            job.stop("shutdown")
        pending = [j.done for j in list(self.jobs) if j.done is not None]
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)

    async def close(self) -> None:
        """Free the engine once no request runs."""
        self.runner.shutdown()
        if self.upstream is not None:
            await self.upstream.close()
        if self.scheduler is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.scheduler.close)
        self.workers.shutdown(wait=False, cancel_futures=True)

"""What the service reports about itself: Prometheus metrics at ``/metrics``
and the live requests at ``/status`` (for the page's panel).

Every request's monitor gets a :class:`RequestSink`, which counts its tokens,
observes its time to first token (from the moment the server accepted the
request, so queueing counts) and each inter-token gap, counts its end reason,
and keeps its running numbers for the live list. Batch size and queue length
are read from the engine's scheduler when scraped.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from livepp.core.events import EndEvent, Event, StartEvent, TokenEvent

__all__ = ["ServerMetrics", "RequestSink"]

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ServerMetrics:
    """The service's metrics and live list. With ``shared_dir`` (``serve
    --workers N``: prometheus_client's multiprocess mode, whose
    ``PROMETHEUS_MULTIPROC_DIR`` is that directory) the counters and
    histograms of every worker add up in ``/metrics``, and each worker
    publishes its live requests there for ``/status``."""

    def __init__(self, status: Callable[[], dict[str, int]], *, shared_dir: str | None = None) -> None:
        self.shared_dir = shared_dir
        self.registry = CollectorRegistry()
        # In multiprocess mode values live in the directory's files: the metrics join no registry of their own.
        r = None if shared_dir else self.registry
        self.tokens = Counter("livepp_tokens_generated", "Tokens generated, all requests.", registry=r)
        self.requests = Counter("livepp_requests", "Generations ended, by end reason.", ["reason"], registry=r)
        self.ttft = Histogram("livepp_time_to_first_token_seconds", "From request accepted to its first token (queueing included).",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("livepp_inter_token_latency_seconds", "Time between consecutive tokens of a request.",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self._status = status
        if shared_dir is None:
            for name, doc, key in (("livepp_batch_size", "Rows in the engine's current batch.", "batch_size"),
                                   ("livepp_queue_length", "Rows waiting for room in the batch.", "queued"),
                                   ("livepp_running_requests", "Rows prefilling or decoding.", "running"),
                                   ("livepp_max_batch", "Largest batch the engine runs.", "max_batch")):
                Gauge(name, doc, registry=r).set_function(lambda key=key: float(self._status().get(key, 0)))
        else:
            self.running = Gauge("livepp_running_requests", "Requests running, all workers.", registry=None, multiprocess_mode="livesum")
        self._lock = threading.Lock()
        self._live: dict[int, dict[str, Any]] = {}

    def render(self) -> bytes:
        if self.shared_dir is None:
            return generate_latest(self.registry)
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=self.shared_dir)
        return generate_latest(registry)

    def live(self) -> list[dict[str, Any]]:
        """The requests generating now (on every worker), with their running numbers."""
        with self._lock:
            own = [dict(v) for v in self._live.values()]
        if self.shared_dir is None:
            return own
        pid = os.getpid()
        rows = [r | {"worker": pid} for r in own]
        for path in Path(self.shared_dir).glob("live-*.json"):
            other = int(path.stem.split("-")[1])
            if other != pid and _alive(other):
                try:
                    rows += [r | {"worker": other} for r in json.loads(path.read_text())]
                except (OSError, ValueError):
                    pass  # a worker rewriting its file this instant: its rows come next poll
        return rows

    def publish(self) -> None:
        """Multiprocess mode: this worker's live requests and running count, for the others' /status and /metrics."""
        with self._lock:
            own = [dict(v) for v in self._live.values()]
        self.running.set(self._status().get("running", 0))
        path = Path(self.shared_dir) / f"live-{os.getpid()}.json"  # type: ignore[arg-type]
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(own))
        os.replace(tmp, path)

    def sink(self, request_id: str, kind: str, accepted_at: float | None = None) -> "RequestSink":
        return RequestSink(self, request_id, kind, accepted_at if accepted_at is not None else time.perf_counter())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RequestSink:
    """One generation's contribution to the metrics and the live list."""

    def __init__(self, metrics: ServerMetrics, request_id: str, kind: str, accepted_at: float) -> None:
        self.metrics, self.accepted_at = metrics, accepted_at
        self._last: float | None = None
        self._key = id(self)
        self._row = {"id": request_id, "kind": kind, "state": "waiting", "n_tokens": 0, "ppl": None, "window_ppl": None}

    def emit(self, event: Event) -> None:
        m = self.metrics
        if isinstance(event, StartEvent):
            with m._lock:
                m._live[self._key] = self._row
        elif isinstance(event, TokenEvent):
            now = time.perf_counter()
            if self._last is None:
                m.ttft.observe(now - self.accepted_at)
            else:
                m.itl.observe(now - self._last)
            self._last = now
            m.tokens.inc()
            with m._lock:
                self._row.update(state="generating", n_tokens=event.index + 1, ppl=_finite(event.ppl), window_ppl=_finite(event.window_ppl))
        elif isinstance(event, EndEvent):
            m.requests.labels(reason=event.reason).inc()
            with m._lock:
                m._live.pop(self._key, None)


def _finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None

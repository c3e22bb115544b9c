"""What the service reports about itself: Prometheus metrics at ``/metrics``
and the live requests at ``/status`` (for the page's panel).

Every request's monitor gets a :class:`RequestSink`, which counts its tokens,
observes its time to first token (from the moment the server accepted the
request, so queueing counts) and each inter-token gap, counts its end reason,
and keeps its running numbers for the live list. Batch size and queue length
are read from the engine's scheduler when scraped.
"""

from __future__ import annotations

import math
import threading
import time
from typing import Any, Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from livepp.core.events import EndEvent, Event, StartEvent, TokenEvent

__all__ = ["ServerMetrics", "RequestSink"]

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ServerMetrics:
    def __init__(self, status: Callable[[], dict[str, int]]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.tokens = Counter("livepp_tokens_generated", "Tokens generated, all requests.", registry=r)
        self.requests = Counter("livepp_requests", "Generations ended, by end reason.", ["reason"], registry=r)
        self.ttft = Histogram("livepp_time_to_first_token_seconds", "From request accepted to its first token (queueing included).",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("livepp_inter_token_latency_seconds", "Time between consecutive tokens of a request.",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self._status = status
        for name, doc, key in (("livepp_batch_size", "Rows in the engine's current batch.", "batch_size"),
                               ("livepp_queue_length", "Rows waiting for room in the batch.", "queued"),
                               ("livepp_running_requests", "Rows prefilling or decoding.", "running"),
                               ("livepp_max_batch", "Largest batch the engine runs.", "max_batch")):
            Gauge(name, doc, registry=r).set_function(lambda key=key: float(self._status().get(key, 0)))
        self._lock = threading.Lock()
        self._live: dict[int, dict[str, Any]] = {}

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def live(self) -> list[dict[str, Any]]:
        """The requests generating now, with their running numbers."""
        with self._lock:
            return [dict(v) for v in self._live.values()]

    def sink(self, request_id: str, kind: str, accepted_at: float | None = None) -> "RequestSink":
        return RequestSink(self, request_id, kind, accepted_at if accepted_at is not None else time.perf_counter())


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

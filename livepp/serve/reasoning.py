"""The service's multi-stream requests: CAR ``route`` and DeepConf ``think``.

Both run on the server's engine as the job sees it, so with a local model
their streams are rows of the shared continuous batch: a ``think`` request's
traces decode together with everyone else's requests.

  → {"type":"route","id","question","params":{"early":bool,"long_max_tokens":int,"short_max_tokens":int}}
  ← start/token/policy/end events tagged "stage": "short"|"long", a "route"
    decision, then {"type":"answer",...}
  → {"type":"think","id","question","params":{"traces","warmup","eta","group","mode",
     "max_new_tokens","temperature","top_p","seed","consensus"}}
  ← each trace's events tagged "sample": i, then {"type":"vote",...} as ``livepp think --json``
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from livepp.core.events import Event, to_json_dict
from livepp.serve.jobs import Job, OutboxSink, error_code, one_line
from livepp.serve.ws_protocol import Message, RouteRequest, SessionHandle, ThinkRequest, parse_route, parse_think

if TYPE_CHECKING:
    from livepp.serve.service import Service

__all__ = ["start_route", "start_think"]


class _Tagged:
    """Events of one stage or trace to the client, tagged, and to the metrics."""

    def __init__(self, service: "Service", job: Job, sink: OutboxSink, kind: str, tags: dict[str, Any]) -> None:
        self.sink, self.job, self.tags = sink, job, tags
        self.metrics = service.metrics.sink(job.id, kind, job.accepted_at)

    def emit(self, event: Event) -> None:
        self.metrics.emit(event)
        data = to_json_dict(event) | self.tags | {"id": self.job.id}
        self.sink.loop.call_soon_threadsafe(self.sink.outbox.put, data)


def start_route(session: SessionHandle, message: Message) -> None:
    session.start(message, _run_route, parse_route(message.data, session.limits), end_is_final=False)


def _run_route(job: Job, sink: OutboxSink, session: SessionHandle, request: RouteRequest) -> None:
    from livepp.car.calibration import DEFAULT_CALIBRATION, Calibration
    from livepp.car.routing import StepByStep, route

    service = session.service
    engine = service.job_engine(job, sink)
    try:
        cal = Calibration.load(service.config.calibration or DEFAULT_CALIBRATION)
        outcome = route(
            request.question, engine=engine, calibration=cal, early=request.early,
            long_route=StepByStep(engine, max_new_tokens=request.long_max_tokens),
            short_max_new_tokens=request.short_max_tokens,
            sinks_for=lambda stage: [_Tagged(service, job, sink, "route", {"stage": stage})],
            on_decision=lambda o: sink.loop.call_soon_threadsafe(sink.outbox.put, o.decision_dict() | {"id": job.id}),
        )
        job.final.append(outcome.answer_dict() | {"id": job.id})
    except Exception as exc:
        job.final.append({"type": "error", "id": job.id, "code": error_code(exc), "message": one_line(exc)})


def start_think(session: SessionHandle, message: Message) -> None:
    session.start(message, _run_think, parse_think(message.data, session.limits), end_is_final=False)


class _Traces:
    """Each trace's events, tagged with its sample number."""

    def __init__(self, service: "Service", job: Job, sink: OutboxSink) -> None:
        self.service, self.job, self.sink = service, job, sink
        self.traces: dict[int, _Tagged] = {}

    def emit_sample(self, sample: int, event: Event) -> None:
        if sample not in self.traces:
            self.traces[sample] = _Tagged(self.service, self.job, self.sink, "think", {"sample": sample})
        self.traces[sample].emit(event)


def _run_think(job: Job, sink: OutboxSink, session: SessionHandle, request: ThinkRequest) -> None:
    from livepp.car.deepconf import think

    service = session.service
    try:
        result = think(request.question, engine=service.job_engine(job, sink), traces=request.traces, warmup=request.warmup,
                       eta=request.eta, group=request.group, mode=request.mode, params=request.params, consensus=request.consensus,
                       sinks=[_Traces(service, job, sink)])
        job.final.append(result.vote_dict() | {"id": job.id})
    except Exception as exc:
        job.final.append({"type": "error", "id": job.id, "code": error_code(exc), "message": one_line(exc)})

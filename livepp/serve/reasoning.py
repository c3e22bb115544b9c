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

import asyncio
from typing import TYPE_CHECKING, Any

from livepp.core.events import Event, to_json_dict
from livepp.core.params import GenerationParams, LiveppError
from livepp.serve.jobs import ClientError, Job, OutboxSink, error_code, one_line
from livepp.serve.outbox import Outbox

if TYPE_CHECKING:
    from livepp.serve.app import LiveppServer

__all__ = ["start_route", "start_think"]


def _check_opts(opts: Any, known: dict[str, tuple[type, ...]], what: str) -> dict[str, Any]:
    opts = {} if opts is None else opts
    if not isinstance(opts, dict):
        raise ClientError("bad_params", f"{what} params must be an object")
    for k, v in opts.items():
        types = known.get(k)
        if types is None:
            raise ClientError("bad_params", f"{what} params: unknown {k!r}; known: {', '.join(known)}")
        if v is None and type(None) in types:
            continue
        if isinstance(v, bool) != (bool in types) or not isinstance(v, types):
            names = "/".join(t.__name__ for t in types if t is not type(None))
            raise ClientError("bad_params", f"{what} params: {k} must be {names}, got {v!r}")
    return opts


def _question(data: dict[str, Any]) -> str:
    question = data.get("question")
    if not isinstance(question, str) or not question.strip():
        raise ClientError("bad_params", "question must be a non-empty string")
    return question


class _Tagged:
    """Events of one stage or trace to the client, tagged, and to the metrics."""

    def __init__(self, server: "LiveppServer", job: Job, sink: OutboxSink, kind: str, tags: dict[str, Any]) -> None:
        self.sink, self.job, self.tags = sink, job, tags
        self.metrics = server.metrics.sink(job.id, kind, job.accepted_at)

    def emit(self, event: Event) -> None:
        self.metrics.emit(event)
        data = to_json_dict(event) | self.tags | {"id": self.job.id}
        self.sink.loop.call_soon_threadsafe(self.sink.outbox.put, data)


def start_route(server: "LiveppServer", data: dict[str, Any], jobs: dict[str, Job], outbox: Outbox, loop: asyncio.AbstractEventLoop) -> None:
    question = _question(data)
    opts = _check_opts(data.get("params"), {"early": (bool,), "long_max_tokens": (int,), "short_max_tokens": (int,)}, "route")
    cap = server.config.max_new_tokens_cap
    if not all(1 <= opts.get(k, 1) <= cap for k in ("long_max_tokens", "short_max_tokens")):
        raise ClientError("bad_params", f"token limits must be between 1 and {cap}")
    job = server._new_job(data, jobs)
    server._launch(job, jobs, outbox, loop, _run_route, server, question, opts, OutboxSink(loop, outbox, job.id))


def _run_route(job: Job, server: "LiveppServer", question: str, opts: dict[str, Any], sink: OutboxSink) -> None:
    from livepp.car.calibration import DEFAULT_CALIBRATION, Calibration
    from livepp.car.routing import StepByStep, route

    cap = server.config.max_new_tokens_cap
    engine = server.job_engine(job, sink)
    try:
        cal = Calibration.load(server.config.calibration or DEFAULT_CALIBRATION)
        outcome = route(
            question, engine=engine, calibration=cal, early=opts.get("early", False),
            long_route=StepByStep(engine, max_new_tokens=opts.get("long_max_tokens", min(256, cap))),
            short_max_new_tokens=opts.get("short_max_tokens", min(24, cap)),
            sinks_for=lambda stage: [_Tagged(server, job, sink, "route", {"stage": stage})],
            on_decision=lambda o: sink.loop.call_soon_threadsafe(sink.outbox.put, o.decision_dict() | {"id": job.id}),
        )
        job.final.append(outcome.answer_dict() | {"id": job.id})
    except Exception as exc:
        job.final.append({"type": "error", "id": job.id, "code": error_code(exc), "message": one_line(exc)})


_THINK_PARAMS = {"traces": (int,), "warmup": (int,), "eta": (int, float), "group": (int,), "mode": (str,), "max_new_tokens": (int,),
                 "temperature": (int, float), "top_p": (int, float), "seed": (int,), "consensus": (int, float, type(None))}
MAX_TRACES = 64


def start_think(server: "LiveppServer", data: dict[str, Any], jobs: dict[str, Job], outbox: Outbox, loop: asyncio.AbstractEventLoop) -> None:
    question = _question(data)
    opts = {"traces": 8, "warmup": 3, "eta": 90.0, "group": 16, "mode": "online", "max_new_tokens": min(256, server.config.max_new_tokens_cap),
            "temperature": 0.7, "top_p": 0.95, "seed": 0, "consensus": None} | _check_opts(data.get("params"), _THINK_PARAMS, "think")
    if not 1 <= opts["traces"] <= MAX_TRACES:
        raise ClientError("bad_params", f"traces must be between 1 and {MAX_TRACES}")
    if opts["max_new_tokens"] > server.config.max_new_tokens_cap:
        raise ClientError("bad_params", f"max_new_tokens is above this server's cap of {server.config.max_new_tokens_cap}")
    try:
        params = GenerationParams(max_new_tokens=opts["max_new_tokens"], temperature=float(opts["temperature"]),
                                  top_p=float(opts["top_p"]), seed=opts["seed"])
        if params.greedy:
            raise LiveppError("DeepConf samples its traces: give a temperature > 0")
    except LiveppError as exc:
        raise ClientError("bad_params", str(exc)) from None
    job = server._new_job(data, jobs)
    server._launch(job, jobs, outbox, loop, _run_think, server, question, opts, params, OutboxSink(loop, outbox, job.id))


class _Traces:
    """Each trace's events, tagged with its sample number."""

    def __init__(self, server: "LiveppServer", job: Job, sink: OutboxSink) -> None:
        self.server, self.job, self.sink = server, job, sink
        self.traces: dict[int, _Tagged] = {}

    def emit_sample(self, sample: int, event: Event) -> None:
        if sample not in self.traces:
            self.traces[sample] = _Tagged(self.server, self.job, self.sink, "think", {"sample": sample})
        self.traces[sample].emit(event)


def _run_think(job: Job, server: "LiveppServer", question: str, opts: dict[str, Any], params: GenerationParams, sink: OutboxSink) -> None:
    from livepp.car.deepconf import think

    try:
        result = think(question, engine=server.job_engine(job, sink), traces=opts["traces"], warmup=opts["warmup"], eta=float(opts["eta"]),
                       group=opts["group"], mode=opts["mode"], params=params, consensus=opts["consensus"], sinks=[_Traces(server, job, sink)])
        job.final.append(result.vote_dict() | {"id": job.id})
    except Exception as exc:
        job.final.append({"type": "error", "id": job.id, "code": error_code(exc), "message": one_line(exc)})

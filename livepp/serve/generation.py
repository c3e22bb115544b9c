"""The websocket ``generate`` request: one generation, monitored in a worker
thread, decoded by the service's engine (a row of the continuous batch for a
local model), its events sent as ``livepp generate --json`` prints them."""

from __future__ import annotations

from livepp.core.monitor import Monitor
from livepp.core.params import LiveppError
from livepp.core.policies import parse_policy
from livepp.serve.jobs import ClientError, Job, OutboxSink, error_code, one_line
from livepp.serve.ws_protocol import GenerateRequest, Message, SessionHandle, parse_generate

__all__ = ["start_generate"]


def start_generate(session: SessionHandle, message: Message) -> None:
    service = session.service
    request = parse_generate(message.data, session.limits)
    over = service.over_limit(request.params, len(request.policies))
    if over is not None:
        raise ClientError("bad_params", over[1], message.id)
    session.start(message, _run_generate, request)


def _run_generate(job: Job, sink: OutboxSink, session: SessionHandle, request: GenerateRequest) -> None:
    """Worker thread: the generation, monitored here."""
    service = session.service
    engine = service.job_engine(job, sink)
    try:
        stream = engine.open(request.prompt, request.params)  # validates before any compute
    except LiveppError as exc:
        job.final.append({"type": "error", "id": job.id, "code": error_code(exc), "message": one_line(exc)})
        return
    metrics = service.metrics.sink(job.id, "generate", job.accepted_at)
    specs = [*service.config.default_policies, *request.policies]
    monitor = Monitor(policies=[parse_policy(s) for s in specs], sinks=[sink, metrics], keep_events=False, steps=request.steps)
    try:
        monitor.run(stream, model=engine.name, params=request.params.to_dict() | {"window": 32}, engine=engine.kind)
    except Exception as exc:  # the end event (reason "error") is queued before this
        job.final.append({"type": "error", "id": job.id, "code": error_code(exc), "message": one_line(exc)})

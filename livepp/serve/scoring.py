"""The websocket ``score`` request: the PPL of a given text (or of a target
given a prompt), planned as ``livepp score`` plans it (the same first-token
rule, windows, ``max_length``, ``stride``, ``convention``) and scored window
by window as rows of the service's continuous batch, streamed as it goes.

  → {"type":"score","id","text":str}  or  {"type":"score","id","prompt":str,"target":str,"chat":bool}
     (+ "max_length", "stride", "convention": "hf"|"lm-eval", "prefix_token")
  ← {"type":"start","id","n_positions","windows","first_token_rule","model","engine"}
  ← {"type":"window","id","index","begin","end","score_from","tokens":[{"token_id","text","logprob","entropy"}],
     "n_tokens","mean_nll","ppl"}   (one per window; the running totals so far)
  ← {"type":"end","id","reason":"done"|"cancelled"|..., then the fields `livepp score --json` prints but its tokens}

A cancel stops it between windows (a window's chunks in flight finish).
"""

from __future__ import annotations

import math
from typing import Any

from livepp.core.params import GenerationParams, LiveppError
from livepp.engines.protocol import ScoreSpec
from livepp.scoring.plans import ScorePlan, plan_lm_eval, plan_target, plan_text
from livepp.serve.jobs import ClientError, Job, OutboxSink, error_code, one_line
from livepp.serve.ws_protocol import Message, ScoreRequest, SessionHandle, parse_score

__all__ = ["start_score"]


def start_score(session: SessionHandle, message: Message) -> None:
    request = parse_score(message.data, session.limits)
    if session.service.scheduler is None:
        raise ClientError("bad_params", "score needs a local torch or llama.cpp model served with continuous batching", message.id)
    session.start(message, _run_score, request)


def _plan(encoder: Any, request: ScoreRequest) -> ScorePlan:
    if request.convention == "lm-eval":
        return encoder.plan(plan_lm_eval, request.text, max_length=request.max_length, prefix_token=request.prefix_token)
    windows = {"max_length": request.max_length, "stride": request.stride}
    if request.text is not None:
        return encoder.plan(plan_text, request.text, **windows)
    return encoder.plan(plan_target, request.prompt, request.target, chat=request.chat, **windows)


def _run_score(job: Job, sink: OutboxSink, session: SessionHandle, request: ScoreRequest) -> None:
    """Worker thread: each window a scored row of the batch, in turn."""
    service = session.service
    scheduler = service.scheduler
    encoder = scheduler.encoder
    put = lambda event: sink.loop.call_soon_threadsafe(sink.outbox.put, event | {"id": job.id})  # noqa: E731
    try:
        plan = _plan(encoder, request)
    except LiveppError as exc:
        job.final.append({"type": "error", "id": job.id, "code": error_code(exc), "message": one_line(exc)})
        return
    path = getattr(scheduler.engine, "scoring_path", None)  # llama.cpp says which path made the numbers
    if path:
        plan.notes.append(path)
    put({"type": "start", "model": scheduler.name, "engine": scheduler.kind, "n_positions": len(plan.ids), "windows": len(plan.windows),
         "first_token_rule": plan.first_token_rule})
    engine = service.job_engine(job)
    scored: dict[int, tuple[float, float]] = {}
    total = 0.0
    reason = "done"
    try:
        for index, w in enumerate(plan.windows):
            if job.stop_reason is not None:
                break
            got: list[Any] = []
            stream = engine.open(plan.ids[w.begin : w.end], GenerationParams(max_new_tokens=1),
                                 score=ScoreSpec(first=w.score_from - w.begin, top=0, generate=False),
                                 on_scores=lambda row, scores: got.extend(scores))
            for _ in stream:  # a scored row generates nothing: this drains its scores
                pass
            if job.stop_reason is not None and len(got) < w.end - w.score_from:
                break  # cancelled inside the window: it does not count
            positions = [(w.begin + s.position, s) for s in got]
            texts = encoder.token_texts([s.token_id for _, s in positions])
            for position, s in positions:
                scored[position] = (s.logprob, s.entropy)
                total += -s.logprob
            mean = total / len(scored) if scored else math.nan
            put({"type": "window", "index": index, "begin": w.begin, "end": w.end, "score_from": w.score_from,
                 "tokens": [{"token_id": s.token_id, "text": t, "logprob": s.logprob, "entropy": s.entropy} for (_, s), t in zip(positions, texts)],
                 "n_tokens": len(scored), "mean_nll": mean, "ppl": _exp(mean)})
    except Exception as exc:
        job.final.append({"type": "error", "id": job.id, "code": error_code(exc), "message": one_line(exc)})
        return
    if job.stop_reason is not None:
        reason = job.stop_reason
    summary = plan.result(scored, lambda ids: "").summary() if scored else {"n_tokens": 0, "first_token_rule": plan.first_token_rule}
    job.final.append({"type": "end", "id": job.id, "reason": reason, **summary})


def _exp(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf

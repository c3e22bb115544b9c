"""Replaying recorded ``--json`` traces through other policies, offline.

A trace file holds one or more traces as written by ``livepp generate
--json`` (start, token..., end). A trace may carry a label: ``"correct":
true|false`` on its start or end line (or a ``{"type": "label", "correct":
...}`` line after its end). Replay rebuilds each token record and runs the
very same monitor as live decoding, so a policy stops a replayed trace at the
same index as it would have stopped the live generation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from livepp.core.events import TokenRecord, TopLogprob
from livepp.core.monitor import Monitor
from livepp.core.jsonl import iter_jsonl
from livepp.core.params import LiveppError
from livepp.core.policies import Policy
from livepp.core.stream import RecordStream
from livepp.core.tracker import Tracker

__all__ = ["Trace", "read_traces", "record_of", "replay_trace", "PolicyReport", "replay"]


@dataclass
class Trace:
    records: list[TokenRecord]
    params: dict[str, Any] = field(default_factory=dict)
    correct: bool | None = None
    end_reason: str | None = None


def _logprob(value: Any) -> float:
    # --json writes a non-finite logprob (-inf: probability 0) as null.
    return -math.inf if value is None else float(value)


def _label(value: Any, where: str) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    raise LiveppError(f'{where}: "correct" must be true or false (a JSON boolean), got {value!r}')


def record_of(event: dict[str, Any], where: str) -> TokenRecord:
    """The token record a ``--json`` token event was made from."""
    if "logprob" not in event:
        raise LiveppError(f"{where}: malformed token event (no logprob)")
    try:
        return TokenRecord(
            token_id=int(event["token_id"]),
            text=str(event.get("text", "")),
            logprob=_logprob(event["logprob"]),
            entropy=None if event.get("entropy") is None else float(event["entropy"]),
            top_logprobs=tuple(TopLogprob(int(t["token_id"]), str(t.get("text", "")), _logprob(t["logprob"])) for t in event.get("top_logprobs") or ()),
            confidence=None if event.get("confidence") is None else float(event["confidence"]),
            varentropy=None if event.get("varentropy") is None else float(event["varentropy"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise LiveppError(f"{where}: malformed token event ({exc})") from exc


def read_traces(path: str | Path) -> list[Trace]:
    p = Path(path)
    if not p.is_file():
        raise LiveppError(f"no such file: {p}")
    traces: list[Trace] = []
    current: Trace | None = None
    for where, event in iter_jsonl(p.read_text(encoding="utf-8"), str(p)):
        kind = event.get("type") if isinstance(event, dict) else None
        if kind == "start":
            current = Trace([], dict(event.get("params") or {}), _label(event.get("correct"), where))
            traces.append(current)
        elif kind == "token":
            if current is None:
                raise LiveppError(f"{where}: token event before any start event")
            current.records.append(record_of(event, where))
        elif kind == "end":
            if current is None:
                raise LiveppError(f"{where}: end event before any start event")
            current.end_reason = event.get("reason")
            if "correct" in event:
                current.correct = _label(event["correct"], where)
        elif kind == "label" and traces:
            traces[-1].correct = _label(event.get("correct"), where)
        elif kind in ("policy", "error", "step"):
            continue  # what the replay recomputes, or nothing to replay
        else:
            raise LiveppError(f"{where}: unknown event type {kind!r}")
    if not traces:
        raise LiveppError(f"{p} holds no traces (expected the output of livepp generate --json)")
    return traces


def _tracker_for(trace: Trace) -> Tracker:
    p = trace.params
    return Tracker(
        window=int(p.get("window", 32)),
        ema_alpha=float(p.get("ema_alpha", 0.1)),
        confidence_window=int(p.get("confidence_window", 32)),
    )


def replay_trace(trace: Trace, policies: Sequence[Policy]) -> int | None:
    """The index at which ``policies`` would stop (or route) this trace, or None."""
    monitor = Monitor(policies=policies, tracker_factory=lambda: _tracker_for(trace))
    result = monitor.run(RecordStream(trace.records))
    if result.end is not None and result.end.reason == "policy":
        return result.end.n_tokens - 1
    return None


@dataclass
class PolicyReport:
    policy: str
    traces: int
    fired: int
    tokens_total: int
    tokens_saved: int
    labelled: int
    correct_total: int
    correct_kept: int
    incorrect_total: int
    incorrect_stopped: int
    fired_at: list[int | None]

    def to_dict(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        out["saved_fraction"] = self.tokens_saved / self.tokens_total if self.tokens_total else 0.0
        if self.correct_total:
            out["accuracy_kept"] = self.correct_kept / self.correct_total
        return out


def replay(traces: Iterable[Trace], spec_name: str, make_policy: Any) -> PolicyReport:
    """Run every trace through a fresh policy from ``make_policy()`` and summarise.

    "Accuracy kept" is the fraction of correct traces that the policy lets
    finish (a stopped trace gives no answer); "incorrect stopped" counts the
    wrong ones it cut short, which is the saving a stop policy is for.
    """
    traces = list(traces)
    fired_at = [replay_trace(t, [make_policy()]) for t in traces]
    total = sum(len(t.records) for t in traces)
    saved = sum(len(t.records) - (i + 1) for t, i in zip(traces, fired_at) if i is not None)
    labelled = [(t, i) for t, i in zip(traces, fired_at) if t.correct is not None]
    return PolicyReport(
        policy=spec_name,
        traces=len(traces),
        fired=sum(i is not None for i in fired_at),
        tokens_total=total,
        tokens_saved=saved,
        labelled=len(labelled),
        correct_total=sum(bool(t.correct) for t, _ in labelled),
        correct_kept=sum(bool(t.correct) and i is None for t, i in labelled),
        incorrect_total=sum(not t.correct for t, _ in labelled),
        incorrect_stopped=sum((not t.correct) and i is not None for t, i in labelled),
        fired_at=fired_at,
    )

"""DeepConf's η swept over recorded traces: no new decoding.

A recording is what ``livepp think QUESTION --mode offline --json`` prints
(every trace run to its end, its events tagged ``"sample": j``, then the
vote line), one or more runs in one file. A run may carry its accepted
answers: ``"answers": [...]`` on its vote line (``think --answer``) or a
``{"type": "label", "answers": [...]}`` line after it.

Trace j of an online run uses the same seed as trace j of the offline run,
and on an engine whose batching never changes a row (the torch engine) online
DeepConf at any η is therefore found from the recording (on llama.cpp, whose
batched kernels round differently with the batch's size, it is what online
would have done on these very traces): the first W traces are the warm-up and set the threshold;
every later trace runs through the very :class:`ConfidenceStop` and
:class:`Tracker` of live decoding (so it stops at the same token), and the
rules of :mod:`livepp.car.deepconf` settle and count the vote. (The consensus
stop depends on the order in which rows finish in a batch; sweeps run
without it.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from livepp.car.deepconf import ThinkResult, offline_threshold, outcome, settle, tally
from livepp.car.tasks import answer_matches
from livepp.core.events import TokenRecord
from livepp.core.jsonl import iter_jsonl
from livepp.core.monitor import Monitor
from livepp.core.params import LiveppError
from livepp.core.policies import ConfidenceStop, warmup_threshold
from livepp.core.replay import record_of
from livepp.core.stream import RecordStream
from livepp.core.tracker import Tracker

__all__ = ["RecordedTrace", "RecordedRun", "read_runs", "simulate", "eta_sweep"]


@dataclass
class RecordedTrace:
    sample: int
    records: list[TokenRecord]
    text: str
    reason: str


@dataclass
class RecordedRun:
    traces: list[RecordedTrace]
    group: int | None
    answers: tuple[str, ...] | None = None
    question: str | None = None


def read_runs(path: str | Path) -> list[RecordedRun]:
    """The runs of a ``think --mode offline --json`` recording (module docstring)."""
    p = Path(path)
    if not p.is_file():
        raise LiveppError(f"no such file: {p}")
    runs: list[RecordedRun] = []
    records: dict[int, list[TokenRecord]] = {}
    ends: dict[int, dict[str, Any]] = {}
    for where, event in iter_jsonl(p.read_text(encoding="utf-8"), str(p)):
        kind = event.get("type") if isinstance(event, dict) else None
        if kind == "vote":
            if event.get("mode") != "offline" or any(e.get("reason") in ("policy", "cancelled") for e in ends.values()):
                raise LiveppError(f"{where}: a sweep needs every trace run to its end: record with think --mode offline --json")
            if sorted(ends) != list(range(len(ends))) or set(records) - set(ends):
                raise LiveppError(f"{where}: the run's traces are incomplete (samples {sorted(ends)})")
            traces = [RecordedTrace(j, records.get(j, []), str(ends[j].get("text", "")), str(ends[j].get("reason"))) for j in sorted(ends)]
            answers = event.get("answers")
            runs.append(RecordedRun(traces, event.get("group"), tuple(map(str, answers)) if answers else None, event.get("question")))
            records, ends = {}, {}
        elif kind == "label" and runs:
            answers = event.get("answers")
            if not isinstance(answers, list) or not answers:
                raise LiveppError(f'{where}: a label line is {{"type": "label", "answers": [accepted answers]}}')
            runs[-1].answers = tuple(map(str, answers))
        elif kind in ("start", "token", "end", "policy", "step"):
            sample = event.get("sample")
            if not isinstance(sample, int):
                raise LiveppError(f"{where}: a {kind} event without its \"sample\" (expected think --json output)")
            if kind == "token":
                records.setdefault(sample, []).append(record_of(event, where))
            elif kind == "end":
                ends[sample] = event
        else:
            raise LiveppError(f"{where}: unexpected line type {kind!r} in a think --json recording")
    if records or ends:
        raise LiveppError(f"{p}: the last run has no vote line (cut short?)")
    if not runs:
        raise LiveppError(f"{p} holds no think --json run")
    return runs


def _confidences(records: Sequence[TokenRecord]) -> list[float]:
    return [r.confidence for r in records if r.confidence is not None and not math.isnan(r.confidence)]


def simulate(run: RecordedRun, *, mode: str, eta: float, warmup: int = 4, traces: int | None = None, score: str = "lowest",
             tail_tokens: int | None = None, group: int | None = None) -> ThinkResult:
    """What ``think`` with these settings (and the recording's seeds) returns, from the recording."""
    group = group or run.group
    if not group:
        raise LiveppError("the recording does not say its group window: give one")
    recorded = run.traces[:traces] if traces else run.traces
    if mode == "online" and not 1 <= warmup < len(recorded):
        raise LiveppError(f"online needs 1 <= warmup < traces; the run has {len(recorded)} traces, warmup {warmup}")
    kw = dict(score=score, group=group, tail_tokens=tail_tokens)

    def full(t: RecordedTrace, warm: bool) -> Any:
        return outcome(t.sample, t.text, len(t.records), t.reason, _confidences(t.records), warmup=warm, **kw)

    if mode == "offline":
        outcomes = [full(t, False) for t in recorded]
        threshold = offline_threshold(outcomes, eta)
        settle(outcomes, mode=mode, threshold=threshold)
        return tally(mode, outcomes, threshold, score=score, group=group)
    warm = [full(t, True) for t in recorded[:warmup]]
    threshold = warmup_threshold([o.lowest for o in warm], eta)
    rest = []
    for t in recorded[warmup:]:
        live = Monitor(policies=[ConfidenceStop(threshold)], tracker_factory=lambda: Tracker(confidence_window=group)).run(RecordStream(t.records))
        assert live.end is not None
        if live.end.reason == "policy":
            rest.append(outcome(t.sample, live.text, live.end.n_tokens, "policy", _confidences(t.records[: live.end.n_tokens]), warmup=False, **kw))
        else:
            rest.append(full(t, False))
    outcomes = warm + rest
    settle(outcomes, mode=mode, threshold=threshold)
    return tally(mode, outcomes, threshold, score=score, group=group)


def _right(answer: str | None, run: RecordedRun) -> bool:
    return answer is not None and run.answers is not None and answer_matches(answer, run.answers)


def eta_sweep(runs: Sequence[RecordedRun], etas: Sequence[float], *, warmup: int = 4, traces: int | None = None, score: str = "lowest",
              tail_tokens: int | None = None, group: int | None = None) -> list[dict[str, Any]]:
    """One point per η over every run: tokens online and with every trace run,
    traces stopped, and (runs with answers) how many answers each way got right."""
    labelled = all(r.answers for r in runs)
    points = []
    for eta in etas:
        p: dict[str, Any] = {"eta": eta, "runs": len(runs), "online_tokens": 0, "all_tokens": 0, "stopped": 0, "excluded": 0, "traces": 0, "after_warmup": 0,
                             "online_right": 0, "offline_right": 0, "majority_right": 0}
        for run in runs:
            kw = dict(eta=eta, traces=traces, score=score, tail_tokens=tail_tokens, group=group)
            on, off = simulate(run, mode="online", warmup=warmup, **kw), simulate(run, mode="offline", **kw)
            p["online_tokens"] += on.tokens
            p["all_tokens"] += off.tokens
            p["traces"] += len(on.traces)
            p["after_warmup"] += len(on.traces) - warmup
            p["stopped"] += len(on.samples("stopped"))
            p["excluded"] += len(on.samples("excluded"))
            p["online_right"] += _right(on.answer, run)
            p["offline_right"] += _right(off.answer, run)
            p["majority_right"] += _right(off.majority, run)
        for key in ("online", "offline", "majority"):
            p[f"{key}_accuracy"] = p[f"{key}_right"] / len(runs) if labelled else None
        points.append(p)
    return points

"""DeepConf parallel thinking (facebookresearch/deepconf, "Deep Think with
Confidence", 2025), on any engine's batches
(one forward pass per step on the local torch engine).

Definitions (the paper's and its reference implementation's; the scores in
:mod:`livepp.car.trace_scores`):

* token confidence C = −(1/k)·Σ of the top-k raw logprobs (k = 20);
* group confidence = mean C over a sliding window of ``group`` tokens;
* a trace's score: its lowest group confidence (default), its tail
  confidence, the mean of its lowest 10 % of groups, or its mean C
  (``score``). A trace shorter than the window scores its whole mean; a trace
  with no confidences scores 0.

**Offline**: every trace runs to the end; the traces with an answer whose
score is at or above the (100 − η)-th percentile of their scores (the top
η %) vote, each weighted by its score.

**Online**: W warm-up traces run to the end and set the threshold
s = the (100 − η)-th percentile of their lowest group confidences (η = 10
keeps the 10 % most confident: DeepConf-low; η = 90: DeepConf-high). The
other traces run as one batch, and each stops as soon as a full group's
confidence falls below s. Then, as the reference's ``wrapper.py`` does, every
finished trace is checked after the fact: one whose lowest group confidence
is below s (possible only for a trace that ended before its first group was
full: its score is its whole mean) is *excluded*. The vote is over the
warm-up traces and the finished traces at or above s, weighted by ``score``.
With a consensus τ (e.g. 0.95), sampling stops once the leading answer holds
at least τ of the weighted vote; the rows still running are *cancelled*.

Stopped, cancelled and excluded traces never vote, and neither does a trace
with no extractable answer (:func:`livepp.car.answers.extract_answer`), in
DeepConf's vote, in the consensus share and in the baselines reported beside
it: plain majority and a vote weighted by mean confidence over every trace
that finished with an answer.

The window defaults to :func:`default_group` of the token budget: a window
longer than ``max_new_tokens`` can never be full, so no trace could be
stopped (a warning says so).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence

from livepp.car.answers import extract_answer
from livepp.car.trace_scores import SCORE_KINDS, trace_scores
from livepp.core.batch_monitor import MonitoredBatch, sample_emitter
from livepp.core.events import EndEvent, TokenEvent
from livepp.core.monitor import Sink
from livepp.core.params import GenerationParams, LiveppError
from livepp.core.policies import ConfidenceStop, Policy, warmup_threshold
from livepp.core.tracker import Tracker
from livepp.engines.protocol import Engine, Prompt
from livepp.engines.select import as_engine

__all__ = ["TraceOutcome", "ThinkResult", "weighted_vote", "default_group", "window_warning", "settle", "tally", "think"]

# Statuses of a trace after the vote.
VOTED, STOPPED, EXCLUDED, NO_ANSWER = "voted", "stopped", "excluded", "no_answer"
_NEVER_VOTE = ("cancelled", "shutdown", "error")  # end reasons: the trace was cut off from outside


@dataclass
class TraceOutcome:
    sample: int
    text: str
    answer: str | None  # None: no extractable answer
    n_tokens: int
    score: float  # the score the vote filters (offline) and weights by
    mean_confidence: float
    reason: str  # how the trace ended (the end event's reason)
    warmup: bool
    lowest: float = 0.0  # lowest group confidence: the online threshold and stop
    scores: dict[str, float] = field(default_factory=dict)
    status: str = ""  # voted | stopped | excluded | no_answer | cancelled | shutdown | error


@dataclass
class ThinkResult:
    mode: str
    answer: str | None
    weights: dict[str, float]
    threshold: float | None
    traces: list[TraceOutcome]
    kept: list[int]
    tokens: int
    majority: str | None = None
    mean_confidence_answer: str | None = None
    consensus_reached: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    score: str = "lowest"
    group: int | None = None
    warnings: list[str] = field(default_factory=list)
    question: str | None = None

    def samples(self, status: str) -> list[int]:
        return [t.sample for t in self.traces if t.status == status]

    def vote_dict(self) -> dict[str, Any]:
        return {
            "type": "vote", "mode": self.mode, "answer": self.answer, "weights": self.weights, "threshold": self.threshold,
            "traces": len(self.traces), "traces_kept": self.kept, "tokens": self.tokens,
            "stopped_early": self.samples(STOPPED), "excluded": self.samples(EXCLUDED), "no_answer": self.samples(NO_ANSWER),
            "cancelled": self.samples("cancelled"),
            "majority": self.majority, "mean_confidence_answer": self.mean_confidence_answer,
            "consensus_reached": self.consensus_reached, "score": self.score, "group": self.group, "warnings": self.warnings,
            "question": self.question,
        }


def weighted_vote(votes: Sequence[tuple[str, float]]) -> tuple[str | None, dict[str, float]]:
    """The answer with the largest total weight; ties go to the answer with
    more votes, then to the first to reach it (so weights that are all 0, the
    score of traces without confidences, fall back to a plain majority)."""
    weights: dict[str, float] = {}
    counts: dict[str, int] = {}
    for answer, weight in votes:
        weights[answer] = weights.get(answer, 0.0) + weight
        counts[answer] = counts.get(answer, 0) + 1
    if not weights:
        return None, {}
    order = {a: i for i, a in enumerate(weights)}
    return max(weights, key=lambda a: (weights[a], counts[a], -order[a])), weights


def default_group(max_new_tokens: int) -> int:
    """The group window for a token budget: 1/16 of it, between 8 and 2048
    tokens, never longer than the budget. The paper's 2048 is 1/16 of the
    reference's 32,000-token budget (its traces run to 10k+ tokens); the same
    ratio gives 16 for livepp's default 256."""
    return max(1, min(max_new_tokens, max(8, min(2048, max_new_tokens // 16))))


def window_warning(group: int, max_new_tokens: int, mode: str) -> str | None:
    """Why a window longer than the budget defeats DeepConf, or None when it fits."""
    if group <= max_new_tokens:
        return None
    if mode == "online":
        return (f"the group window ({group} tokens) is longer than max_new_tokens ({max_new_tokens}): no group can fill, so no trace "
                f"can be stopped online; use --group {default_group(max_new_tokens)} or less")
    return (f"the group window ({group} tokens) is longer than max_new_tokens ({max_new_tokens}): every trace's lowest group "
            f"confidence is its mean confidence")


def _status(o: TraceOutcome, gate: float, threshold: float) -> str:
    if o.reason in _NEVER_VOTE:
        return o.reason
    if o.reason == "policy":
        return STOPPED
    if o.answer is None:
        return NO_ANSWER
    return EXCLUDED if gate < threshold else VOTED


def settle(outcomes: Sequence[TraceOutcome], *, mode: str, threshold: float) -> None:
    """Give every trace its status: online, the gate is its lowest group
    confidence (the reference's after-the-fact check), offline its score."""
    for o in outcomes:
        o.status = _status(o, o.lowest if mode == "online" else o.score, threshold)


def offline_threshold(outcomes: Sequence[TraceOutcome], eta: float) -> float:
    """The (100 − η)-th percentile of the scores of the traces that can vote
    (those with an answer; all of them when none has one)."""
    finished = [o for o in outcomes if o.reason not in _NEVER_VOTE]
    with_answer = [o for o in finished if o.answer is not None] or finished or list(outcomes)
    return warmup_threshold([o.score for o in with_answer], eta) if with_answer else 0.0


def tally(mode: str, outcomes: list[TraceOutcome], threshold: float, *, score: str, group: int, consensus_reached: bool = False,
          notes: Sequence[str] = ()) -> ThinkResult:
    """The vote and the baselines over settled traces (module docstring)."""
    voting = [o for o in outcomes if o.status == VOTED]
    answer, weights = weighted_vote([(o.answer, o.score) for o in voting if o.answer is not None])
    finished = [o for o in outcomes if o.status in (VOTED, EXCLUDED)]
    majority, _ = weighted_vote([(o.answer, 1.0) for o in finished if o.answer is not None])
    by_conf, _ = weighted_vote([(o.answer, o.mean_confidence) for o in finished if o.answer is not None])
    return ThinkResult(mode, answer, weights, threshold, outcomes, [o.sample for o in voting], sum(o.n_tokens for o in outcomes),
                       majority, by_conf, consensus_reached=consensus_reached, score=score, group=group, warnings=list(notes))


def outcome(sample: int, text: str, n_tokens: int, reason: str, confidences: Sequence[float], *, warmup: bool, score: str,
            group: int, tail_tokens: int | None = None) -> TraceOutcome:
    """A finished trace with its scores (``confidences``: the tokens' that have one)."""
    scores = trace_scores(confidences, window=group, tail_tokens=tail_tokens)
    return TraceOutcome(sample, text, extract_answer(text), n_tokens, scores[score], scores["mean"], reason, warmup,
                        lowest=scores["lowest"], scores=scores)


def _run(engine: Engine, prompt: Prompt, params: list[GenerationParams], first_sample: int, *, group: int, score: str,
         tail_tokens: int | None, sinks: Sequence[Sink], stop_below: float | None = None, warmup: bool,
         consensus: Callable[[list[TraceOutcome]], bool] | None = None,
         policies: Callable[[], Sequence[Policy]] = lambda: []) -> list[TraceOutcome]:
    """Run a batch of traces; sample numbers start at ``first_sample``."""
    batch = MonitoredBatch(
        engine.open_batch([prompt] * len(params), params), params, model=engine.name, engine=engine.kind,
        policies=lambda i: [*policies(), *([ConfidenceStop(stop_below)] if stop_below is not None else [])],
        tracker_factory=lambda: Tracker(confidence_window=group),
        run_params={"confidence_window": group},
        sample_offset=first_sample,
    )
    emitters = [sample_emitter(s) for s in sinks]
    confidences: list[list[float]] = [[] for _ in params]
    outcomes: dict[int, TraceOutcome] = {}

    def ended(row: int, end: EndEvent) -> TraceOutcome:
        done = outcome(first_sample + row, end.text, end.n_tokens, end.reason, confidences[row], warmup=warmup, score=score,
                       group=group, tail_tokens=tail_tokens)
        outcomes[row] = done
        return done

    events = iter(batch)
    try:
        for row, event in events:
            for emit in emitters:
                emit(first_sample + row, event)
            if isinstance(event, TokenEvent):
                c = None if event.injected else event.confidence  # injected text is in no statistic
                if c is not None and not math.isnan(c):
                    confidences[row].append(c)
            elif isinstance(event, EndEvent):
                ended(row, event)
                if consensus is not None and consensus(list(outcomes.values())):
                    break
    finally:
        events.close()  # cancels the rows still running (consensus reached)
    # Rows cancelled by the close end after the loop; record them too.
    for row, session in enumerate(batch.sessions):
        if row not in outcomes and session.result.end is not None:
            for emit in emitters:
                emit(first_sample + row, session.result.end)
            ended(row, session.result.end)
    return [outcomes[row] for row in sorted(outcomes)]


def think(
    question: str,
    *,
    engine: Engine,
    traces: int = 16,
    warmup: int = 4,
    eta: float = 90.0,
    group: int | None = None,
    mode: str = "online",
    params: GenerationParams | None = None,
    prompt: str = "{question}",
    consensus: float | None = None,
    raw: bool = False,
    sinks: Sequence[Sink] = (),
    score: str = "lowest",
    tail_tokens: int | None = None,
    policies: Callable[[], Sequence[Policy]] = lambda: [],
) -> ThinkResult:
    """Answer ``question`` with DeepConf over ``traces`` sampled traces (module docstring).

    ``group`` None: :func:`default_group` of ``params.max_new_tokens``.
    ``score``: lowest | tail | bottom10 | mean (``tail_tokens``, default the
    window, for tail). ``policies``: more policies for every trace, e.g. an
    ``Inject`` that appends "Wait," to the traces it fires on (each trace its own)."""
    if mode not in ("online", "offline"):
        raise LiveppError(f"mode must be online or offline, got {mode!r}")
    if traces < 1 or (mode == "online" and not 1 <= warmup < traces):
        raise LiveppError(f"need traces >= 1 and, online, 1 <= warmup < traces; got traces={traces}, warmup={warmup}")
    if not 0 < eta <= 100:
        raise LiveppError(f"eta must be in (0, 100], got {eta}")
    if score not in SCORE_KINDS:
        raise LiveppError(f"score must be one of {', '.join(SCORE_KINDS)}, got {score!r}")
    params = params or GenerationParams(temperature=0.7, top_p=0.95, seed=0)
    group = default_group(params.max_new_tokens) if group is None else group
    if group < 1 or (tail_tokens is not None and tail_tokens < 1):
        raise LiveppError(f"group and tail tokens must be >= 1, got {group} and {tail_tokens}")
    if consensus is not None and not 0.5 < consensus <= 1:
        raise LiveppError(f"consensus must be in (0.5, 1], got {consensus}")
    if params.greedy:
        raise LiveppError("DeepConf samples its traces: give a temperature > 0")
    notes = [w for w in [window_warning(group, params.max_new_tokens, mode)] if w]
    for note in notes:
        warnings.warn(note, stacklevel=2)
    seed = params.seed if params.seed is not None else 0
    engine = as_engine(engine)
    text = prompt.format(question=question.strip())
    params = replace(params, raw=raw) if raw else params
    request = lambda j: replace(params, seed=seed + j)  # noqa: E731
    run = dict(group=group, score=score, tail_tokens=tail_tokens, sinks=sinks, policies=policies)

    if mode == "offline":
        outcomes = _run(engine, text, [request(j) for j in range(traces)], 0, warmup=False, **run)
        threshold = offline_threshold(outcomes, eta)
        settle(outcomes, mode=mode, threshold=threshold)
        return replace(tally(mode, outcomes, threshold, score=score, group=group, notes=notes), question=question)

    warm = _run(engine, text, [request(j) for j in range(warmup)], 0, warmup=True, **run)
    threshold = warmup_threshold([o.lowest for o in warm], eta)
    settle(warm, mode=mode, threshold=threshold)

    agreed = [False]

    def reached(done: list[TraceOutcome]) -> bool:
        if consensus is None:
            return False
        settle(done, mode=mode, threshold=threshold)
        votes = [(o.answer, o.score) for o in warm + done if o.status == VOTED and o.answer is not None]
        winner, weights = weighted_vote(votes)
        total = sum(weights.values())
        agreed[0] = winner is not None and total > 0 and weights[winner] / total >= consensus
        return agreed[0]

    rest = _run(engine, text, [request(j) for j in range(warmup, traces)], warmup, stop_below=threshold, warmup=False,
                consensus=reached, **run)
    outcomes = warm + rest
    settle(outcomes, mode=mode, threshold=threshold)
    return replace(tally(mode, outcomes, threshold, score=score, group=group, consensus_reached=agreed[0], notes=notes), question=question)

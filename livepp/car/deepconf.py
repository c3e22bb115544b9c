"""DeepConf parallel thinking (facebookresearch/deepconf, "Deep Think with
Confidence", 2025), on any engine's batches
(one forward pass per step on the local torch engine).

Definitions (the paper's, as livepp implements them):

* token confidence C = −(1/k)·Σ of the top-k raw logprobs (k = 20);
* group confidence = mean C over a sliding window of ``group`` tokens;
* a trace's score = its **lowest group confidence** over the positions where
  the window was full (the partial window's mean while it never filled:
  :class:`livepp.Tracker`).

**Offline**: every trace runs to the end; the traces whose score is at or
above the (100 − η)-th percentile of all scores are kept (the top η %), and
their answers are voted on, each weighted by its score. Plain majority over
all traces and a vote weighted by each trace's mean token confidence are
reported beside it.

**Online**: W warm-up traces run to the end and set the threshold
s = the (100 − η)-th percentile of their scores (η = 10 keeps the 10 % most
confident: DeepConf-low; η = 90: DeepConf-high). The other traces run as one
batch, and each stops as soon as its group confidence falls below s (checked
once its first group is full). The vote is over the warm-up traces scoring at
least s and the traces that finished, weighted by score. With a consensus
τ (e.g. 0.95), sampling stops once the leading answer holds at least τ of the
weighted vote; the rows still running are cancelled.

Answers are extracted as the routing vote does: the last number of the
reply, else its normalised text.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence

from livepp.core.batch_monitor import MonitoredBatch, sample_emitter
from livepp.engines.protocol import Engine, Prompt
from livepp.engines.select import as_engine
from livepp.core.events import EndEvent, TokenEvent
from livepp.core.monitor import Sink
from livepp.core.params import GenerationParams, LiveppError
from livepp.core.policies import ConfidenceStop, Policy, warmup_threshold
from livepp.car.answers import vote_key
from livepp.core.tracker import Tracker

__all__ = ["TraceOutcome", "ThinkResult", "weighted_vote", "think"]


@dataclass
class TraceOutcome:
    sample: int
    text: str
    answer: str
    n_tokens: int
    score: float  # lowest group confidence
    mean_confidence: float
    reason: str
    warmup: bool


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

    def vote_dict(self) -> dict[str, Any]:
        return {
            "type": "vote", "mode": self.mode, "answer": self.answer, "weights": self.weights, "threshold": self.threshold,
            "traces": len(self.traces), "traces_kept": self.kept, "tokens": self.tokens,
            "stopped_early": [t.sample for t in self.traces if t.reason == "policy"],
            "majority": self.majority, "mean_confidence_answer": self.mean_confidence_answer,
            "consensus_reached": self.consensus_reached,
        }


def weighted_vote(votes: Sequence[tuple[str, float]]) -> tuple[str | None, dict[str, float]]:
    """The answer with the largest total weight (ties: the first to reach it)."""
    weights: dict[str, float] = defaultdict(float)
    for answer, weight in votes:
        weights[answer] += weight
    if not weights:
        return None, {}
    return max(weights, key=lambda a: weights[a]), dict(weights)


def _run(engine: Engine, prompt: Prompt, params: list[GenerationParams], first_sample: int, *, group: int, sinks: Sequence[Sink],
         stop_below: float | None = None, warmup: bool, consensus: Any = None,
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
    conf_sum = [0.0] * len(params)
    outcomes: list[TraceOutcome] = []
    events = iter(batch)
    try:
        for row, event in events:
            sample = first_sample + row
            for emit in emitters:
                emit(sample, event)
            if isinstance(event, TokenEvent) and event.confidence is not None:
                conf_sum[row] += event.confidence
            elif isinstance(event, EndEvent):
                tracker = batch.sessions[row].tracker
                n = event.n_tokens
                outcomes.append(TraceOutcome(
                    sample, event.text, vote_key(event.text), n,
                    tracker.lowest_group_confidence if tracker.lowest_group_confidence is not None else float("-inf"),
                    conf_sum[row] / n if n else float("-inf"), event.reason, warmup))
                if consensus is not None and consensus(outcomes):
                    break
    finally:
        events.close()  # cancels the rows still running (consensus reached)
    # Rows cancelled by the close end after the loop; record them too.
    for row, session in enumerate(batch.sessions):
        if all(o.sample != first_sample + row for o in outcomes) and session.result.end is not None:
            end = session.result.end
            for emit in emitters:
                emit(first_sample + row, end)
            low = session.tracker.lowest_group_confidence
            outcomes.append(TraceOutcome(first_sample + row, end.text, vote_key(end.text), end.n_tokens,
                                         low if low is not None else float("-inf"), float("-inf"), end.reason, warmup))
    return sorted(outcomes, key=lambda o: o.sample)


def think(
    question: str,
    *,
    engine: Engine,
    traces: int = 16,
    warmup: int = 4,
    eta: float = 10.0,
    group: int = 2048,
    mode: str = "online",
    params: GenerationParams | None = None,
    prompt: str = "{question}",
    consensus: float | None = None,
    raw: bool = False,
    sinks: Sequence[Sink] = (),
    policies: Callable[[], Sequence[Policy]] = lambda: [],
) -> ThinkResult:
    """Answer ``question`` with DeepConf over ``traces`` sampled traces
    (module docstring). ``policies``: more policies for every trace, e.g. an
    ``Inject`` that appends "Wait," to the traces it fires on (each trace its own)."""
    if mode not in ("online", "offline"):
        raise LiveppError(f"mode must be online or offline, got {mode!r}")
    if traces < 1 or (mode == "online" and not 1 <= warmup < traces):
        raise LiveppError(f"need traces >= 1 and, online, 1 <= warmup < traces; got traces={traces}, warmup={warmup}")
    if not 0 < eta <= 100:
        raise LiveppError(f"eta must be in (0, 100], got {eta}")
    if group < 1:
        raise LiveppError(f"group must be >= 1, got {group}")
    if consensus is not None and not 0.5 < consensus <= 1:
        raise LiveppError(f"consensus must be in (0.5, 1], got {consensus}")
    params = params or GenerationParams(temperature=0.7, top_p=0.95, seed=0)
    if params.greedy:
        raise LiveppError("DeepConf samples its traces: give a temperature > 0")
    seed = params.seed if params.seed is not None else 0
    engine = as_engine(engine)
    text = prompt.format(question=question.strip())
    params = replace(params, raw=raw) if raw else params
    request = lambda j: replace(params, seed=seed + j)  # noqa: E731

    if mode == "offline":
        outcomes = _run(engine, text, [request(j) for j in range(traces)], 0, group=group, sinks=sinks, warmup=False, policies=policies)
        threshold = warmup_threshold([o.score for o in outcomes], eta)
        kept = [o for o in outcomes if o.score >= threshold]
    else:
        warm = _run(engine, text, [request(j) for j in range(warmup)], 0, group=group, sinks=sinks, warmup=True, policies=policies)
        threshold = warmup_threshold([o.score for o in warm], eta)
        kept = [o for o in warm if o.score >= threshold]

        def reached(done: list[TraceOutcome]) -> bool:
            if consensus is None:
                return False
            votes = [(o.answer, o.score) for o in kept + [d for d in done if d.reason != "policy"]]
            winner, weights = weighted_vote(votes)
            total = sum(weights.values())
            return winner is not None and total > 0 and weights[winner] / total >= consensus

        rest = _run(engine, text, [request(j) for j in range(warmup, traces)], warmup, group=group, sinks=sinks,
                    stop_below=threshold, warmup=False, consensus=reached, policies=policies)
        outcomes = warm + rest
        kept = kept + [o for o in rest if o.reason not in ("policy", "cancelled")]
    answer, weights = weighted_vote([(o.answer, o.score) for o in kept])
    majority, _ = weighted_vote([(o.answer, 1.0) for o in outcomes if o.reason != "policy"])
    by_conf, _ = weighted_vote([(o.answer, o.mean_confidence) for o in outcomes if o.reason != "policy"])
    cancelled = any(o.reason == "cancelled" for o in outcomes)
    return ThinkResult(mode, answer, weights, threshold, outcomes, [o.sample for o in kept], sum(o.n_tokens for o in outcomes),
                       majority, by_conf, consensus_reached=cancelled)

"""CAR routing: a short answer first, long reasoning only when its PPL says so.

1. The model answers briefly (``SHORT_PROMPT``) while the monitor tracks PPL.
2. The calibration turns the short answer's PPL into P(correct | PPL).
3. Below the threshold the question goes to a *long route*; otherwise the
   short answer is returned. With ``early=True`` the :class:`CARRouter`
   policy routes during the short answer, without finishing it.

The long route is pluggable because step-by-step prompting is not always
better (it is not for a 135M model): :class:`StepByStep` (same or another
model, e.g. ``--long-model``) or :class:`Vote` (several sampled short answers,
majority vote).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

from livepp.car.calibration import Calibration
from livepp.core.monitor import Monitor, Result, Sink
from livepp.core.params import GenerationParams, LiveppError
from livepp.core.policies import CARRouter
from livepp.engines.protocol import Engine
from livepp.engines.select import as_engine
from livepp.car.answers import extract_answer

__all__ = ["SHORT_PROMPT", "LONG_PROMPT", "LongRoute", "StepByStep", "Vote", "DeepConfRoute", "RouteOutcome", "short_answer", "route"]

SHORT_PROMPT = "{question} Answer briefly."
LONG_PROMPT = "{question}\nThink step by step, then give the final answer on the last line."


@dataclass
class LongAnswer:
    text: str
    n_tokens: int
    detail: dict[str, Any] = field(default_factory=dict)


class LongRoute(Protocol):
    name: str

    def run(self, question: str, sinks: Sequence[Sink]) -> LongAnswer: ...


def _run(engine: Engine, prompt: str, params: GenerationParams, sinks: Sequence[Sink], policies: Sequence[Any] = ()) -> Result:
    return Monitor(policies=policies, sinks=sinks).run(engine.open(prompt, params), model=engine.name, params=params.to_dict(), engine=engine.kind)


class StepByStep:
    """Ask for step-by-step reasoning, on the same or another model."""

    def __init__(self, engine: Engine, *, max_new_tokens: int = 256) -> None:
        self.engine = engine = as_engine(engine)
        self.max_new_tokens = max_new_tokens
        self.name = f"step-by-step({engine.name})"

    def run(self, question: str, sinks: Sequence[Sink]) -> LongAnswer:
        params = GenerationParams(max_new_tokens=self.max_new_tokens)
        result = _run(self.engine, LONG_PROMPT.format(question=question), params, sinks)
        assert result.end is not None
        return LongAnswer(result.text, result.end.n_tokens, {"ppl": result.end.ppl, "reason": result.end.reason})


class Vote:
    """Sample ``n`` short answers and return the most common one."""

    def __init__(self, engine: Engine, *, n: int = 5, temperature: float = 0.7, max_new_tokens: int = 24, seed: int = 0) -> None:
        if n < 2:
            raise LiveppError("a vote needs at least 2 samples")
        engine = as_engine(engine)
        self.engine, self.n, self.temperature, self.max_new_tokens, self.seed = engine, n, temperature, max_new_tokens, seed
        self.name = f"vote({n}x{engine.name})"

    def run(self, question: str, sinks: Sequence[Sink]) -> LongAnswer:
        # All answers are sampled as one batch (draw i: seed + i); an engine
        # without batching runs them one after another.
        from livepp.api import generate_many

        params = GenerationParams(max_new_tokens=self.max_new_tokens, temperature=self.temperature, seed=self.seed)
        results = generate_many([SHORT_PROMPT.format(question=question)], n=self.n, model=self.engine, params=params, sinks=sinks)
        return self._tally([r.text for r in results], sum(r.end.n_tokens for r in results if r.end))

    @staticmethod
    def _tally(texts: list[str], tokens: int) -> LongAnswer:
        # A sample with no extractable answer does not vote (as in DeepConf).
        counts = Counter(a for a in map(extract_answer, texts) if a is not None)
        if not counts:
            return LongAnswer(texts[0] if texts else "", tokens, {"votes": 0, "samples": texts})
        winner, votes = counts.most_common(1)[0]
        text = next(t for t in texts if extract_answer(t) == winner)
        return LongAnswer(text, tokens, {"votes": votes, "samples": texts})


class DeepConfRoute:
    """DeepConf over sampled step-by-step traces, one batch, confidence-weighted vote."""

    def __init__(self, engine: Engine, *, traces: int = 8, warmup: int = 3, eta: float = 90.0, group: int = 16,
                 max_new_tokens: int = 256, seed: int = 0) -> None:
        self.engine, self.traces, self.warmup, self.eta, self.group = as_engine(engine), traces, warmup, eta, group
        self.max_new_tokens, self.seed = max_new_tokens, seed
        self.name = f"deepconf({traces} traces, eta {eta:g})"

    def run(self, question: str, sinks: Sequence[Sink]) -> LongAnswer:
        from livepp.car.deepconf import think

        params = GenerationParams(max_new_tokens=self.max_new_tokens, temperature=0.7, top_p=0.95, seed=self.seed)
        result = think(question, engine=self.engine, traces=self.traces, warmup=self.warmup, eta=self.eta, group=self.group,
                       params=params, prompt=LONG_PROMPT, sinks=sinks)
        winner = next((o for o in result.traces if o.sample in result.kept and o.answer == result.answer), None)
        return LongAnswer(winner.text if winner else "", result.tokens, {"vote": result.vote_dict()})


@dataclass
class RouteOutcome:
    question: str
    short: Result
    ppl: float
    posterior: float
    threshold: float
    routed: bool
    early: bool
    long_route: str | None = None
    long: LongAnswer | None = None
    # "cancelled" or "shutdown" when the request was stopped before an answer:
    # then no decision was made and no long stage ran.
    stopped: str | None = None

    @property
    def answer(self) -> str:
        return self.long.text if self.long is not None else self.short.text

    @property
    def tokens_short(self) -> int:
        return self.short.end.n_tokens if self.short.end else 0

    @property
    def tokens_long(self) -> int:
        return self.long.n_tokens if self.long is not None else 0

    def decision_dict(self) -> dict[str, Any]:
        return {
            "type": "route", "ppl": self.ppl, "posterior_correct": self.posterior, "threshold": self.threshold,
            "decision": "long" if self.routed else "short", "early": self.early, "long_route": self.long_route,
        }

    def answer_dict(self) -> dict[str, Any]:
        if self.stopped is not None:
            return {"type": "answer", "text": None, "answer_from": None, "stopped": self.stopped,
                    "tokens_short": self.tokens_short, "tokens_long": self.tokens_long,
                    "tokens_total": self.tokens_short + self.tokens_long}
        return {
            "type": "answer", "text": self.answer, "answer_from": "long" if self.routed else "short",
            "tokens_short": self.tokens_short, "tokens_long": self.tokens_long,
            "tokens_total": self.tokens_short + self.tokens_long,
        }


def short_answer(engine: Engine, question: str, *, max_new_tokens: int = 24, sinks: Sequence[Sink] = (), policies: Sequence[Any] = ()) -> Result:
    """The short answer, greedy, with its PPL tracked live."""
    if not isinstance(question, str) or not question.strip():
        raise LiveppError("the question is empty")
    return _run(as_engine(engine), SHORT_PROMPT.format(question=question.strip()), GenerationParams(max_new_tokens=max_new_tokens), sinks, policies)


def route(
    question: str,
    *,
    engine: Engine,
    calibration: Calibration,
    long_route: LongRoute | None = None,
    early: bool = False,
    short_max_new_tokens: int = 24,
    sinks_for: Callable[[str], Sequence[Sink]] = lambda stage: (),
    on_decision: Callable[[RouteOutcome], None] | None = None,
) -> RouteOutcome:
    """Answer ``question`` by CAR routing (see the module docstring)."""
    engine = as_engine(engine)
    router = CARRouter(calibration, early=early)
    short = short_answer(engine, question, max_new_tokens=short_max_new_tokens, sinks=sinks_for("short"), policies=[router])
    assert short.end is not None
    if short.end.reason in ("cancelled", "shutdown"):
        # Stopped from outside: no decision on a partial answer, no long stage.
        return RouteOutcome(question, short, short.end.ppl, float("nan"), calibration.threshold, False, False, stopped=short.end.reason)
    routed_early = short.end.reason == "policy"
    ppl = short.end.ppl
    # An early route was decided by the calibration of its prefix length.
    used = (calibration.for_prefix(short.end.n_tokens) or calibration) if routed_early and calibration.prefix_models else calibration
    posterior = used.posterior_correct(ppl)
    routed = routed_early or calibration.should_route(ppl)
    long_route = long_route or StepByStep(engine)
    outcome = RouteOutcome(question, short, ppl, posterior, calibration.threshold, routed, routed_early, long_route.name if routed else None)
    if on_decision is not None:
        on_decision(outcome)
    if routed:
        outcome.long = long_route.run(question.strip(), sinks_for("long"))
        reason = outcome.long.detail.get("reason")
        if reason in ("cancelled", "shutdown"):
            outcome.stopped = reason
    return outcome

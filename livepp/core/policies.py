"""Policies: small objects that look at the tracker after each token and decide.

A policy has one method, ``check(event, tracker) -> Decision``. It sees the
token event just built and the tracker that already counted it, and returns
``CONTINUE`` or a decision to stop, route or note, with a human reason.
Policies compose with :func:`run_policies`: they are asked in order, notes
are collected, and the first stop or route wins. Policies hold their own small
state (``patience`` counters), so use a fresh instance per generation or call
``reset()``.
"""

from __future__ import annotations

import math
import re
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Literal, Protocol, Sequence, runtime_checkable

from livepp.core.events import TokenEvent
from livepp.core.params import LiveppError
from livepp.core.tracker import Tracker

__all__ = [
    "Action",
    "Decision",
    "CONTINUE",
    "Policy",
    "EarlyStop",
    "SpikeAlert",
    "ConfidenceStop",
    "VarentropyStop",
    "StepPPL",
    "CARRouter",
    "Inject",
    "injects",
    "warmup_threshold",
    "parse_policy",
    "run_policies",
]

Action = Literal["continue", "stop", "route", "note", "inject"]


@dataclass(frozen=True, slots=True)
class Decision:
    action: Action
    policy: str = ""
    reason: str = ""
    text: str | None = None  # what an "inject" decision appends


CONTINUE = Decision("continue")


@runtime_checkable
class Policy(Protocol):
    name: str

    def check(self, event: TokenEvent, tracker: Tracker) -> Decision: ...

    def reset(self) -> None: ...


_METRICS = {
    "window_ppl": lambda t: t.window_ppl,
    "ppl": lambda t: t.ppl,
    "ema_ppl": lambda t: t.ema_ppl,
}


class _Streak:
    """How many checked tokens in a row a condition has held, against a patience."""

    def __init__(self, patience: int) -> None:
        self.patience, self.count = patience, 0

    def reset(self) -> None:
        self.count = 0

    def holds(self, condition: bool) -> bool:
        """Count this token; True once the condition has held ``patience`` times in a row."""
        self.count = self.count + 1 if condition else 0
        return self.count >= self.patience


class EarlyStop:
    """Stop when a perplexity crosses a threshold.

    ``metric`` is ``window_ppl`` (the last W tokens), ``ppl`` (everything so
    far) or ``ema_ppl`` (exp of the EMA of nll). The condition is
    ``metric > threshold``; it is not checked before ``min_tokens`` tokens have
    been counted, and must hold on ``patience`` consecutive tokens. The stop is
    therefore issued on the first token at which the condition has held
    ``patience`` times in a row, counting only tokens at index >= min_tokens-1.
    """

    def __init__(
        self,
        threshold: float,
        *,
        metric: str = "window_ppl",
        min_tokens: int = 1,
        patience: int = 1,
    ) -> None:
        if metric not in _METRICS:
            raise ValueError(f"unknown metric {metric!r}; choose one of {sorted(_METRICS)}")
        if not (threshold > 1.0 and math.isfinite(threshold)):
            raise ValueError(f"a PPL threshold must be a finite number > 1, got {threshold}")
        if min_tokens < 1:
            raise ValueError(f"min_tokens must be >= 1, got {min_tokens}")
        if patience < 1:
            raise ValueError(f"patience must be >= 1, got {patience}")
        self.threshold = threshold
        self.metric = metric
        self.min_tokens = min_tokens
        self.patience = patience
        self.name = f"EarlyStop({metric}>{threshold:g})"
        self._value = _METRICS[metric]
        self._streak = _Streak(patience)

    def reset(self) -> None:
        self._streak.reset()

    def check(self, event: TokenEvent, tracker: Tracker) -> Decision:
        if tracker.n < self.min_tokens:
            return CONTINUE
        value = self._value(tracker)
        if not self._streak.holds(value > self.threshold):
            return CONTINUE
        return Decision(
            "stop",
            self.name,
            f"{self.metric} {value:.3f} > {self.threshold:g} "
            f"for {self._streak.count} token(s) after {tracker.n} tokens",
        )


def run_policies(policies: Iterable[Policy], event: TokenEvent, tracker: Tracker) -> list[Decision]:
    """Ask each policy in order and return what they said that was not continue.

    Notes and injections never end a generation, so they are kept and asking
    goes on; the first stop or route wins, ends the round and is the last item
    returned.
    """
    said: list[Decision] = []
    for policy in policies:
        decision = policy.check(event, tracker)
        if decision.action == "continue":
            continue
        said.append(decision)
        if decision.action not in ("note", "inject"):
            break
    return said


_WHEN = re.compile(r"^\s*(window_ppl|ppl|ema_ppl|entropy|varentropy|confidence|surprise_z)\s*([<>])\s*([-+0-9.eE]+)\s*$")
_WHEN_VALUE: dict[str, Callable[[TokenEvent, Tracker], float | None]] = {
    "window_ppl": lambda e, t: t.window_ppl, "ppl": lambda e, t: t.ppl, "ema_ppl": lambda e, t: t.ema_ppl,
    "entropy": lambda e, t: e.entropy, "varentropy": lambda e, t: e.varentropy, "confidence": lambda e, t: e.confidence,
    "surprise_z": lambda e, t: e.surprise_z,
}


class Inject:
    """An intervention: when ``when`` holds (``METRIC>X`` or ``METRIC<X``,
    METRIC one of window_ppl, ppl, ema_ppl, entropy, varentropy, confidence,
    surprise_z), the engine appends ``text`` to the sequence (e.g. "\\nWait,"
    to make the model reconsider, or an end-of-thinking marker to force the
    answer) and decodes on from it. At most ``max`` injections per
    generation, ``gap`` counted tokens apart, none before ``min_tokens``.
    Injected tokens are shown (``"injected": true``) but counted in no
    statistic and seen by no policy."""

    def __init__(self, text: str, *, when: str = "window_ppl>6", min_tokens: int = 1, max: int = 1, gap: int = 16) -> None:
        match = _WHEN.match(when)
        if match is None:
            raise ValueError(f"when must be METRIC>X or METRIC<X with METRIC one of {', '.join(_WHEN_VALUE)}, got {when!r}")
        if not text:
            raise ValueError("text must not be empty")
        if max < 1 or min_tokens < 1 or gap < 1:
            raise ValueError("max, min_tokens and gap must be >= 1")
        self.metric, self.op, self.threshold = match.group(1), match.group(2), float(match.group(3))
        self.text, self.min_tokens, self.max, self.gap = text, min_tokens, max, gap
        self.name = f"Inject({self.metric}{self.op}{self.threshold:g})"
        self.reset()

    def reset(self) -> None:
        self.count = 0
        self.last_at: int | None = None

    def check(self, event: TokenEvent, tracker: Tracker) -> Decision:
        if self.count >= self.max or tracker.n < self.min_tokens:
            return CONTINUE
        if self.last_at is not None and tracker.n - self.last_at < self.gap:
            return CONTINUE
        value = _WHEN_VALUE[self.metric](event, tracker)
        if value is None or not (value > self.threshold if self.op == ">" else value < self.threshold):
            return CONTINUE
        self.count += 1
        self.last_at = tracker.n
        return Decision("inject", self.name, f"{self.metric} {value:.3f} {self.op} {self.threshold:g}: inject {self.text!r} "
                                             f"({self.count} of at most {self.max})", text=self.text)


def injects(policies: Iterable[Any]) -> bool:
    """Whether any of ``policies`` may ask the engine to inject text."""
    return any(isinstance(p, Inject) for p in policies)


def _unescape(text: str) -> str:
    """Backslash escapes of a command-line spec: \\n, \\t and \\\\."""
    return re.sub(r"\\([nt\\])", lambda m: {"n": "\n", "t": "\t", "\\": "\\"}[m.group(1)], text)


class SpikeAlert:
    """Note (never stop) tokens whose NLL is ``z`` standard deviations above
    the mean NLL of the tokens before them (the tracker's ``surprise_z``)."""

    def __init__(self, z: float = 3.0, *, min_tokens: int = 8) -> None:
        if not z > 0:
            raise ValueError(f"z must be > 0, got {z}")
        self.z = z
        self.min_tokens = min_tokens
        self.name = f"SpikeAlert(z>{z:g})"

    def reset(self) -> None:
        pass

    def check(self, event: TokenEvent, tracker: Tracker) -> Decision:
        zs = tracker.surprise_z
        if tracker.n < self.min_tokens or zs is None or zs <= self.z:
            return CONTINUE
        return Decision("note", self.name, f"surprise spike: token {event.text!r} nll {tracker.last_nll:.2f}, z = {zs:.1f}")


def warmup_threshold(lowest_group_confidences: Sequence[float], keep_percent: float) -> float:
    """DeepConf online threshold from warm-up traces, "keep the most confident eta %".

    Definition used by livepp: the threshold is the value that ``keep_percent``
    percent of the warm-up traces reach or exceed with their *lowest* group
    confidence, i.e. the (100 − keep_percent)-th percentile of those values
    (linear interpolation between order statistics). keep_percent = 10 keeps
    only the 10 % most confident traces (DeepConf-low); 90 keeps almost all
    (DeepConf-high). A trace is then stopped as soon as its group confidence
    falls *below* the threshold.
    """
    values = sorted(float(v) for v in lowest_group_confidences)
    if not values:
        raise LiveppError("need at least one warm-up trace to set a confidence threshold")
    if not 0 < keep_percent <= 100:
        raise LiveppError(f"keep_percent must be in (0, 100], got {keep_percent}")
    if any(math.isnan(v) for v in values):
        raise LiveppError("a warm-up score is NaN; a trace without confidences scores 0 (livepp.car.trace_scores)")
    q = (100.0 - keep_percent) / 100.0 * (len(values) - 1)
    lo = math.floor(q)
    hi = min(lo + 1, len(values) - 1)
    if q == lo or values[hi] == values[lo]:
        return values[lo]  # no interpolation: also keeps inf - inf out
    if math.isinf(values[lo]) or math.isinf(values[hi]):
        return values[hi] if math.isinf(values[hi]) and values[hi] > 0 else values[lo]
    return values[lo] + (values[hi] - values[lo]) * (q - lo)


class ConfidenceStop:
    """DeepConf online: stop when the group confidence (mean token confidence
    over the tracker's ``confidence_window``) falls below ``threshold``.

    Not checked before ``min_tokens`` tokens (default: once the first group
    is full, as DeepConf does). Set ``threshold`` directly, or build with
    :meth:`from_warmup` from the lowest group confidences of warm-up traces.
    """

    def __init__(self, threshold: float, *, min_tokens: int | None = None) -> None:
        if math.isnan(threshold):
            raise ValueError(f"threshold must be a number, got {threshold}")
        self.threshold = threshold
        self.min_tokens = min_tokens
        self.name = f"ConfidenceStop(group_confidence<{threshold:.4g})"

    @classmethod
    def from_warmup(cls, lowest_group_confidences: Sequence[float], *, keep_percent: float = 10.0, min_tokens: int | None = None) -> "ConfidenceStop":
        return cls(warmup_threshold(lowest_group_confidences, keep_percent), min_tokens=min_tokens)

    def reset(self) -> None:
        pass

    def check(self, event: TokenEvent, tracker: Tracker) -> Decision:
        g = tracker.group_confidence
        needed = self.min_tokens if self.min_tokens is not None else tracker.confidence_window
        if g is None or tracker.n < needed or g >= self.threshold:
            return CONTINUE
        return Decision("stop", self.name, f"group confidence {g:.3f} < {self.threshold:.4g} after {tracker.n} tokens")


class VarentropyStop:
    """Stop (or note) when the model is lost rather than choosing: the token's
    varentropy (variance of −log p under the raw distribution; high when the
    mass is spread over options of very different likelihood, entropix's
    "lost" signal) exceeds ``threshold`` on ``patience`` consecutive tokens,
    checked from ``min_tokens`` on. Tokens without a varentropy (remote
    streams) never count."""

    def __init__(self, threshold: float, *, min_tokens: int = 1, patience: int = 1, action: str = "stop") -> None:
        if not (threshold > 0 and math.isfinite(threshold)):
            raise ValueError(f"a varentropy threshold must be a finite number > 0, got {threshold}")
        if min_tokens < 1 or patience < 1:
            raise ValueError(f"min_tokens and patience must be >= 1, got {min_tokens}, {patience}")
        if action not in ("stop", "note"):
            raise ValueError(f"action must be stop or note, got {action!r}")
        self.threshold, self.min_tokens, self.patience, self.action = threshold, min_tokens, patience, action
        self.name = f"VarentropyStop(varentropy>{threshold:g})"
        self._streak = _Streak(patience)

    def reset(self) -> None:
        self._streak.reset()

    def check(self, event: TokenEvent, tracker: Tracker) -> Decision:
        if tracker.n < self.min_tokens:
            return CONTINUE
        v = event.varentropy
        if not self._streak.holds(v is not None and v > self.threshold):
            return CONTINUE
        return Decision(self.action, self.name, f"varentropy {v:.3f} > {self.threshold:g} for {self._streak.count} token(s) after {tracker.n} tokens")  # type: ignore[arg-type]


class StepPPL:
    """Judge reasoning steps: when a step's PPL exceeds ``threshold`` (steps
    of at least ``min_tokens`` tokens), ``action``: stop, note or route.
    Steps are the monitor's (a blank line or a new "Step N" / numbered line
    ends one; ``--step-regex`` changes the rule).

    The step PPL is the PPL of the step's own tokens given everything before
    them: exp of their mean NLL, as the model generated them. It is not
    SPIRIT's step measure (the change in the PPL of the rest of the solution
    when the step is removed), which needs the text re-scored without the
    step; livepp does not compute that one."""

    def __init__(self, threshold: float, *, action: str = "stop", min_tokens: int = 1) -> None:
        if not (threshold > 1.0 and math.isfinite(threshold)):
            raise ValueError(f"a PPL threshold must be a finite number > 1, got {threshold}")
        if action not in ("stop", "note", "route"):
            raise ValueError(f"action must be stop, note or route, got {action!r}")
        if min_tokens < 1:
            raise ValueError(f"min_tokens must be >= 1, got {min_tokens}")
        self.threshold, self.action, self.min_tokens = threshold, action, min_tokens
        self.name = f"StepPPL(step ppl>{threshold:g})"

    def reset(self) -> None:
        pass

    def check(self, event: TokenEvent, tracker: Tracker) -> Decision:
        return CONTINUE  # judged per step, in check_step

    def check_step(self, step: Any, tracker: Tracker) -> Decision:
        n = step.end_token - step.start_token + 1
        if n < self.min_tokens or not step.ppl > self.threshold:
            return CONTINUE
        return Decision(self.action, self.name, f"step {step.index} (tokens {step.start_token}-{step.end_token}) "  # type: ignore[arg-type]
                                                f"has PPL {step.ppl:.3f} > {self.threshold:g}")


class RoutingCalibration(Protocol):
    """What :class:`CARRouter` asks of a calibration (``livepp.car.calibration.Calibration``)."""

    threshold: float
    early_min_tokens: int | None
    prefix_models: Any

    def posterior_correct(self, ppl: float) -> float: ...

    def should_route(self, ppl: float) -> bool: ...

    def for_prefix(self, n_tokens: int) -> "RoutingCalibration | None": ...


class CARRouter:
    """CAR decision on a short answer's running PPL.

    At the end of the short answer the caller asks :meth:`decide`. With
    ``early=True`` the router also acts live: at token t (once ``min_tokens``
    tokens are in) it compares the running PPL with the calibration fitted on
    prefixes of length t (:meth:`Calibration.for_prefix`), since the PPL of a
    prefix is distributed differently from a finished answer's, and returns
    ``route`` when P(correct | prefix PPL) < threshold, without finishing the
    short answer. ``min_tokens`` defaults to the calibration's
    ``early_min_tokens`` (chosen from held-out data). Without a valid prefix
    model (an old file, too few answers to cross-validate, or no prefix close
    enough to the finished answers) early routing does not fire, unless
    ``min_tokens`` is given: then the finished-answer model is applied to
    the prefix, which the caller chose knowingly.
    """

    def __init__(self, calibration: RoutingCalibration, *, early: bool = False, min_tokens: int | None = None) -> None:
        self.calibration = calibration
        self.early = early
        if min_tokens is None:
            min_tokens = calibration.early_min_tokens if calibration.early_min_tokens is not None else sys.maxsize
        self.min_tokens = min_tokens
        self.name = "CARRouter"

    def reset(self) -> None:
        pass

    def decide(self, ppl: float) -> Decision:
        p = self.calibration.posterior_correct(ppl)
        verdict = f"P(correct | PPL {ppl:.3f}) = {p:.3f} vs threshold {self.calibration.threshold:g}"
        if self.calibration.should_route(ppl):
            return Decision("route", self.name, verdict + ": route to long reasoning")
        return Decision("continue", self.name, verdict + ": keep the short answer")

    def check(self, event: TokenEvent, tracker: Tracker) -> Decision:
        if not self.early or tracker.n < self.min_tokens:
            return CONTINUE
        cal = self.calibration.for_prefix(tracker.n) if self.calibration.prefix_models else self.calibration
        if cal is None:
            return CONTINUE
        ppl = tracker.ppl
        p = cal.posterior_correct(ppl)
        if not cal.should_route(ppl):
            return CONTINUE
        return Decision("route", self.name, f"P(correct | PPL {ppl:.3f} after {tracker.n} tokens) = {p:.3f} "
                                            f"vs threshold {cal.threshold:g} (prefix calibration): route early to long reasoning")


_SPECS: dict[str, Any] = {
    "early-stop": (EarlyStop, {"threshold": float, "metric": str, "min_tokens": int, "patience": int}),
    "spike": (SpikeAlert, {"z": float, "min_tokens": int}),
    "confidence-stop": (ConfidenceStop, {"threshold": float, "min_tokens": int}),
    "varentropy-stop": (VarentropyStop, {"threshold": float, "min_tokens": int, "patience": int, "action": str}),
    "step-ppl": (StepPPL, {"threshold": float, "action": str, "min_tokens": int}),
    "inject": (Inject, {"when": str, "min_tokens": int, "max": int, "gap": int, "text": str}),
}


def parse_policy(spec: str) -> Policy:
    """Build a policy from ``NAME[:key=value,...]``.

    Names: ``early-stop`` (threshold, metric, min_tokens, patience),
    ``spike`` (z, min_tokens), ``confidence-stop`` (threshold, min_tokens),
    ``varentropy-stop`` (threshold, min_tokens, patience, action=stop|note),
    ``step-ppl`` (threshold, action=stop|note|route, min_tokens),
    ``inject`` (when, min_tokens, max, gap, and text last: everything after
    ``text=`` is the text, commas included, with \\n and \\t escapes).
    Example: ``early-stop:threshold=8,metric=window_ppl,min_tokens=16``,
    ``inject:when=window_ppl>6,max=2,text=\\nWait,``.
    """
    name, _, rest = spec.strip().partition(":")
    if name not in _SPECS:
        raise LiveppError(f"unknown policy {name!r} in {spec!r}; known: {', '.join(_SPECS)}")
    cls, types = _SPECS[name]
    kwargs: dict[str, Any] = {}
    if name == "inject":
        head, found, text = rest.partition("text=")
        if not found or (head and not head.rstrip().endswith(",")):
            raise LiveppError("policy inject needs text=... as its last option, e.g. inject:when=window_ppl>6,text=\\nWait,")
        kwargs["text"], rest = _unescape(text), head.rstrip().rstrip(",")
    for item in filter(None, (x.strip() for x in rest.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not eq or key not in types:
            raise LiveppError(f"policy {name}: bad option {item!r}; options: {', '.join(types)}")
        try:
            kwargs[key] = types[key](value.strip())
        except ValueError:
            raise LiveppError(f"policy {name}: {key} must be a {types[key].__name__}, got {value!r}") from None
    if name not in ("spike", "inject") and "threshold" not in kwargs:
        raise LiveppError(f"policy {name} needs threshold=..., e.g. {name}:threshold=8")
    try:
        return cls(**kwargs)
    except ValueError as exc:
        raise LiveppError(f"policy {spec!r}: {exc}") from exc

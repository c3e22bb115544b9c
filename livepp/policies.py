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
from dataclasses import dataclass
from typing import Iterable, Literal, Protocol, runtime_checkable

from .events import TokenEvent
from .tracker import Tracker

__all__ = [
    "Action",
    "Decision",
    "CONTINUE",
    "Policy",
    "EarlyStop",
    "run_policies",
]

Action = Literal["continue", "stop", "route", "note"]


@dataclass(frozen=True, slots=True)
class Decision:
    action: Action
    policy: str = ""
    reason: str = ""


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
        self._streak = 0

    def reset(self) -> None:
        self._streak = 0

    def check(self, event: TokenEvent, tracker: Tracker) -> Decision:
        if tracker.n < self.min_tokens:
            return CONTINUE
        value = self._value(tracker)
        if value > self.threshold:
            self._streak += 1
        else:
            self._streak = 0
        if self._streak < self.patience:
            return CONTINUE
        return Decision(
            "stop",
            self.name,
            f"{self.metric} {value:.3f} > {self.threshold:g} "
            f"for {self._streak} token(s) after {tracker.n} tokens",
        )


def run_policies(policies: Iterable[Policy], event: TokenEvent, tracker: Tracker) -> list[Decision]:
    """Ask each policy in order and return what they said that was not continue.

    Notes never end a generation, so every note is kept and asking goes on; the
    first stop or route wins, ends the round and is the last item returned.
    """
    said: list[Decision] = []
    for policy in policies:
        decision = policy.check(event, tracker)
        if decision.action == "continue":
            continue
        said.append(decision)
        if decision.action != "note":
            break
    return said

"""Sweeps: one policy option stepped over a range, the trade-off at each value,
and which values are worth choosing (the Pareto front).

A sweep spec is a policy spec (:func:`livepp.core.policies.parse_policy`)
whose one swept option reads ``LO..HI:STEP``, e.g.
``early-stop:threshold=1.5..6:0.25,min_tokens=16``. :func:`sweep` runs
:func:`livepp.core.replay.replay` once per value, so every point equals
``livepp replay TRACES --policy SPEC`` with that value.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Sequence

from livepp.core.params import LiveppError
from livepp.core.policies import parse_policy
from livepp.core.replay import PolicyReport, Trace, replay

__all__ = ["Sweep", "parse_range", "parse_sweep", "sweep", "pareto_front", "MAX_POINTS"]

MAX_POINTS = 400
_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_RANGE = re.compile(rf"^({_NUMBER})\.\.({_NUMBER}):({_NUMBER})$")


def parse_range(text: str) -> list[float]:
    """``LO..HI:STEP`` → LO, LO+STEP, ... up to HI (included when it falls on a step)."""
    m = _RANGE.match(text.strip())
    if m is None:
        raise LiveppError(f"a range is LO..HI:STEP, e.g. 1.5..6:0.25; got {text!r}")
    lo, hi, step = (float(g) for g in m.groups())
    if not step > 0 or hi < lo:
        raise LiveppError(f"a range needs LO <= HI and STEP > 0; got {text!r}")
    n = int((hi - lo) / step + 1e-9) + 1
    if n > MAX_POINTS:
        raise LiveppError(f"{text!r} has {n} points; at most {MAX_POINTS}")
    # Rounded so 0.1-steps print as written (1.5, 1.75, ... not 1.7500000000000002).
    return [round(lo + i * step, 10) for i in range(n)]


@dataclass(frozen=True)
class Sweep:
    policy: str  # the policy name, e.g. early-stop
    key: str  # the swept option
    values: list[float]
    rest: list[str]  # the other key=value options, as written

    def spec(self, value: float) -> str:
        """The policy spec of one point."""
        return f"{self.policy}:" + ",".join([f"{self.key}={value:.10g}", *self.rest])


def parse_sweep(spec: str) -> Sweep:
    """A sweep spec (module docstring), checked: every point parses as a policy."""
    name, _, rest = spec.strip().partition(":")
    items = [x.strip() for x in rest.split(",") if x.strip()]
    swept = [x for x in items if ".." in x.partition("=")[2]]
    if len(swept) != 1:
        raise LiveppError(f"a sweep steps exactly one option as key=LO..HI:STEP, e.g. early-stop:threshold=1.5..6:0.25; got {spec!r}")
    key, _, value = swept[0].partition("=")
    s = Sweep(name, key.strip(), parse_range(value), [x for x in items if x is not swept[0]])
    for v in (s.values[0], s.values[-1]):
        parse_policy(s.spec(v))
    return s


def sweep(traces: Iterable[Trace], spec: str) -> tuple[Sweep, list[PolicyReport]]:
    """The replay report of every point of the sweep."""
    s = parse_sweep(spec)
    traces = list(traces)
    reports = []
    for value in s.values:
        point = s.spec(value)
        reports.append(replay(traces, point, lambda point=point: parse_policy(point)))
    return s, reports


def pareto_front(points: Sequence[Sequence[float]]) -> list[bool]:
    """Which points no other point beats: at least as good in every
    coordinate (all to be maximised) and better in one."""
    def beaten(i: int) -> bool:
        return any(all(q >= p for q, p in zip(other, points[i])) and any(q > p for q, p in zip(other, points[i]))
                   for j, other in enumerate(points) if j != i)

    return [not beaten(i) for i in range(len(points))]

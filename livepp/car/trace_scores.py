"""A DeepConf trace's score from its token confidences, as the reference's
``utils.py`` computes them.

Token confidence C = −(1/k)·Σ of the top-k raw logprobs (higher: the model
is surer). From a trace's confidences C_1..C_n and a group window of w tokens:

* ``lowest``: the lowest group confidence, min over every full window of its
  mean C (the paper's "lowest group confidence"; what the online stop uses);
* ``tail``: the mean C of the last ``tail_tokens`` tokens (the reference's
  tail confidence, 2048 tokens there; livepp's default: one group window);
* ``bottom10``: the mean of the lowest 10 % of the full windows' means (at
  least one window);
* ``mean``: the mean C of the whole trace.

A trace shorter than the window scores its whole mean (no window is full),
and a trace with no confidences at all (an empty trace, or a remote engine
that sends no top logprobs) scores 0, as the reference scores it: the lowest
a confidence can be, never NaN, so a threshold over such scores stays a number.

Windows are means of a :class:`~livepp.core.tracker.RollingMean`, the very
arithmetic of the tracker, so ``lowest`` equals ``Tracker.lowest_group_confidence``
bit for bit. (The reference rounds each C to 3 decimals; livepp does not.)
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

from livepp.core.tracker import RollingMean

__all__ = ["SCORE_KINDS", "confidences_of", "group_means", "lowest_group", "tail", "bottom_percent", "mean", "trace_score", "trace_scores"]

SCORE_KINDS = ("lowest", "tail", "bottom10", "mean")
NO_CONFIDENCE = 0.0  # the reference's score for a trace without confidences


def confidences_of(values: Iterable[float | None]) -> list[float]:
    """The token confidences that count: a missing or NaN one is skipped (the tracker's rule)."""
    return [float(c) for c in values if c is not None and not math.isnan(c)]


def group_means(confs: Sequence[float], window: int) -> list[float]:
    """The mean of every full window of ``window`` consecutive confidences, in order."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    rolling, out = RollingMean(window), []
    for c in confs:
        rolling.push(c)
        if rolling.full:
            out.append(rolling.mean)
    return out


def mean(confs: Sequence[float]) -> float:
    if not confs:
        return NO_CONFIDENCE
    rolling = RollingMean(len(confs))
    for c in confs:
        rolling.push(c)
    return rolling.mean


def lowest_group(confs: Sequence[float], window: int) -> float:
    means = group_means(confs, window)
    return min(means) if means else mean(confs)


def tail(confs: Sequence[float], tokens: int) -> float:
    if tokens < 1:
        raise ValueError(f"tail tokens must be >= 1, got {tokens}")
    return mean(confs[-tokens:])


def bottom_percent(confs: Sequence[float], window: int, percent: float = 10.0) -> float:
    means = group_means(confs, window)
    if not means:
        return mean(confs)
    lowest = sorted(means)[: max(1, int(len(means) * percent / 100.0))]
    return math.fsum(lowest) / len(lowest) if all(map(math.isfinite, lowest)) else sum(lowest) / len(lowest)


def trace_score(confs: Sequence[float], kind: str, *, window: int, tail_tokens: int | None = None) -> float:
    """One score of a trace (module docstring); ``tail_tokens`` defaults to ``window``."""
    if kind == "lowest":
        return lowest_group(confs, window)
    if kind == "tail":
        return tail(confs, tail_tokens or window)
    if kind == "bottom10":
        return bottom_percent(confs, window, 10.0)
    if kind == "mean":
        return mean(confs)
    raise ValueError(f"unknown trace score {kind!r}; choose one of {', '.join(SCORE_KINDS)}")


def trace_scores(confs: Sequence[float], *, window: int, tail_tokens: int | None = None) -> dict[str, float]:
    """Every score of a trace, by kind."""
    return {kind: trace_score(confs, kind, window=window, tail_tokens=tail_tokens) for kind in SCORE_KINDS}

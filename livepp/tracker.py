"""Running perplexity statistics, O(1) time per token, O(window) memory.

Pure Python on purpose: importing this module must not import torch, so the
same tracker runs on streams from remote engines and in the websocket server
without a model. Definitions (see the README's "Numbers" section):

* ``nll`` of a token is ``-logprob`` (natural log, raw distribution).
* ``mean_nll`` = Σ nll / N over every token counted; ``ppl`` = exp(mean_nll);
  ``bits_per_token`` = mean_nll / ln 2.
* ``window_ppl`` = exp of the mean nll of the last ``window`` tokens (fewer at
  the start).
* ``ema_nll`` = α·nll + (1−α)·ema_nll, seeded with the first token's nll.
* ``surprise_z`` of a token = (nll − μ) / σ where μ, σ are the mean and sample
  standard deviation of the nll of the tokens *before* it (Welford); None until
  two earlier tokens exist or while σ is 0.
* ``group_confidence`` = mean DeepConf token confidence over the last
  ``confidence_window`` tokens; ``lowest_group_confidence`` = the minimum of it
  over every position where the group was full (or the current partial group
  while no group has filled yet).

All sums are Neumaier-compensated so that a million updates do not drift.
"""

from __future__ import annotations

import math

__all__ = ["CompensatedSum", "RollingMean", "Tracker"]

LN2 = math.log(2.0)


class CompensatedSum:
    """Neumaier summation: a running sum whose rounding error stays O(ε)."""

    __slots__ = ("_sum", "_comp")

    def __init__(self) -> None:
        self._sum = 0.0
        self._comp = 0.0

    def add(self, x: float) -> None:
        t = self._sum + x
        # Recover the low-order bits lost by the addition, whichever operand
        # was larger, and keep them in the compensation term.
        if abs(self._sum) >= abs(x):
            self._comp += (self._sum - t) + x
        else:
            self._comp += (x - t) + self._sum
        self._sum = t

    @property
    def value(self) -> float:
        return self._sum + self._comp


class RollingMean:
    """Mean of the last ``size`` values: a ring buffer plus a compensated sum."""

    __slots__ = ("size", "_buf", "_pos", "_count", "_sum")

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError(f"window size must be >= 1, got {size}")
        self.size = size
        self._buf = [0.0] * size
        self._pos = 0
        self._count = 0
        self._sum = CompensatedSum()

    def push(self, x: float) -> None:
        if self._count == self.size:
            self._sum.add(-self._buf[self._pos])
        else:
            self._count += 1
        self._buf[self._pos] = x
        self._sum.add(x)
        self._pos = (self._pos + 1) % self.size

    @property
    def count(self) -> int:
        return self._count

    @property
    def full(self) -> bool:
        return self._count == self.size

    @property
    def mean(self) -> float:
        return self._sum.value / self._count if self._count else math.nan


def _exp(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


class Tracker:
    """Consumes one token's logprob (and optional entropy/confidence) at a time."""

    def __init__(
        self,
        *,
        window: int = 32,
        ema_alpha: float = 0.1,
        confidence_window: int = 32,
    ) -> None:
        if not 0.0 < ema_alpha <= 1.0:
            raise ValueError(f"ema_alpha must be in (0, 1], got {ema_alpha}")
        self.window = window
        self.ema_alpha = ema_alpha
        self.confidence_window = confidence_window
        self._nll_sum = CompensatedSum()
        self._entropy_sum = CompensatedSum()
        self._n_entropy = 0
        self._window = RollingMean(window)
        self._groups = RollingMean(confidence_window)
        self._n = 0
        self._ema = math.nan
        # Welford state for the nll distribution seen so far.
        self._w_mean = 0.0
        self._w_m2 = 0.0
        self.last_nll = math.nan
        self.surprise_z: float | None = None
        self.token_confidence: float | None = None
        self.lowest_group_confidence: float | None = None
        self._had_full_group = False

    def update(
        self,
        logprob: float,
        *,
        entropy: float | None = None,
        confidence: float | None = None,
    ) -> None:
        nll = -logprob
        self.surprise_z = self._z_against_history(nll)
        self._n += 1
        self.last_nll = nll
        self._nll_sum.add(nll)
        self._window.push(nll)
        self._ema = nll if self._n == 1 else self.ema_alpha * nll + (1.0 - self.ema_alpha) * self._ema
        delta = nll - self._w_mean
        self._w_mean += delta / self._n
        self._w_m2 += delta * (nll - self._w_mean)
        if entropy is not None:
            self._entropy_sum.add(entropy)
            self._n_entropy += 1
        self.token_confidence = confidence
        if confidence is not None:
            self._groups.push(confidence)
            g = self._groups.mean
            if not self._groups.full:
                # Provisional: the partial group stands in until one fills.
                self.lowest_group_confidence = g
            elif not self._had_full_group or g < self.lowest_group_confidence:
                self.lowest_group_confidence = g
                self._had_full_group = True

    def _z_against_history(self, nll: float) -> float | None:
        if self._n < 2:
            return None
        var = self._w_m2 / (self._n - 1)
        if var <= 0.0:
            return None
        return (nll - self._w_mean) / math.sqrt(var)

    @property
    def n(self) -> int:
        return self._n

    @property
    def mean_nll(self) -> float:
        return self._nll_sum.value / self._n if self._n else math.nan

    @property
    def ppl(self) -> float:
        return _exp(self.mean_nll)

    @property
    def bits_per_token(self) -> float:
        return self.mean_nll / LN2

    @property
    def window_mean_nll(self) -> float:
        return self._window.mean

    @property
    def window_ppl(self) -> float:
        return _exp(self._window.mean)

    @property
    def ema_nll(self) -> float:
        return self._ema

    @property
    def ema_ppl(self) -> float:
        return _exp(self._ema)

    @property
    def mean_entropy(self) -> float | None:
        return self._entropy_sum.value / self._n_entropy if self._n_entropy else None

    @property
    def nll_std(self) -> float:
        return math.sqrt(self._w_m2 / (self._n - 1)) if self._n > 1 else math.nan

    @property
    def group_confidence(self) -> float | None:
        return self._groups.mean if self._groups.count else None

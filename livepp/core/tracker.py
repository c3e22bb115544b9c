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

Logprobs outside (-inf, 0] (see the README's "Non-finite and out-of-range
logprobs"):

* a logprob a little above 0 can only come from rounding (an engine's
  float16 or a JSON round trip); it is clamped to 0, so PPL is never below 1;
* a logprob of -inf (a token of probability 0 under the model, as llama.cpp
  and other engines can report), NaN, +inf or null is an *infinite NLL*: it
  makes ``mean_nll``/``ppl`` infinite for the rest of the run (the sequence
  had probability 0), ``window_ppl`` infinite until it leaves the window, and
  ``ema_nll`` infinite until the next finite token, which re-seeds the EMA.
  Its ``surprise_z`` is +inf; the Welford mean and deviation skip it, so the
  z of later tokens stays defined. Every policy therefore sees it as worse
  than any threshold, and the state recovers as the window moves on.
* a non-finite entropy is left out of ``mean_entropy``; a confidence of
  +inf (a top-k holding zero-probability tokens: a very peaked
  distribution) makes the group confidence +inf while it is in the group.
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
    """Mean of the last ``size`` values: a ring buffer plus a compensated sum.

    Non-finite values never enter the sum (inf − inf would poison it with NaN
    for good); they are counted instead, and the mean is ±inf or NaN exactly
    while one of them is inside the window, as the plain formula would give.
    """

    __slots__ = ("size", "_buf", "_pos", "_count", "_sum", "_pos_inf", "_neg_inf", "_nan")

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError(f"window size must be >= 1, got {size}")
        self.size = size
        self._buf = [0.0] * size
        self._pos = 0
        self._count = 0
        self._sum = CompensatedSum()
        self._pos_inf = 0
        self._neg_inf = 0
        self._nan = 0

    def _account(self, x: float, sign: int) -> None:
        if math.isfinite(x):
            self._sum.add(sign * x)
        elif x > 0:
            self._pos_inf += sign
        elif x < 0:
            self._neg_inf += sign
        else:
            self._nan += sign

    def push(self, x: float) -> None:
        if self._count == self.size:
            self._account(self._buf[self._pos], -1)
        else:
            self._count += 1
        self._buf[self._pos] = x
        self._account(x, 1)
        self._pos = (self._pos + 1) % self.size

    @property
    def count(self) -> int:
        return self._count

    @property
    def full(self) -> bool:
        return self._count == self.size

    @property
    def mean(self) -> float:
        if not self._count or self._nan or (self._pos_inf and self._neg_inf):
            return math.nan
        if self._pos_inf:
            return math.inf
        if self._neg_inf:
            return -math.inf
        return self._sum.value / self._count


def nll_of(logprob: float | None) -> float:
    """The NLL the tracker counts for a reported logprob (module docstring)."""
    if logprob is None or not logprob > -math.inf or logprob == math.inf:
        return math.inf  # -inf, NaN, +inf, null: probability 0 or unknown
    return -logprob if logprob < 0.0 else 0.0


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
        self._n_infinite = 0
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
        logprob: float | None,
        *,
        entropy: float | None = None,
        confidence: float | None = None,
    ) -> None:
        nll = nll_of(logprob)
        self._n += 1
        self.last_nll = nll
        self._window.push(nll)
        if math.isinf(nll):
            self.surprise_z = math.inf
            self._n_infinite += 1
            self._ema = math.inf
        else:
            self.surprise_z = self._z_against_history(nll)
            self._nll_sum.add(nll)
            # Seeded by the first finite token, and again after an infinite one.
            finite_before = self._n - 1 - self._n_infinite
            reseed = finite_before == 0 or math.isinf(self._ema)
            self._ema = nll if reseed else self.ema_alpha * nll + (1.0 - self.ema_alpha) * self._ema
            n_finite = finite_before + 1
            delta = nll - self._w_mean
            self._w_mean += delta / n_finite
            self._w_m2 += delta * (nll - self._w_mean)
        if entropy is not None and math.isfinite(entropy):
            self._entropy_sum.add(entropy)
            self._n_entropy += 1
        if confidence is not None and math.isnan(confidence):
            confidence = None  # not computed
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
        # Called before this token is counted in the Welford state.
        n_hist = self._n - 1 - self._n_infinite
        if n_hist < 2:
            return None
        var = self._w_m2 / (n_hist - 1)
        if var <= 0.0:
            return None
        return (nll - self._w_mean) / math.sqrt(var)

    @property
    def n(self) -> int:
        return self._n

    @property
    def n_infinite(self) -> int:
        """Tokens counted with an infinite NLL (logprob -inf, NaN or missing)."""
        return self._n_infinite

    @property
    def mean_nll(self) -> float:
        if not self._n:
            return math.nan
        return math.inf if self._n_infinite else self._nll_sum.value / self._n

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
        n_finite = self._n - self._n_infinite
        return math.sqrt(self._w_m2 / (n_finite - 1)) if n_finite > 1 else math.nan

    @property
    def group_confidence(self) -> float | None:
        return self._groups.mean if self._groups.count else None

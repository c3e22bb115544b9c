"""CAR calibration: one Gaussian per class over short-answer perplexity.

From labelled short answers (PPL, correct?) fit a Gaussian to the correct
ones and one to the incorrect ones, with class priors, and decide by Bayes
with one **shared (pooled) variance** σ² (method ``pooled_variance``):

    P(correct | x) = π_c·N(x; μ_c, σ²) / (π_c·N(x; μ_c, σ²) + π_i·N(x; μ_i, σ²))
                   = sigmoid(a + b·x),  b = (μ_c − μ_i)/σ²,
                     a = log(π_c/π_i) + (μ_i² − μ_c²)/(2σ²)

where x is either the PPL or its log. Both are tried and the one whose fitted
model gives the data the higher likelihood, measured in the same (PPL) space
(the log fit's density carries the 1/PPL Jacobian), is kept; the file says
which and both log-likelihoods, so the choice is visible. Answers whose
posterior falls below ``threshold`` are routed to long reasoning.

With a shared variance the posterior is logistic in x, hence monotone: a
short answer the model finds more surprising is never trusted more. (Two
class variances make the posterior rise again far out in the tail of the
narrower class, which kept very surprising answers.) If the correct answers
had the *higher* mean PPL, b would be positive; the posterior is then held at
the prior (b = 0), exactly: PPL is no evidence of correctness in that
direction, so no temperature applies either (scaling a constant would only
move it towards 1/2, away from the observed rate of correct answers). The
per-class variances are still fitted and stored, for the report's
histograms; files written before this method (no ``method`` field) load and
are evaluated with the pooled variance of their two classes, weighted by
their counts.

Pure Python (no numpy, no torch) so it loads anywhere the tracker does.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from livepp.core.params import LiveppError

__all__ = ["shipped_calibration", "Calibration", "fit_calibration", "auroc", "expected_calibration_error", "MIN_PER_CLASS", "DEFAULT_CALIBRATION"]

# Fitted with `livepp calibrate builtin:mixed --limit 80` on the embedded model;
# per-task files beside it with `livepp calibrate builtin:TASK`.
DEFAULT_CALIBRATION = Path(__file__).parent / "data" / "calibration-smollm2-135m.json"


def shipped_calibration(task: str | None = None) -> Path:
    """The shipped calibration of the embedded model: mixed, or one built-in task's."""
    if task is None or task == "mixed":
        return DEFAULT_CALIBRATION
    path = DEFAULT_CALIBRATION.with_name(f"calibration-smollm2-135m-{task}.json")
    if not path.is_file():
        known = sorted(p.stem.rsplit("-", 1)[-1] for p in DEFAULT_CALIBRATION.parent.glob("calibration-smollm2-135m-*.json"))
        raise LiveppError(f"no shipped calibration for task {task!r}; shipped: mixed, {', '.join(known)}")
    return path

MIN_PER_CLASS = 3
_FORMAT = "livepp-car-calibration/1"
_MIN_STD = 1e-3


def _gauss_logpdf(x: float, mean: float, var: float) -> float:
    return -0.5 * (math.log(2 * math.pi * var) + (x - mean) ** 2 / var)


def _pooled(n_c: int, var_c: float, n_i: int, var_i: float) -> float:
    """The shared variance of two classes: their variances weighted by count."""
    return (n_c * var_c + n_i * var_i) / (n_c + n_i)


def _mean_var(xs: Sequence[float]) -> tuple[float, float]:
    m = math.fsum(xs) / len(xs)
    # Maximum-likelihood variance, floored so a class of identical PPLs does
    # not give an infinitely sharp (degenerate) density.
    v = math.fsum((x - m) ** 2 for x in xs) / len(xs)
    return m, max(v, _MIN_STD**2)


@dataclass(frozen=True)
class Calibration:
    model: str
    space: str  # "ppl" or "log_ppl"
    mean_correct: float
    var_correct: float
    mean_incorrect: float
    var_incorrect: float
    prior_correct: float
    threshold: float = 0.5
    n_correct: int = 0
    n_incorrect: int = 0
    why_space: str = ""
    auroc: float | None = None
    ece: float | None = None
    method: str = "pooled_variance"
    var_pooled: float | None = None
    # Temperature scaling (livepp.car.heldout): routing uses σ(logit(p)/T).
    temperature: float = 1.0
    # Held-out figures from k-fold cross-validation (livepp.car.heldout).
    cv_folds: int | None = None
    cv_auroc: float | None = None
    cv_ece: float | None = None
    cv_brier: float | None = None
    cv_nll: float | None = None
    cv_ece_scaled: float | None = None
    cv_brier_scaled: float | None = None
    cv_nll_scaled: float | None = None
    cv_routing: dict | None = None
    # The nested figures' per-fold temperature and space (each fitted inside its training folds).
    cv_fold_temperatures: list | None = None
    cv_fold_spaces: list | None = None
    # Early routing: one model per prefix length (livepp.car.early.prefix_models),
    # the shortest prefix worth routing on (chosen out of fold), and what
    # routing early from it did on held-out answers (nested).
    prefix_models: list | None = None
    early_min_tokens: int | None = None
    cv_early: dict | None = None

    def for_prefix(self, tokens: int) -> "Calibration | None":
        """The calibration for the running PPL after ``tokens`` tokens: the
        model fitted on prefixes of that length (the longest one beyond the
        last), or None when none was fitted for it."""
        if not self.prefix_models:
            return None
        fitted = [m for m in self.prefix_models if m["tokens"] <= tokens]
        if not fitted or (fitted[-1]["tokens"] != tokens and tokens <= self.prefix_models[-1]["tokens"]):
            return None
        m = fitted[-1]
        return Calibration(self.model, m["space"], m["mean_correct"], m["var_correct"], m["mean_incorrect"], m["var_incorrect"],
                           m["prior_correct"], self.threshold, var_pooled=m["var_pooled"], temperature=m["temperature"])

    @property
    def pooled_variance(self) -> float:
        if self.var_pooled is not None:
            return self.var_pooled
        return _pooled(max(self.n_correct, 1), self.var_correct, max(self.n_incorrect, 1), self.var_incorrect)

    @property
    def logistic(self) -> tuple[float, float]:
        """(a, b) of P(correct | x) = sigmoid(a + b·x) in the fitted space; b <= 0."""
        v = self.pooled_variance
        prior_log_odds = math.log(self.prior_correct / (1.0 - self.prior_correct))
        b = min((self.mean_correct - self.mean_incorrect) / v, 0.0)
        if b == 0.0:
            return prior_log_odds, 0.0
        return prior_log_odds + (self.mean_incorrect**2 - self.mean_correct**2) / (2 * v), b

    def _x(self, ppl: float) -> float:
        if not ppl > 0.0:
            raise LiveppError(f"a perplexity must be >= 1, got {ppl}")
        # Below 1 only by rounding (logprobs a hair above 0): clamped to 1.
        ppl = max(ppl, 1.0)
        return math.log(ppl) if self.space == "log_ppl" else ppl

    def posterior_correct(self, ppl: float) -> float:
        """P(correct | this short answer's PPL)."""
        a, b = self.logistic
        if b == 0.0:
            self._x(ppl)  # still refuses a PPL that is not one
            return self.prior_correct  # no evidence: the prior, unscaled (module docstring)
        if math.isinf(ppl):
            return 0.0
        # Temperature scaling divides the logit, which keeps it monotone.
        z = (a + b * self._x(ppl)) / self.temperature
        # A numerically safe sigmoid.
        return 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))

    def should_route(self, ppl: float) -> bool:
        """Route to long reasoning when P(correct | ppl) is below the threshold."""
        return self.posterior_correct(ppl) < self.threshold

    def to_dict(self) -> dict:
        return {"format": _FORMAT, **asdict(self)}

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> "Calibration":
        p = Path(path)
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise LiveppError(f"calibration file not found: {p}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise LiveppError(f"calibration file {p} is not valid JSON: {exc}") from exc
        if not isinstance(data, dict) or data.get("format") != _FORMAT:
            raise LiveppError(f"{p} is not a livepp calibration file (expected format {_FORMAT!r})")
        fields = {f for f in cls.__dataclass_fields__}
        try:
            values = {k: v for k, v in data.items() if k in fields}
            cal = cls(**values)
        except TypeError as exc:
            raise LiveppError(f"calibration file {p} is missing fields: {exc}") from exc
        numbers = [cal.mean_correct, cal.var_correct, cal.mean_incorrect, cal.var_incorrect, cal.prior_correct, cal.threshold]
        if cal.method != "pooled_variance":
            raise LiveppError(f"calibration file {p} uses method {cal.method!r}, which this livepp does not know; re-run livepp calibrate")
        if cal.space not in ("ppl", "log_ppl") or not all(isinstance(x, (int, float)) and math.isfinite(x) for x in numbers):
            raise LiveppError(f"calibration file {p} has invalid values")
        if not (isinstance(cal.temperature, (int, float)) and math.isfinite(cal.temperature) and cal.temperature > 0):
            raise LiveppError(f"calibration file {p} has an invalid temperature {cal.temperature!r}")
        if not (0 < cal.prior_correct < 1 and cal.var_correct > 0 and cal.var_incorrect > 0 and 0 < cal.threshold < 1):
            raise LiveppError(f"calibration file {p} has out-of-range values (priors, variances or threshold)")
        return cal


def _fit_space(xs_c: list[float], xs_i: list[float]) -> tuple[float, float, float, float, float]:
    """Class means and variances, and their pooled variance."""
    mc, vc = _mean_var(xs_c)
    mi, vi = _mean_var(xs_i)
    return mc, vc, mi, vi, _pooled(len(xs_c), vc, len(xs_i), vi)


def fit_calibration(
    ppls: Sequence[float],
    correct: Sequence[bool],
    *,
    model: str,
    threshold: float = 0.5,
    space: str | None = None,
) -> Calibration:
    """Fit the two-Gaussian model. ``space`` None chooses by likelihood."""
    if len(ppls) != len(correct):
        raise LiveppError("ppls and labels differ in length")
    good = [p for p, c in zip(ppls, correct) if c and math.isfinite(p)]
    bad = [p for p, c in zip(ppls, correct) if not c and math.isfinite(p)]
    if len(good) < MIN_PER_CLASS or len(bad) < MIN_PER_CLASS:
        raise LiveppError(
            f"need at least {MIN_PER_CLASS} correct and {MIN_PER_CLASS} incorrect short answers to fit, "
            f"got {len(good)} correct and {len(bad)} incorrect; use more or harder/easier questions"
        )
    if not 0 < threshold < 1:
        raise LiveppError(f"threshold must be in (0, 1), got {threshold}")
    prior = len(good) / (len(good) + len(bad))

    def loglik(kind: str) -> tuple[float, tuple[float, float, float, float, float]]:
        f = math.log if kind == "log_ppl" else (lambda v: v)
        params = _fit_space([f(p) for p in good], [f(p) for p in bad])
        mc, _, mi, _, pooled = params
        total = 0.0
        for p, (m, v) in [(p, (mc, pooled)) for p in good] + [(p, (mi, pooled)) for p in bad]:
            # Density in PPL space: a fit on log PPL carries the 1/PPL Jacobian.
            total += _gauss_logpdf(f(p), m, v) - (math.log(p) if kind == "log_ppl" else 0.0)
        return total, params

    ll = {kind: loglik(kind) for kind in ("ppl", "log_ppl")}
    if space is None:
        space = max(ll, key=lambda k: ll[k][0])
    elif space not in ll:
        raise LiveppError(f"space must be 'ppl' or 'log_ppl', got {space!r}")
    why = (
        f"log-likelihood of the PPLs under each fit: ppl {ll['ppl'][0]:.2f}, log_ppl {ll['log_ppl'][0]:.2f} "
        f"(the log fit includes the 1/PPL Jacobian); kept {space}"
    )
    mc, vc, mi, vi, pooled = ll[space][1]
    cal = Calibration(model, space, mc, vc, mi, vi, prior, threshold, len(good), len(bad), why, var_pooled=pooled)
    labels = [c for p, c in zip(ppls, correct) if math.isfinite(p)]
    finite = [p for p in ppls if math.isfinite(p)]
    return Calibration(
        **{**asdict(cal),
           "auroc": auroc(finite, [not c for c in labels]),
           "ece": expected_calibration_error([cal.posterior_correct(p) for p in finite], labels)}
    )


def auroc(scores: Sequence[float], positives: Sequence[bool]) -> float:
    """Area under the ROC curve of ``scores`` for predicting ``positives``
    (Mann–Whitney U; ties count one half). 1.0 = perfect, 0.5 = chance."""
    pos = [s for s, y in zip(scores, positives) if y]
    neg = [s for s, y in zip(scores, positives) if not y]
    if not pos or not neg:
        return math.nan
    # Rank-based, O(n log n): average ranks over ties.
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    ranks = [0.0] * len(scores)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and scores[order[j + 1]] == scores[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    rank_sum = sum(r for r, y in zip(ranks, positives) if y)
    return (rank_sum - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg))


def expected_calibration_error(confidences: Sequence[float], correct: Sequence[bool], *, bins: int = 10) -> float:
    """ECE: Σ_bins (n_b / n) · |accuracy_b − mean confidence_b|, equal-width bins on [0, 1]."""
    if not confidences:
        return math.nan
    totals = [[0, 0.0, 0] for _ in range(bins)]  # count, sum confidence, correct
    for c, y in zip(confidences, correct):
        b = min(int(c * bins), bins - 1)
        totals[b][0] += 1
        totals[b][1] += c
        totals[b][2] += int(bool(y))
    n = len(confidences)
    return sum(cnt / n * abs(hits / cnt - s / cnt) for cnt, s, hits in totals if cnt)

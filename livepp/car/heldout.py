"""Held-out figures for a CAR calibration: k-fold cross-validation and
temperature scaling.

* :func:`kfold` splits labelled answers into k folds, stratified by label
  (each fold gets its share of correct and incorrect answers), in a fixed
  order from a seed, so the figures are reproducible.
* :func:`cross_validated_posteriors` fits the calibration on k−1 folds and
  predicts P(correct) for the answers of the fold it did not see; every
  answer gets exactly one held-out posterior.
* :func:`fit_temperature` finds the one temperature T that minimises the
  negative log-likelihood of σ(logit(p)/T) on those held-out posteriors
  (the seed's "temperature scaling"). T = 1 is among the candidates, so the
  scaled NLL is never above the unscaled one on the data it was fitted on.
  Dividing a logit by T > 0 keeps the posterior monotone in PPL.
* :func:`heldout_report` gathers AUROC, ECE and Brier score of the held-out
  posteriors, before and after scaling, and the routing outcome: accuracy of
  short answers only, of CAR decisions if the long route were always right,
  and the fraction routed.

Pure Python, like :mod:`livepp.car.calibration`.
"""

from __future__ import annotations

import math
import random
from typing import Any, Callable, Sequence

from livepp.car.calibration import MIN_PER_CLASS, Calibration, auroc, expected_calibration_error, fit_calibration
from livepp.core.params import LiveppError

__all__ = ["kfold", "cross_validated_posteriors", "fit_temperature", "scale", "brier", "nll", "routing_outcome", "heldout_report"]

# 1/T is searched in [_S_MIN, _S_MAX]: T from 0.05 (sharper) to 1000 (almost flat).
_S_MIN, _S_MAX = 1e-3, 20.0


def kfold(labels: Sequence[bool], k: int = 5, *, seed: int = 0) -> list[list[int]]:
    """Indices of ``labels`` in k folds, stratified by label, shuffled by ``seed``."""
    if k < 2:
        raise LiveppError(f"cross-validation needs k >= 2 folds, got {k}")
    rng = random.Random(seed)
    folds: list[list[int]] = [[] for _ in range(k)]
    offset = 0
    for value in (True, False):
        members = [i for i, y in enumerate(labels) if bool(y) == value]
        rng.shuffle(members)
        for j, i in enumerate(members):
            folds[(offset + j) % k].append(i)
        offset += len(members)
    return [sorted(f) for f in folds]


def cross_validated_posteriors(ppls: Sequence[float], labels: Sequence[bool], *, k: int = 5, seed: int = 0,
                               space: str | None = None, threshold: float = 0.5) -> list[float]:
    """One held-out P(correct) per answer, from the fit on the other folds."""
    n_c = sum(bool(y) for y in labels)
    if min(n_c, len(labels) - n_c) < MIN_PER_CLASS + math.ceil(MIN_PER_CLASS / max(k - 1, 1)):
        raise LiveppError(f"too few answers of a class for {k}-fold cross-validation "
                          f"({n_c} correct, {len(labels) - n_c} incorrect)")
    out = [math.nan] * len(ppls)
    for fold in kfold(labels, k, seed=seed):
        held = set(fold)
        train = [i for i in range(len(ppls)) if i not in held]
        cal = fit_calibration([ppls[i] for i in train], [labels[i] for i in train], model="cv", space=space, threshold=threshold)
        for i in fold:
            out[i] = cal.posterior_correct(ppls[i])
    return out


def _logit(p: float) -> float:
    p = min(max(p, 1e-12), 1 - 1e-12)
    return math.log(p / (1 - p))


def _sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))


def scale(p: float, temperature: float) -> float:
    """σ(logit(p)/T)."""
    return _sigmoid(_logit(p) / temperature)


def nll(posteriors: Sequence[float], labels: Sequence[bool]) -> float:
    """Mean negative log-likelihood of the labels under the posteriors."""
    total = 0.0
    for p, y in zip(posteriors, labels):
        q = min(max(p if y else 1 - p, 1e-12), 1.0)
        total -= math.log(q)
    return total / len(posteriors)


def brier(posteriors: Sequence[float], labels: Sequence[bool]) -> float:
    """Mean squared error of P(correct) against the 0/1 outcome."""
    return math.fsum((p - float(bool(y))) ** 2 for p, y in zip(posteriors, labels)) / len(posteriors)


def _golden_min(f: Callable[[float], float], lo: float, hi: float, *, iterations: int = 80) -> float:
    ratio = (math.sqrt(5) - 1) / 2
    a, b = lo, hi
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = f(c), f(d)
    for _ in range(iterations):
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = f(d)
    return (a + b) / 2


def fit_temperature(posteriors: Sequence[float], labels: Sequence[bool]) -> float:
    """The T minimising the NLL of σ(logit(p)/T); the NLL is convex in 1/T."""
    logits = [_logit(p) for p in posteriors]

    def loss(s: float) -> float:
        return nll([_sigmoid(z * s) for z in logits], labels)

    s = _golden_min(loss, _S_MIN, _S_MAX)
    if loss(1.0) <= loss(s):  # the search is numerical; never end worse than no scaling
        s = 1.0
    return 1.0 / s


def routing_outcome(posteriors: Sequence[float], labels: Sequence[bool], threshold: float) -> dict[str, float]:
    """Short-only accuracy, CAR accuracy if the long route were always right,
    and the fraction of answers routed, for these posteriors."""
    routed = [p < threshold for p in posteriors]
    n = len(labels)
    return {
        "accuracy_short_only": sum(bool(y) for y in labels) / n,
        "accuracy_car_perfect_long": sum(bool(y) or r for y, r in zip(labels, routed)) / n,
        "fraction_routed": sum(routed) / n,
    }


def heldout_report(ppls: Sequence[float], labels: Sequence[bool], *, k: int = 5, seed: int = 0,
                   space: str | None = None, threshold: float = 0.5) -> dict[str, Any]:
    """The held-out fields a calibration file stores (see the module docstring)."""
    finite = [(p, bool(y)) for p, y in zip(ppls, labels) if math.isfinite(p)]
    xs, ys = [p for p, _ in finite], [y for _, y in finite]
    posts = cross_validated_posteriors(xs, ys, k=k, seed=seed, space=space, threshold=threshold)
    temperature = fit_temperature(posts, ys)
    scaled = [scale(p, temperature) for p in posts]
    errors = [not y for y in ys]
    return {
        "cv_folds": k,
        "cv_auroc": auroc([-p for p in posts], errors),
        "cv_ece": expected_calibration_error(posts, ys),
        "cv_brier": brier(posts, ys),
        "cv_nll": nll(posts, ys),
        "temperature": temperature,
        "cv_ece_scaled": expected_calibration_error(scaled, ys),
        "cv_brier_scaled": brier(scaled, ys),
        "cv_nll_scaled": nll(scaled, ys),
        "cv_routing": routing_outcome(scaled, ys, threshold),
        "cv_posteriors": posts,
    }


def with_heldout(cal: Calibration, report: dict[str, Any]) -> Calibration:
    """The calibration with its held-out figures and temperature filled in."""
    from dataclasses import replace

    fields = {k: v for k, v in report.items() if k in Calibration.__dataclass_fields__}
    return replace(cal, **fields)


# Early routing is fitted per prefix length 1..PREFIX_BUCKETS; a longer prefix
# uses the last one.
PREFIX_BUCKETS = 16


def prefix_models(prefix_ppls: Sequence[Sequence[float]], labels: Sequence[bool], *, space: str, k: int = 5, seed: int = 0,
                  threshold: float = 0.5) -> list[dict[str, Any]]:
    """One calibration per prefix length t: fitted on the running PPL after
    t tokens of every answer that has t tokens, with its own held-out AUROC
    and temperature. Lengths with too few answers of a class get none."""
    out = []
    for t in range(1, PREFIX_BUCKETS + 1):
        rows = [(ppls[t - 1], bool(y)) for ppls, y in zip(prefix_ppls, labels) if len(ppls) >= t and math.isfinite(ppls[t - 1])]
        xs, ys = [p for p, _ in rows], [y for _, y in rows]
        try:
            cal = fit_calibration(xs, ys, model="prefix", space=space, threshold=threshold)
            report = heldout_report(xs, ys, k=k, seed=seed, space=space, threshold=threshold)
        except LiveppError:
            continue  # too few of a class at this length
        cal = with_heldout(cal, report)
        out.append({"tokens": t, "n": len(rows), "space": space, "mean_correct": cal.mean_correct, "mean_incorrect": cal.mean_incorrect,
                    "var_correct": cal.var_correct, "var_incorrect": cal.var_incorrect, "var_pooled": cal.var_pooled,
                    "prior_correct": cal.prior_correct, "temperature": cal.temperature, "cv_auroc": cal.cv_auroc})
    return out


def early_min_tokens(models: Sequence[dict[str, Any]], full_cv_auroc: float, *, within: float = 0.05) -> int | None:
    """The shortest prefix whose held-out AUROC is within ``within`` of the
    finished answers' held-out AUROC (None if no prefix gets there)."""
    for m in models:
        if m["cv_auroc"] is not None and math.isfinite(m["cv_auroc"]) and m["cv_auroc"] >= full_cv_auroc - within:
            return int(m["tokens"])
    return None

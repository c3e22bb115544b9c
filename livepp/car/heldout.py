"""Held-out figures for a CAR calibration: k-fold cross-validation and
temperature scaling, everything fitted inside the folds.

* :func:`kfold` splits labelled answers into k folds, stratified by label
  (each fold gets its share of correct and incorrect answers), in a fixed
  order from a seed, so the figures are reproducible.
* :func:`cross_validated_posteriors` fits the calibration on k−1 folds
  (choosing PPL or log PPL on those folds alone) and predicts P(correct) for
  the answers of the fold it did not see; every answer gets exactly one
  held-out posterior.
* :func:`fit_temperature` finds the one temperature T that minimises the
  negative log-likelihood of σ(logit(p)/T) on given posteriors (the seed's
  "temperature scaling"). The T a calibration file ships is fitted on the
  held-out posteriors of all its answers. Dividing a logit by T > 0 keeps the
  posterior monotone in PPL.
* :func:`heldout_report` gathers AUROC, ECE, Brier score and NLL of the
  held-out posteriors, before and after scaling, and the routing outcome.
  The *scaled* figures are nested: the answers of fold f are scaled by a T
  fitted on the held-out posteriors of a cross-validation *inside* the other
  folds, so no T ever saw the answers it is judged on. (Scoring the shipped T
  on the posteriors it was fitted on can only flatter it: T = 1 is among its
  candidates, so that NLL is never above the unscaled one.)

Pure Python, like :mod:`livepp.car.calibration`.
"""

from __future__ import annotations

import math
import random
from dataclasses import replace
from typing import Any, Callable, Sequence

from livepp.car.calibration import MIN_PER_CLASS, Calibration, auroc, expected_calibration_error, fit_calibration
from livepp.core.params import LiveppError

__all__ = ["kfold", "cross_validated_posteriors", "fit_temperature", "fit_with_temperature", "scale", "brier", "nll", "routing_outcome",
           "nested_posteriors", "routing_curve", "heldout_report", "with_heldout", "check_cv", "train_indices"]

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


def check_cv(labels: Sequence[bool], k: int) -> None:
    """Refuse a cross-validation some fold of which could not be fitted."""
    n_c = sum(bool(y) for y in labels)
    if min(n_c, len(labels) - n_c) < MIN_PER_CLASS + math.ceil(MIN_PER_CLASS / max(k - 1, 1)):
        raise LiveppError(f"too few answers of a class for {k}-fold cross-validation "
                          f"({n_c} correct, {len(labels) - n_c} incorrect)")


def train_indices(n: int, fold: Sequence[int]) -> list[int]:
    """The indices of 0..n-1 outside ``fold``."""
    held = set(fold)
    return [i for i in range(n) if i not in held]


def cross_validated_posteriors(ppls: Sequence[float], labels: Sequence[bool], *, k: int = 5, seed: int = 0,
                               space: str | None = None, threshold: float = 0.5) -> list[float]:
    """One held-out P(correct) per answer, from the fit on the other folds
    (``space`` None: each fit chooses PPL or log PPL on its own folds)."""
    check_cv(labels, k)
    out = [math.nan] * len(ppls)
    for fold in kfold(labels, k, seed=seed):
        train = train_indices(len(ppls), fold)
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


def fit_with_temperature(ppls: Sequence[float], labels: Sequence[bool], *, k: int = 5, seed: int = 0, space: str | None = None,
                         threshold: float = 0.5, model: str = "cv") -> Calibration:
    """The calibration of these answers with its temperature, as ``livepp
    calibrate`` fits them: the Gaussians on all of them, T on their
    cross-validated posteriors (T = 1 when there are too few of a class to
    cross-validate)."""
    cal = fit_calibration(ppls, labels, model=model, space=space, threshold=threshold)
    try:
        posts = cross_validated_posteriors(ppls, labels, k=k, seed=seed, space=space, threshold=threshold)
    except LiveppError:
        return cal
    return replace(cal, temperature=fit_temperature(posts, labels))


def nested_posteriors(ppls: Sequence[float], labels: Sequence[bool], *, k: int = 5, seed: int = 0, space: str | None = None,
                      threshold: float = 0.5) -> dict[str, list[Any]]:
    """Held-out posteriors, unscaled and scaled, with everything fitted inside
    the folds: for each fold, the calibration of the other folds (space, then
    Gaussians) and its temperature from a cross-validation inside them
    (:func:`fit_with_temperature`). Also each fold's temperature and space."""
    check_cv(labels, k)
    raw, scaled = [math.nan] * len(ppls), [math.nan] * len(ppls)
    temperatures, spaces = [], []
    for fold in kfold(labels, k, seed=seed):
        train = train_indices(len(ppls), fold)
        cal = fit_with_temperature([ppls[i] for i in train], [labels[i] for i in train], k=k, seed=seed, space=space, threshold=threshold)
        unscaled = replace(cal, temperature=1.0)
        for i in fold:
            raw[i], scaled[i] = unscaled.posterior_correct(ppls[i]), cal.posterior_correct(ppls[i])
        temperatures.append(cal.temperature)
        spaces.append(cal.space)
    return {"raw": raw, "scaled": scaled, "temperatures": temperatures, "spaces": spaces}


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


def routing_curve(posteriors: Sequence[float], labels: Sequence[bool], *, long_labels: Sequence[bool] | None = None,
                  thresholds: Sequence[float] | None = None) -> list[dict[str, float]]:
    """:func:`routing_outcome` at every threshold (default 0, 0.05, ..., 1),
    and, given whether the long route got each question right, the accuracy
    of CAR with that long route and of the long route alone."""
    out = []
    for t in thresholds if thresholds is not None else [k / 20 for k in range(21)]:
        point: dict[str, float] = {"threshold": t, **routing_outcome(posteriors, labels, t)}
        if long_labels is not None:
            n = len(labels)
            point["accuracy_car_measured_long"] = sum(bool(l) if p < t else bool(y) for p, y, l in zip(posteriors, labels, long_labels)) / n
            point["accuracy_long_only"] = sum(bool(l) for l in long_labels) / n
        out.append(point)
    return out


def heldout_report(ppls: Sequence[float], labels: Sequence[bool], *, k: int = 5, seed: int = 0,
                   space: str | None = None, threshold: float = 0.5) -> dict[str, Any]:
    """The held-out fields a calibration file stores (see the module docstring):
    unscaled figures from the cross-validated posteriors, scaled ones from the
    nested posteriors, and the temperature to ship, fitted on the
    cross-validated posteriors of every answer."""
    finite = [(p, bool(y)) for p, y in zip(ppls, labels) if math.isfinite(p)]
    xs, ys = [p for p, _ in finite], [y for _, y in finite]
    nested = nested_posteriors(xs, ys, k=k, seed=seed, space=space, threshold=threshold)
    posts, scaled = nested["raw"], nested["scaled"]
    errors = [not y for y in ys]
    return {
        "cv_folds": k,
        "cv_auroc": auroc([-p for p in posts], errors),
        "cv_ece": expected_calibration_error(posts, ys),
        "cv_brier": brier(posts, ys),
        "cv_nll": nll(posts, ys),
        "temperature": fit_temperature(posts, ys),
        "cv_ece_scaled": expected_calibration_error(scaled, ys),
        "cv_brier_scaled": brier(scaled, ys),
        "cv_nll_scaled": nll(scaled, ys),
        "cv_routing": routing_outcome(scaled, ys, threshold),
        "cv_fold_temperatures": nested["temperatures"],
        "cv_fold_spaces": nested["spaces"],
        "cv_posteriors": posts,
        "cv_posteriors_scaled": scaled,
    }


def with_heldout(cal: Calibration, report: dict[str, Any]) -> Calibration:
    """The calibration with its held-out figures and temperature filled in."""
    fields = {k: v for k, v in report.items() if k in Calibration.__dataclass_fields__}
    return replace(cal, **fields)

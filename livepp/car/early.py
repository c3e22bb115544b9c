"""Early CAR routing: one calibration per prefix length, and the shortest
prefix worth routing on, chosen where it is not then judged.

* :func:`prefix_models` fits, for each prefix length t = 1..16, the
  calibration of the running PPL after t tokens (its temperature from its own
  cross-validated posteriors); longer prefixes use the 16-token model.
* :func:`early_route_at` is where :class:`~livepp.core.policies.CARRouter`
  with ``early=True`` routes an answer, from its running PPLs alone.
* Routing early can only add routes to those made at the end of the short
  answer. The added routes of *correct* short answers are what early routing
  can cost: with a long route no better than the short answer (as for a 135M
  model thinking step by step) each one loses a right answer. So
  :func:`choose_early_min_tokens` takes the shortest t whose early routing,
  on answers held out of the fits, adds routes to correct answers for at most
  ``margin`` (2 %) of all answers and routes some answer before its end;
  when no t does, early routing is off (None).
* :func:`early_report` judges that choice on answers that took no part in it
  (nested: the choice is made on the training folds by an inner
  cross-validation, then scored on the held-out fold).

Pure Python, like :mod:`livepp.car.calibration`.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, Sequence

from livepp.car.calibration import Calibration, auroc, fit_calibration
from livepp.car.heldout import check_cv, cross_validated_posteriors, fit_temperature, fit_with_temperature, kfold, train_indices
from livepp.core.params import LiveppError

__all__ = ["PREFIX_BUCKETS", "EARLY_MARGIN", "prefix_models", "early_route_at", "early_effect", "choose_early_min_tokens", "early_report"]

# Early routing is fitted per prefix length 1..PREFIX_BUCKETS; a longer prefix uses the last one.
PREFIX_BUCKETS = 16
# At most this share of all answers may be correct ones that early routing
# routes and routing at the end would have kept.
EARLY_MARGIN = 0.02


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
            posts = cross_validated_posteriors(xs, ys, k=k, seed=seed, space=space, threshold=threshold)
        except LiveppError:
            continue  # too few of a class at this length
        out.append({"tokens": t, "n": len(rows), "space": space, "mean_correct": cal.mean_correct, "mean_incorrect": cal.mean_incorrect,
                    "var_correct": cal.var_correct, "var_incorrect": cal.var_incorrect, "var_pooled": cal.var_pooled,
                    "prior_correct": cal.prior_correct, "temperature": fit_temperature(posts, ys),
                    "cv_auroc": auroc([-p for p in posts], [not y for y in ys])})
    return out


def early_route_at(prefix_ppls: Sequence[float], cal: Calibration, min_tokens: int) -> int | None:
    """The token count at which ``CARRouter(cal, early=True, min_tokens=...)``
    routes an answer whose running PPL after each token is ``prefix_ppls``."""
    for n, ppl in enumerate(prefix_ppls, 1):
        if n < min_tokens:
            continue
        used = cal.for_prefix(n) if cal.prefix_models else cal
        if used is not None and used.should_route(ppl):
            return n
    return None


def early_effect(prefix_ppls: Sequence[Sequence[float]], labels: Sequence[bool], cal: Calibration,
                 min_tokens: int | None) -> dict[str, int]:
    """Counts of what routing early from ``min_tokens`` (None: never) adds to
    routing at the end: routes of correct and of wrong answers, and the
    short-answer tokens not generated."""
    out = {"n": 0, "extra_correct": 0, "extra_wrong": 0, "tokens": 0, "tokens_saved": 0}
    for ppls, y in zip(prefix_ppls, labels):
        out["n"] += 1
        out["tokens"] += len(ppls)
        # Without prefix models a calibration never routes early by itself (CARRouter's default).
        at = early_route_at(ppls, cal, min_tokens) if min_tokens is not None and ppls and cal.prefix_models else None
        if at is None:
            continue
        out["tokens_saved"] += len(ppls) - at
        if not cal.should_route(ppls[-1]):
            out["extra_correct" if y else "extra_wrong"] += 1
    return out


def _fold_fit(prefix_ppls: Sequence[Sequence[float]], labels: Sequence[bool], *, k: int, seed: int, threshold: float) -> Calibration:
    """What ``livepp calibrate`` would ship for these answers, for routing: the
    finished-answer model with its temperature and the prefix models."""
    final = fit_with_temperature([p[-1] for p in prefix_ppls], labels, k=k, seed=seed, threshold=threshold)
    return replace(final, prefix_models=prefix_models(prefix_ppls, labels, space=final.space, k=k, seed=seed, threshold=threshold))


def choose_early_min_tokens(prefix_ppls: Sequence[Sequence[float]], labels: Sequence[bool], *, k: int = 5, seed: int = 0,
                            threshold: float = 0.5, margin: float = EARLY_MARGIN) -> int | None:
    """The shortest t whose early routing, judged out of fold, adds routes of
    correct answers for at most ``margin`` of the answers (module docstring)."""
    check_cv(labels, k)
    extra, saved = [0] * (PREFIX_BUCKETS + 1), [0] * (PREFIX_BUCKETS + 1)
    for fold in kfold(labels, k, seed=seed):
        train = train_indices(len(labels), fold)
        cal = _fold_fit([prefix_ppls[i] for i in train], [labels[i] for i in train], k=k, seed=seed, threshold=threshold)
        held = [prefix_ppls[i] for i in fold], [labels[i] for i in fold]
        for t in range(1, PREFIX_BUCKETS + 1):
            effect = early_effect(*held, cal, t)
            extra[t] += effect["extra_correct"]
            saved[t] += effect["tokens_saved"]
    # A start that never routes before the end is no early routing: it must save tokens.
    return next((t for t in range(1, PREFIX_BUCKETS + 1) if extra[t] <= margin * len(labels) and saved[t] > 0), None)


def early_report(prefix_ppls: Sequence[Sequence[float]], labels: Sequence[bool], *, k: int = 5, seed: int = 0, threshold: float = 0.5,
                 margin: float = EARLY_MARGIN) -> dict[str, Any]:
    """What the choice of :func:`choose_early_min_tokens` does on answers it
    never saw: for each fold, t chosen by an inner cross-validation of the
    other folds and the models fitted on them, scored on the fold."""
    check_cv(labels, k)
    total = {"n": 0, "extra_correct": 0, "extra_wrong": 0, "tokens": 0, "tokens_saved": 0}
    chosen: list[int | None] = []
    for fold in kfold(labels, k, seed=seed):
        train = train_indices(len(labels), fold)
        tp, tl = [prefix_ppls[i] for i in train], [labels[i] for i in train]
        try:
            t = choose_early_min_tokens(tp, tl, k=k, seed=seed, threshold=threshold, margin=margin)
        except LiveppError:
            t = None  # too few of a class inside the training folds: no early routing there
        chosen.append(t)
        cal = _fold_fit(tp, tl, k=k, seed=seed, threshold=threshold)
        for key, v in early_effect([prefix_ppls[i] for i in fold], [labels[i] for i in fold], cal, t).items():
            total[key] += v
    n = max(total["n"], 1)
    return {"margin": margin, "fold_min_tokens": chosen, "n": total["n"],
            "extra_correct_routed": total["extra_correct"] / n, "extra_wrong_routed": total["extra_wrong"] / n,
            "short_tokens_saved": total["tokens_saved"] / max(total["tokens"], 1)}

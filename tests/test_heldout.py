"""Held-out CAR figures: k-fold cross-validation, temperature scaling, and
early routing on per-prefix calibrations."""

from __future__ import annotations

import math
import random

import pytest

from livepp.core.stream import RecordStream
from livepp import Monitor
from livepp.car.calibration import Calibration, fit_calibration
from livepp.core.events import TokenRecord
from livepp.car.early import prefix_models
from livepp.car.heldout import cross_validated_posteriors, fit_temperature, heldout_report, kfold, nll, routing_outcome, scale
from livepp.core.policies import CARRouter


def _data(n=60, seed=1):
    rng = random.Random(seed)
    ppls, labels = [], []
    for _ in range(n):
        correct = rng.random() < 0.5
        ppls.append(math.exp(abs(rng.gauss(0.2 if correct else 0.6, 0.25))))
        labels.append(correct)
    return ppls, labels


def test_folds_are_stratified_disjoint_and_cover_everything():
    labels = [True] * 23 + [False] * 17
    folds = kfold(labels, 5, seed=3)
    assert sorted(i for f in folds for i in f) == list(range(40))
    for f in folds:
        assert sum(labels[i] for i in f) in (4, 5) and sum(not labels[i] for i in f) in (3, 4)


def test_cv_auroc_equals_a_direct_computation_over_the_held_out_folds():
    ppls, labels = _data()
    report = heldout_report(ppls, labels, k=5, seed=0)
    # Redo the folds by hand: fit on the rest, score the held-out fold.
    held = {}
    for fold in kfold(labels, 5, seed=0):
        train = [i for i in range(len(ppls)) if i not in fold]
        cal = fit_calibration([ppls[i] for i in train], [labels[i] for i in train], model="m")
        for i in fold:
            held[i] = cal.posterior_correct(ppls[i])
    wrong = [held[i] for i in held if not labels[i]]
    right = [held[i] for i in held if labels[i]]
    # AUROC of "low P(correct)" as a predictor of error, by brute force over pairs.
    pairs = [(w < r) + 0.5 * (w == r) for w in wrong for r in right]
    assert report["cv_auroc"] == pytest.approx(sum(pairs) / len(pairs), abs=1e-12)
    assert report["cv_posteriors"] == pytest.approx([held[i] for i in range(len(ppls))])
    brier = sum((held[i] - labels[i]) ** 2 for i in held) / len(held)
    assert report["cv_brier"] == pytest.approx(brier)


def test_temperature_by_hand():
    # Every answer gets P(correct) 0.8, but only 60 % are right: the NLL of
    # σ(logit(0.8)/T) is smallest where it equals 0.6, T = logit(0.8)/logit(0.6).
    posts = [0.8] * 10
    labels = [True] * 6 + [False] * 4
    t = fit_temperature(posts, labels)
    assert t == pytest.approx(math.log(4) / math.log(1.5), rel=1e-4)
    assert scale(0.8, t) == pytest.approx(0.6, abs=1e-4)
    hand = -(6 * math.log(0.6) + 4 * math.log(0.4)) / 10
    assert nll([scale(p, t) for p in posts], labels) == pytest.approx(hand, abs=1e-8)
    assert nll([scale(p, t) for p in posts], labels) < nll(posts, labels)


@pytest.mark.parametrize("seed", range(3))
def test_the_shipped_temperature_is_the_optimum_on_every_held_out_posterior(seed):
    """The T a file ships is fitted on the cross-validated posteriors of all
    its answers: on those it never does worse than no scaling, and it is the
    grid optimum there."""
    ppls, labels = _data(seed=seed)
    report = heldout_report(ppls, labels)
    posts = report["cv_posteriors"]
    shipped = nll([scale(p, report["temperature"]) for p in posts], labels)
    assert shipped <= report["cv_nll"] + 1e-12
    grid = min(nll([scale(p, 1 / s) for p in posts], labels) for s in [k / 100 for k in range(1, 2000)])
    assert shipped <= grid + 1e-6


def test_scaled_posterior_stays_monotone_and_routes_with_the_temperature():
    cal = Calibration("m", "log_ppl", 0.2, 0.05, 0.6, 0.05, 0.5, 0.5, 10, 10, temperature=4.0)
    grid = [1 + k / 10 for k in range(200)]
    posts = [cal.posterior_correct(p) for p in grid]
    assert all(b <= a for a, b in zip(posts, posts[1:]))
    flat = Calibration("m", "log_ppl", 0.2, 0.05, 0.6, 0.05, 0.5, 0.5, 10, 10)
    z = math.log(flat.posterior_correct(1.2) / (1 - flat.posterior_correct(1.2)))
    assert cal.posterior_correct(1.2) == pytest.approx(1 / (1 + math.exp(-z / 4.0)))


def test_routing_outcome_by_hand():
    posts = [0.9, 0.2, 0.6, 0.1]
    labels = [True, True, False, False]
    out = routing_outcome(posts, labels, 0.5)
    assert out == {"accuracy_short_only": 0.5, "accuracy_car_perfect_long": 0.75, "fraction_routed": 0.5}


def _prefix_model(t, mean_c, mean_i):
    return {"tokens": t, "n": 20, "space": "ppl", "mean_correct": mean_c, "mean_incorrect": mean_i, "var_correct": 0.01,
            "var_incorrect": 0.01, "var_pooled": 0.01, "prior_correct": 0.5, "temperature": 1.0, "cv_auroc": 0.8}


def test_early_routing_at_token_t_uses_the_prefix_t_calibration():
    # Full answers: correct around PPL 1.2, wrong around 1.6, so PPL 2 routes.
    # Prefixes are noisier: at t = 2 wrong ones sit around 3, correct ones
    # around 2.5, so PPL 2 keeps going at t = 2; at t = 3 PPL 2 routes.
    full = Calibration("m", "ppl", 1.2, 0.01, 1.6, 0.01, 0.5, 0.5, 20, 20,
                       prefix_models=[_prefix_model(2, 2.5, 3.0), _prefix_model(3, 1.5, 1.9)], early_min_tokens=2)
    assert full.should_route(2.0)
    assert not full.for_prefix(2).should_route(2.0) and full.for_prefix(3).should_route(2.0)
    assert full.for_prefix(1) is None and full.for_prefix(9).mean_correct == 1.5  # beyond the last: the last
    lp = -math.log(2.0)  # every token has probability 1/2: running PPL exactly 2
    records = [TokenRecord(i, "x", lp) for i in range(8)]
    result = Monitor(policies=[CARRouter(full, early=True)]).run(RecordStream(records))
    assert result.end.reason == "policy" and result.end.n_tokens == 3
    # Without prefix models early routing does not fire by default; asked
    # for explicitly, the finished-answer model at every prefix routes at 2.
    legacy = Calibration("m", "ppl", 1.2, 0.01, 1.6, 0.01, 0.5, 0.5, 20, 20)
    assert Monitor(policies=[CARRouter(legacy, early=True)]).run(RecordStream(records)).end.reason == "length"
    result = Monitor(policies=[CARRouter(legacy, early=True, min_tokens=2)]).run(RecordStream(records))
    assert result.end.n_tokens == 2


def test_min_tokens_comes_from_the_calibration_or_the_caller():
    cal = Calibration("m", "ppl", 1.2, 0.01, 1.6, 0.01, 0.5, 0.5, 20, 20, early_min_tokens=5)
    assert CARRouter(cal, early=True).min_tokens == 5 and CARRouter(cal, early=True, min_tokens=1).min_tokens == 1
    # Prefix models, but none close enough to the finished answers: no early route.
    none_good = Calibration("m", "ppl", 1.2, 0.01, 1.6, 0.01, 0.5, 0.5, 20, 20, prefix_models=[_prefix_model(2, 1.2, 1.6)])
    records = [TokenRecord(i, "x", -math.log(5.0)) for i in range(6)]
    assert Monitor(policies=[CARRouter(none_good, early=True)]).run(RecordStream(records)).end.reason == "length"


def test_prefix_models_are_fitted_on_prefixes_of_each_length():
    rng = random.Random(0)
    prefixes, labels = [], []
    for i in range(60):
        correct = i % 2 == 0
        n = rng.randint(2, 6)
        prefixes.append([1.1 + (0.0 if correct else 0.8) + rng.random() * 0.3 for _ in range(n)])
        labels.append(correct)
    models = prefix_models(prefixes, labels, space="ppl")
    by_t = {m["tokens"]: m for m in models}
    assert set(by_t) <= set(range(1, 7)) and 1 in by_t
    for t, m in by_t.items():
        rows = [(p[t - 1], y) for p, y in zip(prefixes, labels) if len(p) >= t]
        assert m["n"] == len(rows)
        assert m["mean_correct"] == pytest.approx(sum(p for p, y in rows if y) / sum(y for _, y in rows))


def test_cv_needs_enough_of_each_class():
    from livepp import LiveppError

    with pytest.raises(LiveppError, match="too few answers of a class"):
        cross_validated_posteriors([1.1, 1.2, 1.3, 1.5, 1.6, 1.7, 1.8], [True] * 4 + [False] * 3)


def test_evaluate_scores_a_fitted_file_on_other_answers():
    from livepp.car.calibrate import LabelledAnswer, evaluate

    cal = Calibration("m", "ppl", 1.2, 0.01, 1.6, 0.01, 0.5, 0.5, 20, 20)
    answers = [LabelledAnswer("q", ("1",), "r", p, 3, y) for p, y in [(1.1, True), (1.3, True), (1.5, False), (1.7, False), (1.45, True)]]
    out = evaluate(cal, answers)
    # 1.45 (correct) sits above 1.4, the midpoint, so it is routed; 1.5 and 1.7 too.
    assert out["fraction_routed"] == pytest.approx(3 / 5)
    assert out["accuracy_short_only"] == pytest.approx(3 / 5) and out["accuracy_car_perfect_long"] == 1.0
    pairs = [(w > r) + 0.5 * (w == r) for w in (1.5, 1.7) for r in (1.1, 1.3, 1.45)]
    assert out["auroc"] == pytest.approx(sum(pairs) / len(pairs))
    posts = [cal.posterior_correct(a.ppl) for a in answers]
    assert out["brier"] == pytest.approx(sum((p - a.correct) ** 2 for p, a in zip(posts, answers)) / 5)

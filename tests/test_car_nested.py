"""CAR figures without leakage: everything fitted (PPL or log PPL, the
Gaussians, the temperature, the shortest prefix worth routing on) is fitted
inside the folds, and a posterior held at the prior is the prior.

The calibration maths is written out here again in numpy (pooled-variance
Gaussians, the space chosen by likelihood with the 1/PPL Jacobian, the
temperature by a grid over 1/T), so the figures are checked against an
independent computation; only the fold split is the library's."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from livepp import Monitor
from livepp.car.calibrate import LabelledAnswer, calibrate
from livepp.car.calibration import Calibration, shipped_calibration
from livepp.car.early import EARLY_MARGIN, choose_early_min_tokens, early_effect, early_report, early_route_at
from livepp.car.heldout import heldout_report, kfold
from livepp.core.events import TokenRecord
from livepp.core.policies import CARRouter
from livepp.core.stream import RecordStream


# ---- the maths, written out --------------------------------------------------------

def ref_fit(ppls, labels):
    """P(correct | ppl) of the pooled-variance two-Gaussian model, in the space
    (ppl or log ppl) with the higher likelihood in PPL space; b > 0 is held at
    the prior."""
    p, y = np.asarray(ppls, float), np.asarray(labels, bool)
    best = None
    for space, f in (("ppl", lambda v: v), ("log_ppl", np.log)):
        x = f(p)
        mc, mi = x[y].mean(), x[~y].mean()
        vc, vi = max(x[y].var(), 1e-6), max(x[~y].var(), 1e-6)
        pooled = (y.sum() * vc + (~y).sum() * vi) / len(x)
        means = np.where(y, mc, mi)
        ll = np.sum(-0.5 * (np.log(2 * np.pi * pooled) + (x - means) ** 2 / pooled)) - (np.log(p).sum() if space == "log_ppl" else 0.0)
        if best is None or ll > best[0]:
            best = (ll, space, f, mc, mi, pooled)
    _, space, f, mc, mi, pooled = best
    prior = y.mean()
    b = min((mc - mi) / pooled, 0.0)
    a = math.log(prior / (1 - prior)) + (mi ** 2 - mc ** 2) / (2 * pooled)

    def posterior(ppl, temperature=1.0):
        if b == 0.0:
            return prior
        return 1 / (1 + math.exp(-(a + b * float(f(max(ppl, 1.0)))) / temperature))

    posterior.space = space
    return posterior


def ref_nll(posts, labels):
    q = np.where(np.asarray(labels, bool), posts, 1 - np.asarray(posts))
    return float(-np.mean(np.log(np.clip(q, 1e-12, 1.0))))


def ref_temperature(posts, labels):
    """The T of least NLL: a grid over 1/T in [0.001, 20), then a finer one around its best point."""
    z = np.log(np.clip(posts, 1e-12, 1 - 1e-12) / (1 - np.clip(posts, 1e-12, 1 - 1e-12)))
    y = np.asarray(labels, bool)

    def best(grid):
        q = 1 / (1 + np.exp(-np.outer(grid, z)))
        return grid[int(np.argmin(-np.mean(np.log(np.clip(np.where(y, q, 1 - q), 1e-12, 1.0)), axis=1)))]

    s = best(np.arange(0.001, 20.0, 0.001))
    return 1 / best(np.arange(max(s - 0.002, 1e-3), s + 0.002, 1e-7))


def ref_cv(ppls, labels, k=5, seed=0):
    out = [None] * len(ppls)
    for fold in kfold(labels, k, seed=seed):
        train = [i for i in range(len(ppls)) if i not in fold]
        fit = ref_fit([ppls[i] for i in train], [labels[i] for i in train])
        for i in fold:
            out[i] = fit(ppls[i])
    return out


def data(seed, n=50):
    rng = random.Random(seed)
    ppls, labels = [], []
    for _ in range(n):
        correct = rng.random() < 0.5
        ppls.append(1.0 + abs(rng.gauss(0.5 if correct else 1.0, 0.4)))
        labels.append(correct)
    return ppls, labels


# ---- 7. the temperature and the space, inside the folds ---------------------------

@pytest.mark.parametrize("seed", [2, 9, 18])
def test_scaled_figures_come_from_temperatures_fitted_inside_the_folds(seed):
    """Fold f's answers are scaled by the T fitted on a cross-validation of
    the other folds alone; PPL or log PPL is chosen on the training folds."""
    ppls, labels = data(seed)
    report = heldout_report(ppls, labels, k=5, seed=0)
    scaled, temps, spaces = [None] * len(ppls), [], []
    for fold in kfold(labels, 5, seed=0):
        train = [i for i in range(len(ppls)) if i not in fold]
        tp, tl = [ppls[i] for i in train], [labels[i] for i in train]
        fit = ref_fit(tp, tl)
        t = ref_temperature(ref_cv(tp, tl), tl)
        temps.append(t)
        spaces.append(fit.space)
        for i in fold:
            scaled[i] = fit(ppls[i], t)
    assert report["cv_fold_spaces"] == spaces
    assert report["cv_fold_temperatures"] == pytest.approx(temps, rel=2e-3)
    assert report["cv_nll_scaled"] == pytest.approx(ref_nll(scaled, labels), abs=1e-5)
    assert report["cv_posteriors_scaled"] == pytest.approx(scaled, abs=2e-4)
    # Unscaled held-out posteriors: each fold's own space (these seeds' folds disagree with the full fit's).
    assert report["cv_posteriors"] == pytest.approx(ref_cv(ppls, labels), abs=1e-12)
    assert len(set(spaces)) == 2


def test_held_out_scaling_is_not_always_an_improvement():
    """Scored on the posteriors it was fitted on, T could never raise the NLL
    (T = 1 is a candidate); held out, it can: on this data set it does."""
    ppls, labels = data(3)
    report = heldout_report(ppls, labels)
    assert report["cv_nll_scaled"] > report["cv_nll"]


def test_calibrate_reports_the_nested_figures_and_ships_the_temperature_of_all_answers():
    ppls, labels = data(2, n=60)
    labelled = [LabelledAnswer("q", ("1",), "r", p, 1, y) for p, y in zip(ppls, labels)]
    cal = calibrate(labelled, model="m")
    report = heldout_report(ppls, labels)
    assert cal.cv_nll_scaled == report["cv_nll_scaled"] and cal.cv_fold_temperatures == report["cv_fold_temperatures"]
    assert cal.temperature == pytest.approx(ref_temperature(ref_cv(ppls, labels), labels), rel=2e-3)
    scaled = report["cv_posteriors_scaled"]
    assert cal.cv_routing["fraction_routed"] == pytest.approx(sum(p < 0.5 for p in scaled) / len(scaled))


# ---- 9. held at the prior means the prior -------------------------------------------

def test_a_posterior_held_at_the_prior_is_the_prior_whatever_the_temperature():
    """Correct answers with the higher mean PPL: b = 0, P(correct) = the
    prior, and a temperature must not move it (the units file printed 0.181
    against a prior of 0.167)."""
    cal = Calibration("m", "log_ppl", 0.54, 0.02, 0.48, 0.02, 1 / 6, 0.5, 4, 20, temperature=1.0648)
    assert cal.logistic[1] == 0.0
    for ppl in (1.0, 1.5, 3.0, math.inf):
        assert cal.posterior_correct(ppl) == 1 / 6
    units = Calibration.load(shipped_calibration("units"))
    if units.logistic[1] == 0.0:
        assert units.posterior_correct(1.7) == units.prior_correct


# ---- 8. the shortest prefix worth routing on, chosen where it is not judged ----------

def _nlls(seed, n=60, unsure_tokens=2):
    """Answers of 8 tokens, as per-token NLLs. Wrong ones: about ln 2.2 per
    token. Correct ones: about ln 1.2, except that 40 % of them start unsure
    (ln 2.6 for their first ``unsure_tokens`` tokens, then about 0)."""
    rng = random.Random(seed)
    rows, labels = [], []
    for i in range(n):
        correct = i % 2 == 0
        unsure = correct and rng.random() < 0.4
        row = []
        for t in range(1, 9):
            if not correct:
                base = math.log(2.2)
            elif unsure:
                base = math.log(2.6) if t <= unsure_tokens else 0.0
            else:
                base = math.log(1.2)
            row.append(max(base + rng.uniform(-0.03, 0.03), 0.0))
        rows.append(row)
        labels.append(correct)
    return rows, labels


def running_ppls(nlls):
    return tuple(math.exp(sum(nlls[:t]) / t) for t in range(1, len(nlls) + 1))


def _answers(seed, n=60, unsure_tokens=2):
    rows, labels = _nlls(seed, n, unsure_tokens)
    return [running_ppls(r) for r in rows], labels


def _labelled(prefixes, labels):
    return [LabelledAnswer("q", ("1",), "r", p[-1], len(p), y, p) for p, y in zip(prefixes, labels)]


def test_early_route_at_is_where_the_live_router_routes():
    rows, labels = _nlls(1)
    prefixes = [running_ppls(r) for r in rows]
    cal = calibrate(_labelled(prefixes, labels), model="m")
    assert cal.prefix_models
    fired = 0
    for nlls, p in zip(rows, prefixes):
        records = [TokenRecord(i, "x", -x) for i, x in enumerate(nlls)]
        for t in (1, 2, 3, 5):
            end = Monitor(policies=[CARRouter(cal, early=True, min_tokens=t)]).run(RecordStream(records)).end
            live = end.n_tokens if end.reason == "policy" else None
            assert live == early_route_at(p, cal, t)
            fired += live is not None
    assert fired


def _out_of_fold_effects(prefixes, labels):
    """What routing early from each t adds, on held-out folds, with every fit
    (Gaussians, temperatures, prefix models) made by calibrate() on the other folds."""
    totals = {t: {"extra_correct": 0, "tokens_saved": 0} for t in range(1, 17)}
    for fold in kfold(labels, 5, seed=0):
        train = [i for i in range(len(labels)) if i not in fold]
        cal = calibrate(_labelled([prefixes[i] for i in train], [labels[i] for i in train]), model="m")
        for t in totals:
            effect = early_effect([prefixes[i] for i in fold], [labels[i] for i in fold], cal, t)
            for key in totals[t]:
                totals[t][key] += effect[key]
    return totals


def test_early_min_tokens_skips_prefixes_that_route_correct_answers():
    """Early from token 1 would route the unsure correct answers; the choice
    is the shortest t that adds routes of correct answers for at most 2 % of
    the answers, out of fold, and still routes something earlier."""
    prefixes, labels = _answers(1)
    effects = _out_of_fold_effects(prefixes, labels)
    assert effects[1]["extra_correct"] > EARLY_MARGIN * len(labels)  # the trap is real
    expected = next(t for t in range(1, 17) if effects[t]["extra_correct"] <= EARLY_MARGIN * len(labels) and effects[t]["tokens_saved"] > 0)
    assert expected > 1
    assert choose_early_min_tokens(prefixes, labels) == expected
    assert calibrate(_labelled(prefixes, labels), model="m").early_min_tokens == expected


def test_the_choice_is_judged_on_answers_it_never_saw():
    prefixes, labels = _answers(2)
    report = early_report(prefixes, labels)
    for t, fold in zip(report["fold_min_tokens"], kfold(labels, 5, seed=0)):
        train = [i for i in range(len(labels)) if i not in fold]
        assert t == choose_early_min_tokens([prefixes[i] for i in train], [labels[i] for i in train])
    assert report["extra_correct_routed"] <= 0.05
    assert report["short_tokens_saved"] > 0  # the wrong answers are routed before their end


def test_early_routing_is_off_when_no_prefix_keeps_correct_answers_and_saves_tokens():
    """Wrong answers look exactly like the unsure correct ones until their last
    token (where they go astray): any prefix that routes the wrong ones early
    routes those correct ones too, and the only safe start, the last token,
    saves nothing. The file says off (None) and the router stays quiet."""
    rng = random.Random(4)
    prefixes, labels = [], []
    for i in range(60):
        correct = i % 2 == 0
        unsure = not correct or rng.random() < 0.4
        nlls = [math.log(2.6)] * 2 + [0.0] * 5 + [4.0 if not correct else 0.0] if unsure else [math.log(1.2)] * 8
        prefixes.append(running_ppls([max(x + rng.uniform(-0.03, 0.03), 0.0) for x in nlls]))
        labels.append(correct)
    effects = _out_of_fold_effects(prefixes, labels)
    assert all(e["extra_correct"] > EARLY_MARGIN * len(labels) or e["tokens_saved"] == 0 for e in effects.values())
    cal = calibrate(_labelled(prefixes, labels), model="m")
    assert cal.early_min_tokens is None and cal.prefix_models
    assert CARRouter(cal, early=True).min_tokens > 10**9

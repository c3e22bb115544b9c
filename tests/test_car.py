"""CAR calibration maths, DeepConf thresholds, policy specs (fast, no model)."""

from __future__ import annotations

import json
import math
import re

import pytest

from livepp import LiveppError, Monitor, Tracker
from livepp.car.calibration import Calibration, auroc, expected_calibration_error, fit_calibration
from livepp.core.events import PolicyEvent
from livepp.core.policies import CARRouter, ConfidenceStop, EarlyStop, SpikeAlert, parse_policy, warmup_threshold
from livepp.car.tasks import answer_matches, builtin_split, load_questions


def test_gaussian_fit_and_posterior_by_hand():
    cal = fit_calibration([1, 2, 3, 4, 5, 6], [True, True, True, False, False, False], model="m", space="ppl")
    assert (cal.mean_correct, cal.mean_incorrect) == (2.0, 5.0)
    assert cal.var_correct == pytest.approx(2 / 3) and cal.var_incorrect == pytest.approx(2 / 3)
    assert cal.prior_correct == 0.5
    # Equal variances and priors: the midpoint is a coin toss.
    assert cal.posterior_correct(3.5) == pytest.approx(0.5)
    # At x = 2: likelihood ratio N(2;5,2/3)/N(2;2,2/3) = exp(-0.5 * 9 / (2/3)) = exp(-6.75).
    assert cal.posterior_correct(2.0) == pytest.approx(1 / (1 + math.exp(-6.75)), rel=1e-12)
    assert cal.posterior_correct(5.0) == pytest.approx(math.exp(-6.75) / (1 + math.exp(-6.75)), rel=1e-12)
    assert cal.auroc == 1.0


def test_unequal_priors_shift_the_posterior():
    cal = fit_calibration([1, 2, 3, 4, 5, 6, 1.5, 2.5], [True, True, True, False, False, False, True, True], model="m", space="ppl")
    assert cal.prior_correct == 5 / 8
    mc, vc, mi, vi = cal.mean_correct, cal.var_correct, cal.mean_incorrect, cal.var_incorrect
    v = (5 * vc + 3 * vi) / 8  # one pooled (shared) variance
    x = 3.7
    a = 5 / 8 * math.exp(-0.5 * (x - mc) ** 2 / v)
    b = 3 / 8 * math.exp(-0.5 * (x - mi) ** 2 / v)
    assert cal.posterior_correct(x) == pytest.approx(a / (a + b), rel=1e-12)


def test_threshold_semantics():
    cal = fit_calibration([1, 2, 3, 4, 5, 6], [True, True, True, False, False, False], model="m", space="ppl", threshold=0.5)
    assert not cal.should_route(3.5)  # posterior exactly at the threshold: keep the short answer
    assert cal.should_route(3.6) and not cal.should_route(3.4)
    strict = fit_calibration([1, 2, 3, 4, 5, 6], [True] * 3 + [False] * 3, model="m", space="ppl", threshold=0.9)
    assert strict.should_route(3.0) == (strict.posterior_correct(3.0) < 0.9)


def test_log_space_chosen_for_lognormal_data():
    import random

    rng = random.Random(0)
    good = [math.exp(rng.gauss(0.3, 0.5)) + 1 for _ in range(200)]
    bad = [math.exp(rng.gauss(1.2, 0.6)) + 1 for _ in range(200)]
    cal = fit_calibration(good + bad, [True] * 200 + [False] * 200, model="m")
    assert cal.space == "log_ppl" and "kept log_ppl" in cal.why_space


def test_too_few_examples_is_a_clear_error():
    with pytest.raises(LiveppError, match="need at least 3 correct and 3 incorrect"):
        fit_calibration([1.1, 1.2, 1.3, 2.0], [True, True, True, False], model="m")


def test_save_load_roundtrip_and_bad_files(tmp_path):
    cal = fit_calibration([1, 2, 3, 4, 5, 6], [True] * 3 + [False] * 3, model="m")
    p = tmp_path / "c.json"
    cal.save(p)
    assert Calibration.load(p) == cal
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(LiveppError, match="not valid JSON"):
        Calibration.load(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(LiveppError, match="not a livepp calibration file"):
        Calibration.load(tmp_path / "other.json")
    data = cal.to_dict() | {"var_correct": -1}
    (tmp_path / "neg.json").write_text(json.dumps(data))
    with pytest.raises(LiveppError, match="out-of-range"):
        Calibration.load(tmp_path / "neg.json")
    with pytest.raises(LiveppError, match="not found"):
        Calibration.load(tmp_path / "missing.json")


def test_auroc_and_ece_known_values():
    assert auroc([1, 2, 3, 4], [False, False, True, True]) == 1.0
    assert auroc([1, 2, 3, 4], [True, True, False, False]) == 0.0
    assert auroc([1, 1, 1, 1], [True, False, True, False]) == 0.5
    assert auroc([1, 3, 2, 4], [False, True, False, True]) == 1.0
    assert auroc([1, 2, 3, 4], [False, True, False, True]) == 0.75
    # Two bins: confidence 0.25 with accuracy 0 (gap .25) and 0.95 with accuracy 1 (gap .05).
    assert expected_calibration_error([0.25, 0.25, 0.95, 0.95], [False, False, True, True]) == pytest.approx(0.15)


def test_warmup_percentile_semantics():
    lows = list(range(1, 11))  # 1..10
    # keep the most confident 10%: the 90th percentile, 9.1 by linear interpolation
    assert warmup_threshold(lows, 10) == pytest.approx(9.1)
    assert sum(v >= warmup_threshold(lows, 10) for v in lows) == 1  # 10% of 10 traces survive
    assert warmup_threshold(lows, 90) == pytest.approx(1.9)
    assert warmup_threshold(lows, 100) == 1
    with pytest.raises(LiveppError):
        warmup_threshold([], 10)
    stop = ConfidenceStop.from_warmup(lows, keep_percent=10)
    assert stop.threshold == pytest.approx(9.1)


def test_confidence_stop_fires_when_group_confidence_drops(fake_source):
    # FakeSource sets confidence = -logprob: 10 confident tokens, then unsure ones.
    src = fake_source([-12.0] * 10 + [-2.0] * 10)
    result = Monitor(policies=[ConfidenceStop(8.0)], tracker_factory=lambda: Tracker(confidence_window=4)).run(src)
    # group mean over 4: [12,12,12,2]=9.5, [12,12,2,2]=7 < 8 at index 11
    assert result.end.reason == "policy" and result.end.n_tokens == 12


def test_spike_alert_notes_and_never_stops(fake_source):
    result = Monitor(policies=[SpikeAlert(3.0, min_tokens=3), EarlyStop(1e9)]).run(
        fake_source([-0.1, -0.2, -0.1, -0.15, -0.1, -9.0, -0.1], finish_reason="eos"))
    notes = [e for e in result.events if isinstance(e, PolicyEvent)]
    assert [(n.action, n.index) for n in notes] == [("note", 5)]
    assert result.end.reason == "eos"


def test_car_router_routes_early_only_when_asked(fake_source):
    cal = fit_calibration([1, 1.1, 1.2, 3, 3.5, 4], [True] * 3 + [False] * 3, model="m", space="ppl")
    assert Monitor(policies=[CARRouter(cal)]).run(fake_source([-1.5] * 6)).end.reason == "length"
    early = Monitor(policies=[CARRouter(cal, early=True, min_tokens=2)]).run(fake_source([-1.5] * 6))
    assert early.end.reason == "policy" and early.end.n_tokens == 2


@pytest.mark.parametrize(
    "spec,cls,attrs",
    [
        ("early-stop:threshold=8,metric=window_ppl,min_tokens=16", EarlyStop, {"threshold": 8.0, "min_tokens": 16}),
        ("spike:z=2.5", SpikeAlert, {"z": 2.5}),
        ("spike", SpikeAlert, {"z": 3.0}),
        ("confidence-stop:threshold=9.5", ConfidenceStop, {"threshold": 9.5}),
    ],
)
def test_parse_policy(spec, cls, attrs):
    p = parse_policy(spec)
    assert isinstance(p, cls)
    for k, v in attrs.items():
        assert getattr(p, k) == v


@pytest.mark.parametrize(
    "spec,message",
    [("nope", "unknown policy"), ("early-stop", "needs threshold"), ("early-stop:threshold=x", "must be a float"),
     ("early-stop:threshold=8,colour=red", "bad option"), ("early-stop:threshold=0.5", "finite number > 1")],
)
def test_bad_policy_specs(spec, message):
    with pytest.raises(LiveppError, match=message):
        parse_policy(spec)


def test_answer_matcher():
    assert answer_matches("3 + 4 = 7", ["7"])
    assert not answer_matches("7 + 4 = 11", ["7"])  # the last number counts
    assert answer_matches("It is 1,200 grams.", ["1200"])
    assert answer_matches("The capital is Bogotá.", ["Bogota"])
    assert answer_matches("Buenos  Aires!", ["Buenos Aires"])
    assert not answer_matches("Parisian", ["Paris"])
    assert answer_matches("the answer: 7.0", ["7"])


def test_builtin_splits_are_disjoint_and_answers_computed():
    for task in ("sums", "products", "two-digit-sums", "units", "capitals"):
        calib, evals = builtin_split(task, "calib"), builtin_split(task, "eval")
        assert calib and evals and not {q.question for q in calib} & {q.question for q in evals}
    for q in builtin_split("products", "calib") + builtin_split("products", "eval"):
        a, b = map(int, re.findall(r"\d+", q.question))
        assert q.answers == (str(a * b),)
    assert len(load_questions("builtin:sums:eval", limit=5)) == 5
    with pytest.raises(LiveppError, match="unknown built-in task"):
        load_questions("builtin:nope")


def test_user_jsonl_questions(tmp_path):
    f = tmp_path / "q.jsonl"
    f.write_text('{"question": "What is 2+2?", "answers": [4]}\n\n{"question": "Capital of Peru?", "answers": "Lima"}\n')
    qs = load_questions(str(f))
    assert [q.answers for q in qs] == [("4",), ("Lima",)]
    f.write_text('{"question": "", "answers": []}\n')
    with pytest.raises(LiveppError, match="need"):
        load_questions(str(f))


from hypothesis import given, settings
from hypothesis import strategies as st

_GRID = [1.0 + (10 ** (k / 40) - 1.0) for k in range(0, 241)]  # dense from 1 to 1e6, log-spaced


def _non_increasing(cal):
    posts = [cal.posterior_correct(p) for p in _GRID]
    return all(b <= a + 1e-15 for a, b in zip(posts, posts[1:]))


@given(st.lists(st.tuples(st.floats(min_value=1.0, max_value=200.0), st.booleans()), min_size=6, max_size=60),
       st.sampled_from(["ppl", "log_ppl", None]))
@settings(max_examples=200, deadline=None)
def test_fitted_posterior_never_rises_with_ppl(rows, space):
    ppls = [p for p, _ in rows]
    labels = [c for _, c in rows]
    if sum(labels) < 3 or len(labels) - sum(labels) < 3:
        return
    cal = fit_calibration(ppls, labels, model="m", space=space)
    assert _non_increasing(cal)
    assert cal.posterior_correct(math.inf) <= cal.posterior_correct(_GRID[-1])


def test_every_shipped_calibration_is_monotone():
    from pathlib import Path

    files = sorted((Path(__file__).parent.parent / "livepp" / "car" / "data").glob("*.json"))
    assert files
    for f in files:
        assert _non_increasing(Calibration.load(f)), f


def test_the_old_shipped_shape_is_monotone_now():
    # The first shipped file's numbers: var_correct 0.054 > var_incorrect 0.022
    # made P(correct) 0.43 at PPL 1.5 but 0.97 at 3 and 1.00 at 50.
    old = Calibration("m", "log_ppl", 0.3843, 0.0543, 0.4823, 0.0224, 0.5125, 0.5, 41, 39, var_pooled=None)
    assert old.method == "pooled_variance"
    assert old.posterior_correct(3.0) < old.posterior_correct(1.5) < old.posterior_correct(1.05)
    assert old.posterior_correct(50.0) < 0.01

"""Logprobs outside (-inf, 0]: what every statistic and policy does with them,
and that traces holding them survive `--json` and `replay`."""

from __future__ import annotations

import io
import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from livepp.core.stream import RecordStream
from livepp import EarlyStop, JsonlSink, Monitor
from livepp.car.calibration import Calibration
from livepp.core.policies import CARRouter, ConfidenceStop, SpikeAlert
from livepp.core.replay import read_traces, replay_trace
from livepp.core.tracker import Tracker


def test_minus_inf_makes_ppl_infinite_and_the_window_recovers():
    t = Tracker(window=3, ema_alpha=0.5)
    for lp in (-1.0, -2.0, -1.5):
        t.update(lp)
    t.update(-math.inf)
    assert t.ppl == math.inf and t.mean_nll == math.inf
    assert t.window_ppl == math.inf and t.ema_nll == math.inf
    assert t.surprise_z == math.inf and t.n_infinite == 1
    t.update(-1.0)
    t.update(-1.0)
    assert t.window_ppl == math.inf  # the infinite token is still in the last 3
    assert t.ema_nll == pytest.approx(0.5 * 1.0 + 0.5 * 1.0)  # re-seeded by the first finite token after it
    t.update(-4.0)
    # It has left the window: the window is the plain mean of the last three.
    assert t.window_ppl == pytest.approx(math.exp((1.0 + 1.0 + 4.0) / 3))
    assert t.ppl == math.inf  # the whole sequence had probability 0
    # Welford skipped it: z of a new token against the finite history only.
    hist = [1.0, 2.0, 1.5, 1.0, 1.0, 4.0]
    mu = sum(hist) / len(hist)
    sd = math.sqrt(sum((h - mu) ** 2 for h in hist) / (len(hist) - 1))
    t.update(-3.0)
    assert t.surprise_z == pytest.approx((3.0 - mu) / sd)
    assert not any(math.isnan(x) for x in (t.window_ppl, t.ema_nll, t.surprise_z))


@pytest.mark.parametrize("bad", [float("nan"), None, math.inf])
def test_nan_null_and_plus_inf_count_as_infinite_nll(bad):
    t = Tracker(window=2)
    t.update(-1.0)
    t.update(bad)
    assert t.ppl == math.inf and t.window_ppl == math.inf and t.n_infinite == 1
    t.update(-1.0)
    t.update(-1.0)
    assert t.window_ppl == pytest.approx(math.e)


@given(st.lists(st.one_of(st.floats(min_value=-30.0, max_value=0.0), st.just(-math.inf)), min_size=1, max_size=80),
       st.integers(min_value=1, max_value=10))
@settings(max_examples=150, deadline=None)
def test_window_equals_the_plain_formula_with_infinities(logprobs, window):
    t = Tracker(window=window)
    for lp in logprobs:
        t.update(lp)
    last = [-lp for lp in logprobs[-window:]]
    expected = math.inf if any(math.isinf(x) for x in last) else math.exp(math.fsum(last) / len(last))
    assert t.window_ppl == pytest.approx(expected, rel=1e-9)
    assert (t.ppl == math.inf) == any(math.isinf(lp) for lp in logprobs)


def test_every_policy_treats_an_infinite_nll_as_worse_than_any_threshold():
    t = Tracker(window=4)
    stop = EarlyStop(1e9, metric="window_ppl", min_tokens=1)
    spike = SpikeAlert(z=50.0, min_tokens=1)
    for lp in (-1.0, -1.2, -0.8):
        t.update(lp)
    t.update(-math.inf)
    assert stop.check(None, t).action == "stop"
    assert spike.check(type("E", (), {"text": "x"})(), t).action == "note"
    cal = Calibration("m", "log_ppl", 0.1, 0.01, 0.7, 0.01, 0.5)
    assert CARRouter(cal, early=True, min_tokens=1).check(None, t).action == "route"


def test_a_logprob_above_zero_by_rounding_is_clamped_and_car_does_not_raise():
    t = Tracker()
    t.update(1e-7)
    t.update(2e-9)
    assert t.ppl == 1.0 and t.mean_nll == 0.0
    cal = Calibration("m", "log_ppl", 0.1, 0.01, 0.7, 0.01, 0.5)
    decision = CARRouter(cal).decide(t.ppl)
    assert decision.action == "continue"  # P(correct) at PPL 1 is high under this calibration
    assert cal.posterior_correct(0.9999999) == cal.posterior_correct(1.0)


def test_early_stop_fires_on_the_infinite_token_itself(fake_source):
    logprobs = [-0.5] * 5 + [-math.inf] + [-0.5] * 5
    source = fake_source(logprobs)
    result = Monitor(policies=[EarlyStop(50.0, metric="window_ppl", min_tokens=1)]).run(RecordStream(source))
    assert result.end.reason == "policy" and result.end.n_tokens == 6


def test_traces_with_infinite_logprobs_round_trip_through_json_and_replay(tmp_path, fake_source):
    logprobs = [-0.5, -0.7, -math.inf, -0.4, -0.6, -0.3]
    out = io.StringIO()
    Monitor(sinks=[JsonlSink(out)]).run(RecordStream(fake_source(logprobs)))
    lines = [json.loads(line) for line in out.getvalue().splitlines()]  # strict JSON: no NaN/Infinity
    assert lines[3]["logprob"] is None and lines[3]["ppl"] is None
    path = tmp_path / "trace.jsonl"
    path.write_text(out.getvalue())
    [trace] = read_traces(path)
    assert trace.records[2].logprob == -math.inf
    live = Monitor(policies=[EarlyStop(20.0, metric="window_ppl", min_tokens=1)]).run(RecordStream(fake_source(logprobs)))
    assert replay_trace(trace, [EarlyStop(20.0, metric="window_ppl", min_tokens=1)]) == live.end.n_tokens - 1 == 2


@pytest.mark.parametrize("label", ['"false"', '"true"', "1", "0", '"yes"'])
def test_replay_accepts_only_json_booleans_as_labels(tmp_path, label):
    from livepp import LiveppError

    path = tmp_path / "t.jsonl"
    path.write_text(
        '{"type":"start","model":"m","prompt_token_ids":[],"params":{}}\n'
        '{"type":"token","index":0,"token_id":1,"text":"a","logprob":-1.0}\n'
        f'{{"type":"end","reason":"eos","n_tokens":1,"correct":{label}}}\n'
    )
    with pytest.raises(LiveppError, match="JSON boolean"):
        read_traces(path)
    path.write_text(path.read_text().replace(f'"correct":{label}', '"correct":false'))
    assert read_traces(path)[0].correct is False


def test_confidence_stop_is_unchanged_by_an_infinite_nll():
    t = Tracker(confidence_window=2)
    stop = ConfidenceStop(5.0, min_tokens=1)
    t.update(-math.inf, confidence=10.0)
    t.update(-0.1, confidence=10.0)
    assert stop.check(None, t).action == "continue"

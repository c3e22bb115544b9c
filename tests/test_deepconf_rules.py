"""DeepConf's rules as the reference (facebookresearch/deepconf: processors.py,
wrapper.py, utils.py) applies them, on a scripted engine: the window fits the
budget, finished traces are checked after the fact, only real answers vote,
the reference's trace scores, and its answer extraction. Expected values are
computed here by hand or with the reference's formulas written out in numpy."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from click.testing import CliRunner

from livepp.car.answers import extract_answer, vote_key
from livepp.car.deepconf import default_group, think, weighted_vote
from livepp.car.trace_scores import trace_scores
from livepp.cli.main import main
from livepp.core.params import GenerationParams
from livepp.core.tracker import Tracker
from scripted_engine import ScriptedEngine

Q = "What is 7 + 8?"


def trace(answer: str, confs) -> list[tuple[str, float]]:
    """A scripted trace: one token per confidence (the scripted engine's
    confidence is -logprob), the answer in the last token's text."""
    confs = list(confs)
    return [("w ", -c) for c in confs[:-1]] + [(f" {answer}", -confs[-1])]


def params(max_new_tokens: int = 256) -> GenerationParams:
    return GenerationParams(max_new_tokens=max_new_tokens, temperature=0.7, top_p=0.95, seed=0)


# ---- the reference's formulas, written out (utils.py, helper.py) ------------

def ref_least_grouped(confs, group):
    if len(confs) < group:
        return [sum(confs) / len(confs)] if confs else [0]
    return [float(np.mean(confs[i:i + group])) for i in range(len(confs) - group + 1)]


def ref_tail(confs, tail):
    return float(np.mean(confs[-tail:] if len(confs) > tail else confs)) if confs else 0.0


def ref_bottom_window(confs, window, bottom=0.1):
    if not confs:
        return 0.0
    if len(confs) < window:
        return float(np.mean(confs))
    means = [float(np.mean(confs[i:i + window])) for i in range(len(confs) - window + 1)]
    k = max(1, int(len(means) * bottom))
    return min(means) if k == 1 else float(np.mean(np.partition(means, k - 1)[:k]))


# ---- 1. the window fits the budget ------------------------------------------

def test_default_window_is_a_sixteenth_of_the_budget_within_8_to_2048():
    assert [default_group(n) for n in (4, 24, 96, 256, 1024, 32000, 64000)] == [4, 8, 8, 16, 64, 2000, 2048]


def test_with_the_defaults_the_online_stop_fires():
    """think()'s defaults (256 tokens): the window is 16, so a trace whose
    confidence drops below the warm-up threshold is stopped at the first
    full group below it. With a 2048-token window nothing could be stopped."""
    confident = trace("15", [5.0] * 30)
    weak = trace("13", [5.0] * 10 + [1.0] * 30)
    engine = ScriptedEngine({Q: [confident] * 4 + [weak] * 4})
    result = think(Q, engine=engine, params=params())
    assert result.group == 16 and result.threshold == pytest.approx(5.0)
    stopped = [t for t in result.traces if t.status == "stopped"]
    # 16 traces, the scripts taken by seed % 8: the weak ones are samples 4-7 and 12-15.
    assert [t.sample for t in stopped] == [4, 5, 6, 7, 12, 13, 14, 15]
    # The first full window holding a 1 (token 15: ten 5s, six 1s... any 1) is below 5.
    assert all(t.n_tokens == 16 for t in stopped)
    assert result.answer == "15" and result.tokens == 8 * 30 + 8 * 16


def test_a_window_longer_than_the_budget_is_warned_about(recwarn):
    engine = ScriptedEngine({Q: [trace("15", [5.0] * 8)]})
    result = think(Q, engine=engine, traces=3, warmup=1, group=64, params=params(32))
    assert any("can be stopped" in str(w.message) for w in recwarn.list)
    assert result.warnings and "longer than max_new_tokens" in result.warnings[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        think(Q, engine=engine, traces=3, warmup=1, group=16, params=params(32))  # fits: no warning


def test_the_cli_warns_when_the_window_cannot_fill():
    engine = ScriptedEngine({Q: [trace("15", [5.0] * 8)]})
    out = CliRunner().invoke(main, ["think", Q, "--traces", "3", "--warmup", "1", "--group", "64", "--max-new-tokens", "32",
                                    "--prompt", "{question}", "--json"], obj={"engine": engine})
    assert out.exit_code == 0, out.output
    assert "livepp: warning:" in out.stderr and "no trace can be stopped online" in out.stderr
    vote = json.loads(out.stdout.splitlines()[-1])
    assert vote["group"] == 64 and vote["warnings"]


# ---- 2. finished traces are checked after the fact ----------------------------

def test_a_finished_trace_below_the_threshold_is_excluded_as_the_reference_does():
    """wrapper.py: every final trace with min_conf < conf_bar is
    gconf_threshold and does not vote; a trace shorter than the window
    scores its whole mean (compute_least_grouped)."""
    warm = [trace("15", [4.0] * 20), trace("15", [5.0] * 20)]
    short_weak = trace("13", [3.0, 2.0, 4.0])  # ends before a group of 8 fills: never stopped, mean 3 < threshold
    short_sure = trace("13", [6.0, 5.0, 7.0])  # mean 6 >= threshold
    engine = ScriptedEngine({Q: warm + [short_weak, short_sure]})
    result = think(Q, engine=engine, traces=4, warmup=2, eta=90, group=8, params=params(64))
    conf_bar = float(np.percentile([min(ref_least_grouped([4.0] * 20, 8)), min(ref_least_grouped([5.0] * 20, 8))], 10))
    assert result.threshold == pytest.approx(conf_bar)
    by_sample = {t.sample: t for t in result.traces}
    assert by_sample[2].reason == "eos" and by_sample[2].lowest == pytest.approx(3.0)
    assert by_sample[2].status == "excluded" and 2 not in result.kept
    # conf_bar = 4.1: warm-up trace 0 (lowest 4) is filtered too, as wrapper.py filters warm-up traces.
    assert by_sample[0].status == "excluded"
    assert by_sample[3].status == "voted" and result.kept == [1, 3]
    assert result.vote_dict()["excluded"] == [0, 2]
    assert result.weights == pytest.approx({"15": 5.0, "13": 6.0})


# ---- 3. only real answers vote --------------------------------------------------

def test_cancelled_traces_never_vote_in_the_baselines():
    """A consensus cancels the rows still running: here 9 of 12, whose text is
    empty. They count in no vote (livepp once printed majority '' from 7 such
    rows): majority and the mean-confidence vote are over the traces that
    finished with an answer."""
    engine = ScriptedEngine({Q: [trace("15", [5.0] * 10)]})
    result = think(Q, engine=engine, traces=12, warmup=2, group=4, consensus=0.9, params=params(64))
    assert result.consensus_reached
    assert [t.status for t in result.traces] == ["voted"] * 3 + ["cancelled"] * 9
    assert result.majority == "15" and result.mean_confidence_answer == "15"
    assert result.weights == pytest.approx({"15": 15.0})
    assert result.vote_dict()["cancelled"] == list(range(3, 12))


def test_an_empty_trace_has_no_answer_and_never_votes():
    engine = ScriptedEngine({Q: [trace("15", [5.0] * 10), [("", -5.0)], [("", -5.0)], [("", -5.0)]]})
    result = think(Q, engine=engine, traces=4, group=4, mode="offline", params=params(64))
    assert [t.status for t in result.traces] == ["voted", "no_answer", "no_answer", "no_answer"]
    assert result.majority == "15" and result.answer == "15" and "" not in result.weights


def test_a_trace_without_confidences_scores_0_as_the_reference_and_the_threshold_is_a_number():
    """A remote engine that sends no top logprobs (k = 0): compute_confidence
    gives [], compute_least_grouped [0], so min_conf = 0; the percentile of
    zeros is 0, and every finished trace with an answer votes with weight 0,
    which is a plain majority."""
    engine = ScriptedEngine({Q: [trace("15", [1.0] * 12), trace("13", [1.0] * 12), trace("15", [1.0] * 12)]}, confidences=False)
    result = think(Q, engine=engine, traces=6, warmup=2, group=4, params=params(64))
    assert result.threshold == 0.0
    assert all(t.score == 0.0 and t.lowest == 0.0 for t in result.traces)
    assert result.answer == "15" and result.weights == {"15": 0.0, "13": 0.0}
    assert result.majority == "15"


def test_a_weight_of_0_or_a_cancelled_row_cannot_take_the_lead_from_the_answer_with_more_votes():
    assert weighted_vote([("13", 0.0), ("15", 0.0), ("15", 0.0)]) == ("15", {"13": 0.0, "15": 0.0})
    assert weighted_vote([("8", 5.0), ("15", 4.0), ("15", 3.0), ("8", 1.5)]) == ("15", {"8": 6.5, "15": 7.0})


# ---- 4. the reference's trace scores ------------------------------------------------

@pytest.mark.parametrize("n", [0, 1, 5, 16, 17, 40, 233])
def test_trace_scores_equal_the_reference_formulas(n):
    rng = np.random.default_rng(n)
    confs = [float(x) for x in rng.uniform(0.5, 9.0, n)]
    got = trace_scores(confs, window=16, tail_tokens=24)
    least = ref_least_grouped(confs, 16)
    assert got["lowest"] == pytest.approx(min(least), abs=1e-12)
    assert got["tail"] == pytest.approx(ref_tail(confs, 24), abs=1e-12)
    assert got["bottom10"] == pytest.approx(ref_bottom_window(confs, 16), abs=1e-12)
    assert got["mean"] == pytest.approx(float(np.mean(confs)) if confs else 0.0, abs=1e-12)


def test_lowest_equals_the_trackers_bit_for_bit():
    rng = np.random.default_rng(3)
    confs = [float(x) for x in rng.uniform(0.5, 9.0, 300)]
    tracker = Tracker(confidence_window=16)
    for c in confs:
        tracker.update(-1.0, confidence=c)
    assert trace_scores(confs, window=16)["lowest"] == tracker.lowest_group_confidence


@pytest.mark.parametrize("score", ["tail", "bottom10", "mean"])
def test_the_score_chosen_weights_the_vote_and_offline_filters_by_it(score):
    """Offline, the top eta % by the chosen score vote, weighted by it."""
    scripts = [trace("15", [9.0] * 8 + [1.0] * 24), trace("13", [2.0] * 32), trace("13", [2.5] * 32), trace("15", [3.0] * 32)]
    engine = ScriptedEngine({Q: scripts})
    result = think(Q, engine=engine, traces=4, group=8, mode="offline", eta=50, score=score, tail_tokens=8, params=params(64))
    confs = [[-lp for _, lp in s] for s in scripts]
    expected = {"tail": [ref_tail(c, 8) for c in confs], "bottom10": [ref_bottom_window(c, 8) for c in confs],
                "mean": [float(np.mean(c)) for c in confs]}[score]
    assert [t.score for t in result.traces] == pytest.approx(expected)
    threshold = float(np.percentile(expected, 50))
    kept = [i for i, s in enumerate(expected) if s >= threshold]
    assert result.kept == kept
    weights: dict[str, float] = {}
    for i in kept:
        weights[["15", "13", "13", "15"][i]] = weights.get(["15", "13", "13", "15"][i], 0.0) + expected[i]
    assert result.weights == pytest.approx(weights)


def test_online_threshold_and_stop_use_the_lowest_group_confidence_whatever_the_score():
    warm = [trace("15", [4.0] * 20), trace("15", [6.0] * 20)]
    engine = ScriptedEngine({Q: warm + [trace("13", [6.0] * 4 + [3.0] * 20)]})
    result = think(Q, engine=engine, traces=3, warmup=2, eta=50, group=4, score="mean", params=params(64))
    assert result.threshold == pytest.approx(5.0)  # the median of lowest group confidences 4 and 6
    assert result.traces[2].status == "stopped" and result.traces[2].n_tokens == 6  # (6+6+3+3)/4 = 4.5 < 5 at token index 5
    assert result.traces[0].status == "excluded"  # warm-up lowest 4 < 5
    assert result.weights == {"15": pytest.approx(6.0)}


def test_think_cli_takes_the_score_and_prints_every_status():
    scripts = [trace("15", [4.0] * 20), trace("15", [5.0] * 20), trace("13", [3.0, 2.0, 4.0])]
    engine = ScriptedEngine({Q: scripts})
    out = CliRunner().invoke(main, ["think", Q, "--traces", "3", "--warmup", "2", "--group", "8", "--score", "tail",
                                    "--max-new-tokens", "64", "--prompt", "{question}"], obj={"engine": engine})
    assert out.exit_code == 0, out.output
    assert "excluded" in out.stdout and "voted" in out.stdout and "score tail" in out.stdout


# ---- 5. answers as the reference extracts them ----------------------------------------

@pytest.mark.parametrize("text, answer", [
    (r"so 7 + 8 = 15, and the answer is \boxed{15}. Check: 3", "15"),  # boxed first, even before a later number
    (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),  # balanced braces, as the reference
    (r"first \boxed{3}, then \boxed{ 4 }", "4"),  # the last box
    (r"the answer is \boxed 12$ here", "12"),  # no brace: up to the next $
    (r"\boxed{1,234}", "1234"),
    ("7 + 8 = 15.", "15"),
    ("The result is 15.0", "15"),
    ("Paris!", "paris"),
    ("  ", None),
    (r"\boxed{}", None),
    ("", None),
])
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


def test_large_numbers_keep_every_digit():
    """vote_key wrote f"{n:g}": 1234567 and 1234568 were one answer (1.23457e+06)."""
    assert vote_key("1234567") != vote_key("1234568")
    assert vote_key("1234567") == "1234567" and vote_key("0.1") == "0.1"


def test_answerless_traces_do_not_vote_or_count_in_the_consensus_share():
    """Warm-up: 15 and 13 (weights 5 and 5). Then two answer-less traces, then
    a 15, then 13s. Counted in the share, the answer-less ones would keep it
    at 10 / 25 = 0.4 after the third; not counted, it is 10 / 15 = 0.67 >= 0.6
    there, and the 13s that follow are cancelled."""
    nothing = [("...", -5.0)] * 3 + [(r" \boxed{}", -5.0)]
    fifteen, thirteen = trace("15", [5.0] * 10), trace("13", [5.0] * 10)
    engine = ScriptedEngine({Q: [fifteen, thirteen, nothing, nothing, fifteen] + [thirteen] * 5})
    result = think(Q, engine=engine, traces=10, warmup=2, group=4, consensus=0.6, params=params(64))
    assert [t.status for t in result.traces[:5]] == ["voted", "voted", "no_answer", "no_answer", "voted"]
    assert result.consensus_reached and result.answer == "15"
    assert all(t.status == "cancelled" for t in result.traces[5:])
    assert result.weights == pytest.approx({"15": 10.0, "13": 5.0})


def test_a_threshold_over_infinite_scores_is_a_number_and_stops_as_it_should():
    """A confidence of +inf (a top-k holding zero-probability tokens) can make
    a score +inf: numpy's interpolation gives inf - inf = NaN there; livepp's
    threshold is the limit of the interpolation, and the stop takes it."""
    import math

    from livepp.core.policies import ConfidenceStop, warmup_threshold

    assert warmup_threshold([1.0, math.inf], 50) == math.inf  # between 1 and inf: inf
    assert warmup_threshold([math.inf, math.inf, 2.0], 10) == math.inf  # 2 + 0.2 * (inf - 2)
    assert warmup_threshold([math.inf, math.inf], 10) == math.inf
    assert warmup_threshold([1.0, 2.0, math.inf], 100) == 1.0
    with pytest.raises(Exception):
        warmup_threshold([1.0, math.nan], 50)
    assert ConfidenceStop(math.inf).threshold == math.inf
    with pytest.raises(ValueError):
        ConfidenceStop(math.nan)

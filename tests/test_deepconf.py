"""DeepConf on the batched decoder: warm-up threshold, online stops, the
weighted vote, and traces equal to the same trace decoded alone."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from livepp import GenerationParams, Monitor
from livepp.cli.main import main
from livepp.car.deepconf import think, weighted_vote
from livepp.core.tracker import Tracker

pytestmark = pytest.mark.model

QUESTION = "What is 7 + 8?"
PARAMS = GenerationParams(max_new_tokens=24, temperature=0.8, top_p=0.95, seed=0)
PROMPT = "{question} Answer briefly."
GROUP = 6


class Recorder:
    def __init__(self):
        self.events = {}

    def emit_sample(self, sample, event):
        self.events.setdefault(sample, []).append(event)


def lowest_group_confidence(tokens, group):
    """Oracle from the token events: min of the window means over full windows
    (the partial window's mean if none filled)."""
    confs = [t.confidence for t in tokens]
    if len(confs) < group:
        return sum(confs) / len(confs)
    return min(sum(confs[i - group + 1 : i + 1]) / group for i in range(group - 1, len(confs)))


@pytest.fixture(scope="module")
def online(decoder):
    rec = Recorder()
    result = think(QUESTION, engine=decoder, traces=8, warmup=4, eta=90, group=GROUP, params=PARAMS, prompt=PROMPT, sinks=[rec])
    return result, rec


def test_warmup_threshold_is_numpys_percentile(online):
    result, rec = online
    scores = [lowest_group_confidence([e for e in rec.events[i] if e.type == "token"], GROUP) for i in range(4)]
    assert result.threshold == pytest.approx(float(np.percentile(scores, 10)), abs=1e-9)  # eta 90: the 10th percentile
    assert [o.score for o in result.traces[:4]] == pytest.approx(scores, abs=1e-9)


def test_online_traces_stop_at_the_first_token_below_the_threshold(online):
    result, rec = online
    for o in result.traces[4:]:
        tokens = [e for e in rec.events[o.sample] if e.type == "token"]
        below = [e.index for e in tokens if e.index >= GROUP - 1 and e.group_confidence < result.threshold]
        if o.reason == "policy":
            assert below and below[0] == tokens[-1].index  # stopped right there, not later
        else:
            assert not below
    assert any(o.reason == "policy" for o in result.traces[4:]), "this seed should stop at least one trace"


def test_vote_is_the_hand_computed_weighted_vote(online):
    """The reference's rule (wrapper.py): a trace votes when it was not
    stopped, its lowest group confidence (from its token events) is at least
    the threshold, and it has an answer; weighted by that score."""
    from livepp.car.answers import extract_answer

    result, rec = online
    votes = []
    for o in result.traces:
        tokens = [e for e in rec.events[o.sample] if e.type == "token"]
        end = next(e for e in rec.events[o.sample] if e.type == "end")
        score = lowest_group_confidence(tokens, GROUP)
        if end.reason != "policy" and score >= result.threshold and extract_answer(end.text) is not None:
            votes.append((o.sample, extract_answer(end.text), score))
    assert result.kept == [s for s, _, _ in votes]
    weights = {}
    for _, answer, score in votes:
        weights[answer] = weights.get(answer, 0.0) + score
    assert result.weights == pytest.approx(weights)
    assert result.answer == max(weights, key=weights.get)
    assert result.tokens == sum(o.n_tokens for o in result.traces)


def test_weighted_vote_by_hand():
    assert weighted_vote([("8", 5.0), ("15", 4.0), ("15", 3.0), ("8", 1.5)]) == ("15", {"8": 6.5, "15": 7.0})
    assert weighted_vote([]) == (None, {})


def test_a_trace_equals_the_same_trace_decoded_alone(decoder, online):
    result, rec = online
    o = result.traces[5]
    ids = decoder.encode(PROMPT.format(question=QUESTION))
    from dataclasses import replace

    alone = Monitor(tracker_factory=lambda: Tracker(confidence_window=GROUP)).run(decoder.stream(ids, replace(PARAMS, seed=PARAMS.seed + 5)))
    tokens = [e for e in rec.events[5] if e.type == "token"]
    n = len(tokens)  # a stopped trace is a prefix of the full one
    assert [t.token_id for t in tokens] == alone.token_ids[:n]
    assert [t.logprob for t in tokens] == pytest.approx([t.logprob for t in alone.tokens[:n]], abs=1e-4)
    assert [t.group_confidence for t in tokens] == pytest.approx([t.group_confidence for t in alone.tokens[:n]], abs=1e-3)
    assert o.n_tokens == n


def test_offline_keeps_the_top_eta_percent_and_runs_everything(decoder, online):
    online_result, _ = online
    offline = think(QUESTION, engine=decoder, traces=8, group=GROUP, eta=50, mode="offline", params=PARAMS, prompt=PROMPT)
    scores = [o.score for o in offline.traces]
    threshold = float(np.percentile(scores, 50))
    assert offline.threshold == pytest.approx(threshold)
    assert offline.kept == [o.sample for o in offline.traces if o.score >= threshold]
    assert all(o.reason != "policy" for o in offline.traces)
    # Same seeds: the online warm-up traces are the offline traces 0..3, and
    # online used fewer tokens than running everything to the end.
    assert [o.text for o in offline.traces[:4]] == [o.text for o in online_result.traces[:4]]
    assert online_result.tokens < offline.tokens


def test_think_cli_json_and_errors(decoder):
    out = CliRunner().invoke(main, ["think", QUESTION, "--traces", "4", "--warmup", "2", "--eta", "90", "--group", "4",
                                    "--max-new-tokens", "8", "--prompt", PROMPT, "--json"])
    assert out.exit_code == 0, out.output
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    assert lines[-1]["type"] == "vote" and lines[-1]["traces"] == 4
    assert sorted({e["sample"] for e in lines[:-1]}) == [0, 1, 2, 3]
    bad = CliRunner().invoke(main, ["think", QUESTION, "--traces", "2", "--warmup", "2"])
    assert bad.exit_code == 2 and "warmup < traces" in bad.output

"""Reasoning steps: segmentation as text streams in, per-step PPL, the
step-ppl policy live and in replay, and `generate --steps`."""

from __future__ import annotations

import json
import math
import re

import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from livepp.cli.main import main
from livepp.core.events import StepEvent, TokenRecord
from livepp.core.monitor import Monitor
from livepp.core.policies import StepPPL, parse_policy
from livepp.core.replay import read_traces, replay_trace
from livepp.core.steps import DEFAULT_STEP_REGEX, StepSegmenter
from livepp.core.stream import RecordStream


def run(pieces, logprobs=None, **monitor):
    logprobs = logprobs or [-0.5] * len(pieces)
    recs = [TokenRecord(token_id=i, text=t, logprob=lp, entropy=1.0 + i, confidence=10.0 - i) for i, (t, lp) in enumerate(zip(pieces, logprobs))]
    return Monitor(**monitor).run(RecordStream(recs))


def steps_of(result):
    return [e for e in result.events if isinstance(e, StepEvent)]


def test_default_rule_cuts_at_step_lines_and_blank_lines_with_each_steps_numbers():
    pieces = ["Step", " 1", ":", " a", "\n", "Step", " 2", ":", " b", "\n\n", "Answer", ":", " 3"]
    lps = [-0.1] * 5 + [-2.0] * 5 + [-0.7] * 3
    r = run(pieces, lps, steps=DEFAULT_STEP_REGEX)
    s = steps_of(r)
    assert [(x.start_token, x.end_token, x.text) for x in s] == [(0, 4, "Step 1: a\n"), (5, 9, "Step 2: b\n\n"), (10, 12, "Answer: 3")]
    assert [x.ppl for x in s] == pytest.approx([math.exp(0.1), math.exp(2.0), math.exp(0.7)])
    assert s[1].mean_entropy == pytest.approx(sum(1.0 + i for i in range(5, 10)) / 5) and s[1].min_confidence == 10.0 - 9
    # the first step is reported once "Step 2" shows the line starts a new step, before the end
    order = [e.type for e in r.events]
    assert order.index("step") < [i for i, e in enumerate(r.events) if e.type == "token" and e.index == 7][0]
    assert order[-2:] == ["step", "end"]
    # numbered items too
    s = steps_of(run(["1.", " x", "\n", "2", ".", " y"], steps=DEFAULT_STEP_REGEX))
    assert [x.text for x in s] == ["1. x\n", "2. y"]


@settings(max_examples=80, deadline=None)
@given(parts=st.lists(st.sampled_from(["Step 1: a", "Step 2: bb", "3. c", "x y", "\n", "\n\n", " ", "é", "z"]), min_size=1, max_size=25),
       data=st.data())
def test_steps_cover_the_text_in_order_and_match_whole_text_cuts_for_char_tokens(parts, data):
    text = "".join(parts)
    # any chunking: the steps tile the tokens and the text
    cuts = sorted(set(data.draw(st.lists(st.integers(1, max(1, len(text) - 1)), max_size=10))))
    pieces = [p for p in (text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])) if p]
    s = steps_of(run(pieces, steps=DEFAULT_STEP_REGEX))
    assert "".join(x.text for x in s) == text
    assert [x.start_token for x in s] == [0] + [x.end_token + 1 for x in s[:-1]] and s[-1].end_token == len(pieces) - 1
    # one character per token: every boundary is a token boundary, so the
    # steps are the text cut after each boundary match
    chars = steps_of(run(list(text), steps=DEFAULT_STEP_REGEX))
    want, rest = [], text
    pattern = re.compile(StepSegmenter().step_regex)
    while rest:
        m = next((m for m in pattern.finditer(rest) if m.end() > 0), None)
        if m is None:
            want.append(rest)
            break
        want.append(rest[: m.end()])
        rest = rest[m.end():]
    assert [x.text for x in chars] == want


def test_step_ppl_policy_stops_when_a_surprising_step_ends():
    pieces = ["1.", " ok", "\n", "2.", " ??", " ?!", "\n", "3.", " more", " text"]
    lps = [-0.1, -0.1, -0.1, -3.0, -3.0, -3.0, -3.0, -0.1, -0.1, -0.1]
    r = run(pieces, lps, policies=[parse_policy("step-ppl:threshold=5")])
    policy = [e for e in r.events if e.type == "policy"]
    assert r.end.reason == "policy" and len(policy) == 1
    # step 1 ("2. ?? ?!\n", tokens 3-6) is known to have ended once "3." and the
    # space after it have arrived (token 8): the stop is issued on that token
    assert policy[0].index == 8 and "tokens 3-6" in policy[0].reason and r.end.n_tokens == 9
    noted = run(pieces, lps, policies=[StepPPL(5.0, action="note")])
    assert noted.end.reason == "length" and [e.action for e in noted.events if e.type == "policy"] == ["note"]
    with pytest.raises(Exception, match="threshold"):
        parse_policy("step-ppl:threshold=0.5")


def test_custom_step_regex_and_bad_ones():
    s = steps_of(run(["a", ";", " b", ";", " c"], steps=r";"))
    assert [x.text for x in s] == ["a;", " b;", " c"]
    r = CliRunner().invoke(main, ["generate", "hi", "--step-regex", "("])
    assert r.exit_code == 2 and "not a regular expression" in r.output
    r = CliRunner().invoke(main, ["generate", "hi", "--step-regex", "x*"])
    assert r.exit_code == 2 and "matches the empty text" in r.output


@pytest.mark.model
def test_generate_steps_and_step_policy_live_equal_replay(decoder, tmp_path):
    args = ["generate", "List three facts about the moon, one per line, numbered 1., 2., 3.", "--max-new-tokens", "60",
            "--ignore-eos", "--json", "--steps"]
    full = CliRunner().invoke(main, args)
    assert full.exit_code == 0, full.output
    events = [json.loads(x) for x in full.stdout.splitlines()]
    steps = [e for e in events if e["type"] == "step"]
    tokens = [e for e in events if e["type"] == "token"]
    assert len(steps) >= 2 and "".join(s["text"] for s in steps) == events[-1]["text"]
    for s in steps:
        lps = [t["logprob"] for t in tokens[s["start_token"]: s["end_token"] + 1]]
        assert s["ppl"] == pytest.approx(math.exp(-sum(lps) / len(lps)), rel=1e-9)
    trace = tmp_path / "t.jsonl"
    trace.write_text(full.stdout)
    # a threshold between the steps' PPLs, so some step but not every one trips it
    ppls = sorted(s["ppl"] for s in steps[:-1])
    spec = f"step-ppl:threshold={(ppls[0] + ppls[-1]) / 2!r}"
    replayed = replay_trace(read_traces(trace)[0], [parse_policy(spec)])
    live = CliRunner().invoke(main, args + ["--policy", spec])
    end = json.loads(live.stdout.splitlines()[-1])
    if replayed is None:
        assert end["reason"] == "length"
    else:
        assert end["reason"] == "policy" and end["n_tokens"] == replayed + 1


def test_a_step_regex_that_backtracks_gives_up_in_time():
    import time

    from livepp.core.params import LiveppError
    from livepp.core.steps import MATCH_TIMEOUT_S, StepSegmenter

    segmenter = StepSegmenter("(a{1,5}){1,30}b")
    started = time.perf_counter()
    with pytest.raises(LiveppError, match="backtracks"):
        for i in range(60):
            segmenter.add(i, "a", -1.0, None, None)
    assert time.perf_counter() - started < 20 * MATCH_TIMEOUT_S

"""CAR end to end, replay against live decoding, and the HF adapter, on the real model."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from transformers import StoppingCriteriaList

from livepp import Decoder, EarlyStop, GenerationParams, Monitor, Tracker
from livepp.cli.main import main
from livepp.engines.torch.hf import LiveppStoppingCriteria
from livepp.core.policies import parse_policy
from livepp.core.replay import read_traces, replay_trace

pytestmark = pytest.mark.model


def cli(*args, input=None):
    return CliRunner().invoke(main, list(args), input=input)


def jsonl(text):
    return [json.loads(line) for line in text.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def calibration_file(loaded, tmp_path_factory):
    out = tmp_path_factory.mktemp("cal") / "calib.json"
    r = cli("calibrate", "builtin:mixed", "--limit", "16", "--out", str(out), "--json")
    assert r.exit_code == 0, r.output
    return out, json.loads(r.stdout)


def test_calibrate_writes_calibration_and_report(calibration_file):
    out, data = calibration_file
    assert data["type"] == "calibration" and data["model"] == "SmolLM2-135M-Instruct"
    assert data["space"] in ("ppl", "log_ppl") and data["n_correct"] >= 3 and data["n_incorrect"] >= 3
    saved = json.loads(out.read_text())
    assert saved["threshold"] == 0.5 and saved["mean_correct"] == data["mean_correct"]
    report = out.parent / "calib-report"
    for name in ("reliability.png", "histograms.png", "labelled.jsonl"):
        assert (report / name).stat().st_size > 0
    assert (report / "reliability.png").read_bytes()[:4] == b"\x89PNG"
    labelled = jsonl((report / "labelled.jsonl").read_text())
    assert len(labelled) == 16 and {"question", "reply", "ppl", "correct", "posterior_correct"} <= set(labelled[0])
    # AUROC of PPL as an error predictor, by brute force over every
    # (incorrect, correct) pair: a higher PPL on the wrong answer counts 1, a tie 1/2.
    bad = [a["ppl"] for a in labelled if not a["correct"]]
    good = [a["ppl"] for a in labelled if a["correct"]]
    pairs = [(b > g) + 0.5 * (b == g) for b in bad for g in good]
    assert data["auroc"] == pytest.approx(sum(pairs) / len(pairs), abs=1e-12)
    assert (data["n_correct"], data["n_incorrect"]) == (len(good), len(bad))
    # Each answer's label is the matcher's verdict on its reply.
    from livepp.car.tasks import answer_matches

    assert all(a["correct"] == answer_matches(a["reply"], a["answers"]) for a in labelled)


def _with_threshold(calibration_file, tmp_path, threshold):
    _, data = calibration_file
    path = tmp_path / f"cal-{threshold}.json"
    # The route's mechanics from a start, whichever start (or none: early
    # routing off, tested in test_car_nested.py) 16 answers chose.
    start = {"early_min_tokens": data["early_min_tokens"] or 1}
    path.write_text(json.dumps({k: v for k, v in data.items() if k not in ("type", "files", "routing_curve")} | {"threshold": threshold} | start))
    return path


@pytest.mark.parametrize("early,threshold,expected", [(False, 0.999999, "long"), (False, 1e-6, "short"), (True, 0.999999, "long"), (True, 1e-6, "short")])
def test_route_json_shows_every_stage(calibration_file, tmp_path, early, threshold, expected):
    out = _with_threshold(calibration_file, tmp_path, threshold)
    args = ["route", "What is 47 + 38?", "--calibration", str(out), "--long-max-tokens", "24", "--json"]
    r = cli(*args, *(["--early"] if early else []))
    assert r.exit_code == 0, r.output
    events = jsonl(r.stdout)
    short = [e for e in events if e.get("stage") == "short"]
    assert short[0]["type"] == "start" and short[-1]["type"] == "end"
    decision = next(e for e in events if e["type"] == "route")
    assert set(decision) >= {"ppl", "posterior_correct", "threshold", "decision", "early"}
    assert decision["ppl"] == pytest.approx(short[-1]["ppl"])
    # A threshold no posterior reaches routes every answer; one every posterior
    # passes keeps it; with --early the route comes at the first prefix length
    # that has a model, from the file's early_min_tokens on, unfinished.
    assert decision["decision"] == expected and decision["threshold"] == threshold
    assert decision["early"] == (early and expected == "long")
    if decision["early"]:
        cal = json.loads(out.read_text())
        # (past the longest prefix model, the longest one judges every later token)
        first = min((m["tokens"] for m in cal["prefix_models"] if m["tokens"] >= cal["early_min_tokens"]), default=cal["early_min_tokens"])
        assert short[-1]["reason"] == "policy" and short[-1]["n_tokens"] == first
    answer = events[-1]
    assert answer["type"] == "answer"
    assert answer["tokens_short"] == short[-1]["n_tokens"]
    long = [e for e in events if e.get("stage") == "long"]
    if decision["decision"] == "long":
        assert long[0]["type"] == "start" and long[-1]["type"] == "end"
        assert answer["answer_from"] == "long" and answer["tokens_long"] == long[-1]["n_tokens"] > 0
        if decision["early"]:
            assert short[-1]["reason"] == "policy"
    else:
        assert long == [] and answer["tokens_long"] == 0 and answer["text"] == short[-1]["text"]
    assert answer["tokens_total"] == answer["tokens_short"] + answer["tokens_long"]


def test_route_forced_both_ways(calibration_file, tmp_path):
    _, data = calibration_file
    base = {k: v for k, v in data.items() if k not in ("type", "files")}
    always = tmp_path / "always.json"
    always.write_text(json.dumps(base | {"threshold": 0.999999}))
    r = cli("route", "What is 2 + 2?", "--calibration", str(always), "--long-max-tokens", "8", "--json")
    assert r.exit_code == 0, r.output
    assert next(e for e in jsonl(r.stdout) if e["type"] == "route")["decision"] == "long"
    never = tmp_path / "never.json"
    never.write_text(json.dumps(base | {"threshold": 1e-9}))
    r = cli("route", "What is 2 + 2?", "--calibration", str(never), "--json")
    assert next(e for e in jsonl(r.stdout) if e["type"] == "route")["decision"] == "short"


def test_route_bad_input(calibration_file, tmp_path):
    out, data = calibration_file
    assert "the question is empty" in cli("route", "  ", "--calibration", str(out)).stderr
    bad = tmp_path / "bad.json"
    bad.write_text("{oops")
    r = cli("route", "What is 2+2?", "--calibration", str(bad))
    assert r.exit_code == 2 and "not valid JSON" in r.stderr
    other = tmp_path / "other.json"
    other.write_text(json.dumps({k: v for k, v in data.items() if k not in ("type", "files")} | {"model": "gpt-9"}))
    r = cli("route", "What is 2+2?", "--calibration", str(other), "--long-max-tokens", "4")
    assert r.exit_code == 0 and "fitted for 'gpt-9'" in r.stderr


def test_route_with_shipped_calibration_in_terminal(loaded):
    r = cli("route", "What is the capital of France?", "--long-max-tokens", "16")
    assert r.exit_code == 0, r.output
    assert "decision: PPL" in r.output and "answer (" in r.output


def median_window_ppl(events):
    """A threshold that the window PPL of this trace crosses part-way through."""
    values = sorted(e["window_ppl"] for e in events if e["type"] == "token" and e["index"] >= 3)
    return values[len(values) // 2]


def test_replay_stops_where_live_decoding_stops(decoder, tmp_path):
    trace = tmp_path / "t.jsonl"
    r = cli("generate", "Write a poem about rain.", "--max-new-tokens", "40", "--ignore-eos", "--json")
    assert r.exit_code == 0, r.output
    trace.write_text(r.stdout)
    spec = f"early-stop:threshold={median_window_ppl(jsonl(r.stdout))!r},metric=window_ppl,min_tokens=4"
    replayed = replay_trace(read_traces(trace)[0], [parse_policy(spec)])
    prompt_ids = decoder.encode("Write a poem about rain.")
    live = Monitor(policies=[parse_policy(spec)], tracker_factory=Tracker).run(
        decoder.stream(prompt_ids, GenerationParams(max_new_tokens=40, ignore_eos=True)))
    assert live.end.reason == "policy", "choose a threshold that fires on this text"
    assert replayed == live.end.n_tokens - 1
    # and through the CLI, with labels
    labelled = tmp_path / "l.jsonl"
    labelled.write_text(r.stdout + json.dumps({"type": "label", "correct": False}) + "\n")
    out = cli("replay", str(labelled), "--policy", spec, "--policy", "spike:z=2", "--json")
    assert out.exit_code == 0, out.output
    reports = jsonl(out.stdout)
    assert reports[0]["fired_at"] == [replayed]
    assert reports[0]["tokens_saved"] == 40 - (replayed + 1)
    assert reports[0]["incorrect_stopped"] == 1 and reports[1]["fired"] == 0  # notes never stop


def test_replay_bad_input(tmp_path):
    f = tmp_path / "x.jsonl"
    f.write_text('{"type": "token", "token_id": 1, "logprob": -1}\n')
    r = cli("replay", str(f), "--policy", "spike")
    assert r.exit_code == 2 and "token event before any start" in r.stderr
    r = cli("replay", str(f), "--policy", "bogus:x=1")
    assert r.exit_code == 2 and "unknown policy" in r.stderr


def test_hf_stopping_criteria_stops_where_livepp_stops(decoder):
    prompt_ids = decoder.encode("Write a poem about rain.")
    params = GenerationParams(max_new_tokens=40, ignore_eos=True)
    full = Monitor().run(decoder.stream(prompt_ids, params))
    threshold = median_window_ppl([{"type": "token", "index": e.index, "window_ppl": e.window_ppl} for e in full.tokens])
    policy = lambda: [EarlyStop(threshold, metric="window_ppl", min_tokens=4)]
    live = Monitor(policies=policy(), tracker_factory=Tracker).run(
        decoder.stream(prompt_ids, GenerationParams(max_new_tokens=40, ignore_eos=True)))
    assert live.end.reason == "policy"
    with LiveppStoppingCriteria(decoder.model, policies=policy) as stop:
        out = decoder.model.generate(
            torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
            do_sample=False, max_new_tokens=40, min_new_tokens=40, stopping_criteria=StoppingCriteriaList([stop]))
    generated = out[0, len(prompt_ids):].tolist()
    assert len(generated) == live.end.n_tokens
    assert generated == live.token_ids
    assert [(row, index) for row, index, _ in stop.decisions] == [(0, live.end.n_tokens - 1)]
    assert stop.ppl[0] == pytest.approx(live.end.ppl, rel=1e-5)


def test_route_long_stage_on_a_remote_engine(calibration_file, tmp_path):
    from test_remote_parsing import Stub, expected_from_sse, fixture

    _, data = calibration_file
    always = tmp_path / "always.json"
    always.write_text(json.dumps({k: v for k, v in data.items() if k not in ("type", "files")} | {"threshold": 0.999999}))
    body = fixture("chat_stream.sse")
    stub = Stub(body)
    try:
        r = cli("route", "What is 2 + 2?", "--calibration", str(always), "--long-remote", stub.url, "--long-remote-model", "smollm2", "--json")
    finally:
        stub.close()
    assert r.exit_code == 0, r.output
    events = jsonl(r.stdout)
    long = [e for e in events if e.get("stage") == "long"]
    assert long[0]["model"] == "smollm2"
    assert [e["logprob"] for e in long if e["type"] == "token"] == expected_from_sse(body, "chat")[0]
    assert events[-1]["answer_from"] == "long" and events[-1]["text"] == expected_from_sse(body, "chat")[1]
    assert "step by step" in stub.requests[0]["messages"][0]["content"]


def test_route_task_uses_that_tasks_shipped_calibration():
    from livepp.car.calibration import Calibration, shipped_calibration

    r = cli("route", "What is 2 + 3?", "--task", "nope")
    assert r.exit_code == 2 and "no shipped calibration for task 'nope'" in r.stderr
    r = cli("route", "What is 2 + 3?", "--task", "sums", "--long-max-tokens", "8", "--json")
    assert r.exit_code == 0, r.output
    decision = next(e for e in jsonl(r.stdout) if e["type"] == "route")
    sums, mixed = Calibration.load(shipped_calibration("sums")), Calibration.load(shipped_calibration())
    assert decision["posterior_correct"] == pytest.approx(sums.posterior_correct(decision["ppl"]))
    assert sums.posterior_correct(decision["ppl"]) != pytest.approx(mixed.posterior_correct(decision["ppl"]))


def test_route_long_stage_by_deepconf(calibration_file, tmp_path):
    out = _with_threshold(calibration_file, tmp_path, 0.999999)  # always routes
    r = cli("route", "What is 2 + 3?", "--calibration", str(out), "--long-route", "deepconf", "--long-max-tokens", "8", "--json")
    assert r.exit_code == 0, r.output
    events = jsonl(r.stdout)
    long = [e for e in events if e.get("stage") == "long"]
    assert sorted({e["sample"] for e in long}) == list(range(8))  # 8 traces, tagged
    answer = events[-1]
    assert answer["answer_from"] == "long"
    assert answer["tokens_long"] == sum(e["n_tokens"] for e in long if e["type"] == "end")

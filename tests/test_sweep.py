"""Curves to choose thresholds from: ``replay --sweep`` and ``think
--sweep-eta``. Every point of a sweep equals running the command once with
that value; the Pareto front is checked by brute force."""

from __future__ import annotations

import io
import json

import pytest
from click.testing import CliRunner

from livepp.cli.main import main
from livepp.core.events import TokenRecord
from livepp.core.monitor import Monitor
from livepp.core.sinks import JsonlSink
from livepp.core.stream import RecordStream
from livepp.core.sweep import pareto_front, parse_range, parse_sweep
from livepp.core.params import LiveppError
from scripted_engine import ScriptedEngine


def jsonl(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def run(*args: str, engine=None):
    out = CliRunner().invoke(main, list(args), obj={"engine": engine} if engine else None)
    assert out.exit_code == 0, out.output
    return out


@pytest.fixture
def traces_file(tmp_path):
    """Ten labelled traces of 30 tokens: the wrong ones get surprising later."""
    buf = io.StringIO()
    for k in range(10):
        correct = k % 3 != 0
        lps = [-0.3 - 0.05 * (k % 4)] * 10 + [(-0.4 if correct else -1.6 - 0.1 * k)] * 20
        records = [TokenRecord(i, f"t{i} ", lp, confidence=-lp) for i, lp in enumerate(lps)]
        Monitor(sinks=[JsonlSink(buf)]).run(RecordStream(records))
        buf.write(json.dumps({"type": "label", "correct": correct}) + "\n")
    path = tmp_path / "traces.jsonl"
    path.write_text(buf.getvalue())
    return path


def test_parse_range_and_sweep_specs():
    assert parse_range("1.5..6:0.25") == [1.5 + 0.25 * i for i in range(19)]
    assert parse_range("2..3:0.4") == [2.0, 2.4, 2.8]
    s = parse_sweep("early-stop:threshold=1.5..2:0.5,min_tokens=16")
    assert (s.key, s.values, s.spec(2.0)) == ("threshold", [1.5, 2.0], "early-stop:threshold=2,min_tokens=16")
    for bad in ("early-stop:threshold=3", "early-stop:threshold=1..2:0.5,patience=1..2:1", "early-stop:threshold=6..1:1",
                "early-stop:threshold=1..2:0", "nope:threshold=1..2:1", "early-stop:threshold=0.5..2:0.5"):
        with pytest.raises(LiveppError):
            parse_sweep(bad)


def test_pareto_front_by_brute_force():
    points = [(1, 5), (2, 4), (2, 5), (0, 9), (3, 1), (3, 1)]
    assert pareto_front(points) == [False, False, True, True, True, True]


def test_every_point_of_a_replay_sweep_equals_replay_with_that_value(traces_file, tmp_path):
    png = tmp_path / "sweep.png"
    out = run("replay", str(traces_file), "--sweep", "early-stop:threshold=1.5..4.5:0.5,metric=window_ppl,min_tokens=4",
              "--plot", str(png), "--json")
    lines = jsonl(out.stdout)
    points, last = lines[:-1], lines[-1]
    assert last == {"type": "sweep", "sweep": "early-stop:threshold=1.5..4.5:0.5,metric=window_ppl,min_tokens=4", "plot": str(png)}
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"
    assert [p["threshold"] for p in points] == [1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5]
    for p in points:
        spec = f"early-stop:threshold={p['threshold']:g},metric=window_ppl,min_tokens=4"
        once = jsonl(run("replay", str(traces_file), "--policy", spec, "--json").stdout)[0]
        assert {k: v for k, v in p.items() if k not in ("type", "sweep", "threshold", "pareto")} == {k: v for k, v in once.items() if k != "type"}
    pairs = [(p["tokens_saved"], p["correct_kept"]) for p in points]
    assert [p["pareto"] for p in points] == pareto_front(pairs)
    assert any(p["incorrect_stopped"] for p in points) and any(p["pareto"] for p in points)


def test_replay_sweep_prints_a_table_and_writes_the_png_beside_the_traces(traces_file):
    out = run("replay", str(traces_file), "--sweep", "confidence-stop:threshold=0.5..1.5:0.5,min_tokens=4")
    assert "threshold" in out.stdout and "right kept" in out.stdout and "wrong stopped" in out.stdout
    assert (traces_file.parent / "traces-sweep.png").is_file()


# ---- think --sweep-eta -----------------------------------------------------------------

Q = "What is 7 + 8?"


def trace(answer: str, confs) -> list[tuple[str, float]]:
    return [("w ", -c) for c in confs[:-1]] + [(f" {answer}", -c) for c in confs[-1:]]


SCRIPTS = [trace("15", [5.0] * 20), trace("15", [4.0] * 20), trace("13", [3.0] * 20), trace("15", [6.0] * 6 + [2.0] * 14),
           trace("13", [4.5] * 20), trace("15", [5.5] * 20), trace("13", [2.0] * 4), trace("15", [3.5] * 20)]
COMMON = ["--traces", "8", "--group", "4", "--max-new-tokens", "64", "--prompt", "{question}"]


def test_every_point_of_an_eta_sweep_equals_think_online_and_offline_with_that_eta(tmp_path):
    engine = ScriptedEngine({Q: SCRIPTS})
    recording = tmp_path / "run.jsonl"
    recording.write_text(run("think", Q, "--mode", "offline", "--answer", "15", "--json", *COMMON, engine=engine).stdout)
    png = tmp_path / "eta.png"
    out = run("think", "--sweep-eta", "10..90:20", "--recorded", str(recording), "--warmup", "3", "--plot", str(png), "--json")
    points = jsonl(out.stdout)[:-1]
    assert [p["eta"] for p in points] == [10, 30, 50, 70, 90] and png.read_bytes()[:4] == b"\x89PNG"
    for p in points:
        eta = f"{p['eta']:g}"
        online = jsonl(run("think", Q, "--eta", eta, "--warmup", "3", "--answer", "15", "--json", *COMMON, engine=ScriptedEngine({Q: SCRIPTS})).stdout)[-1]
        offline = jsonl(run("think", Q, "--mode", "offline", "--eta", eta, "--answer", "15", "--json", *COMMON,
                            engine=ScriptedEngine({Q: SCRIPTS})).stdout)[-1]
        assert p["online_tokens"] == online["tokens"] and p["stopped"] == len(online["stopped_early"])
        assert p["excluded"] == len(online["excluded"])
        assert p["online_right"] == int(online["right"]) and p["offline_right"] == int(offline["right"])
        assert p["all_tokens"] == offline["tokens"] == sum(len(s) for s in SCRIPTS)
        assert p["majority_right"] == int(offline["majority"] == "15")
    assert any(p["stopped"] for p in points) and len({p["online_tokens"] for p in points}) > 1


def test_eta_sweep_decodes_once_when_given_a_question(tmp_path):
    engine = ScriptedEngine({Q: SCRIPTS})
    out = run("think", Q, "--sweep-eta", "50..90:40", "--warmup", "3", "--answer", "15", "--plot", str(tmp_path / "e.png"), *COMMON,
              engine=engine)
    assert len(engine.opened) == 8  # one offline run, every trace to its end
    assert "online right" in out.stdout and "pareto" in out.stdout and (tmp_path / "e.png").is_file()


def test_a_sweep_refuses_a_recording_with_stopped_traces(tmp_path):
    engine = ScriptedEngine({Q: SCRIPTS})
    recording = tmp_path / "online.jsonl"
    recording.write_text(run("think", Q, "--warmup", "3", "--eta", "10", "--json", *COMMON, engine=engine).stdout)
    out = CliRunner().invoke(main, ["think", "--sweep-eta", "10..90:40", "--recorded", str(recording)])
    assert out.exit_code == 2 and "--mode offline" in out.output


# ---- calibrate: the routing curve ----------------------------------------------------------

def test_calibrate_draws_the_routing_curve_on_held_out_answers_with_the_measured_long_route(tmp_path):
    """30 questions on a scripted engine: short answers right (sure) or wrong
    (unsure), with some overlap; the long route right on every third. The
    curve in the JSON equals, at every threshold, the counts from the
    held-out posteriors written in labelled.jsonl."""
    import random

    from livepp.car.heldout import heldout_report
    from livepp.car.routing import LONG_PROMPT, SHORT_PROMPT

    rng = random.Random(5)
    scripts, questions = {}, []
    for k in range(30):
        q = f"What is {k} + 1?"
        right = rng.random() < 0.55
        lp = -(0.15 if right else 0.7) - rng.uniform(0, 0.5)
        scripts[SHORT_PROMPT.format(question=q)] = [(" The answer", lp), (f" is {k + 1 if right else k + 2}.", lp)]
        scripts[LONG_PROMPT.format(question=q)] = [("Step 1: add.", -0.2), (f"\nSo {k + 1 if k % 3 == 0 else k}.", -0.3)]
        questions.append({"question": q, "answers": [str(k + 1)]})
    data = tmp_path / "q.jsonl"
    data.write_text("".join(json.dumps(q) + "\n" for q in questions))
    engine = ScriptedEngine(scripts)
    out = run("calibrate", str(data), "--out", str(tmp_path / "cal.json"), "--measure-long", "--long-max-tokens", "16", "--json", engine=engine)
    result = json.loads(out.stdout)
    report = tmp_path / "cal-report"
    assert str(report / "routing.png") in result["files"] and (report / "routing.png").read_bytes()[:4] == b"\x89PNG"
    rows = jsonl((report / "labelled.jsonl").read_text())
    held = [r["heldout_posterior_correct"] for r in rows]
    assert held == pytest.approx(heldout_report([r["ppl"] for r in rows], [r["correct"] for r in rows])["cv_posteriors_scaled"])
    assert [r["long_correct"] for r in rows] == [k % 3 == 0 for k in range(30)]
    curve = result["routing_curve"]
    assert [c["threshold"] for c in curve] == pytest.approx([k / 20 for k in range(21)])
    for c in curve:
        routed = [p < c["threshold"] for p in held]
        assert c["fraction_routed"] == pytest.approx(sum(routed) / 30)
        assert c["accuracy_car_perfect_long"] == pytest.approx(sum(r["correct"] or x for r, x in zip(rows, routed)) / 30)
        assert c["accuracy_car_measured_long"] == pytest.approx(sum(r["long_correct"] if x else r["correct"] for r, x in zip(rows, routed)) / 30)
        assert c["accuracy_long_only"] == pytest.approx(10 / 30)
    routed = [c["fraction_routed"] for c in curve]
    assert routed[0] == 0 and routed == sorted(routed) and routed[-1] > 0.5
    table = run("calibrate", str(data), "--out", str(tmp_path / "cal2.json"), "--measure-long", "--long-max-tokens", "16", engine=ScriptedEngine(scripts))
    assert "held-out routing curve" in table.stdout and "best threshold" in table.stdout

"""The engine protocol: the API, routing, DeepConf, the server and the CLI
run on a scripted engine without touching torch.

Every test here (except the last two) also runs in a fresh interpreter where
importing torch or transformers raises (``test_the_scripted_tests_pass_with_torch_forbidden``),
so "without touching torch" is checked, not assumed.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from websockets.sync.client import connect

from livepp.api import generate, generate_many
from livepp.car.calibration import fit_calibration
from livepp.car.deepconf import think
from livepp.car.routing import LONG_PROMPT, SHORT_PROMPT, StepByStep, Vote, route
from livepp.cli.main import main
from livepp.core.params import GenerationParams
from livepp.core.policies import EarlyStop
from scripted_engine import ScriptedEngine
from test_server import RunningServer, events_until_end, send

SURE = [(" 4", -0.05), (".", -0.1)]
UNSURE = [(" maybe", -2.5), (" 7", -3.0), ("?", -2.0)]
LONG = [(" 3", -0.3), (" plus", -0.2), (" 4", -0.1), (" is", -0.1), (" 7", -0.2)]


def ppl(script):
    return math.exp(-sum(lp for _, lp in script) / len(script))


def engine(**kw) -> ScriptedEngine:
    return ScriptedEngine({
        SHORT_PROMPT.format(question="What is 2+2?"): SURE,
        SHORT_PROMPT.format(question="What is 3+4?"): UNSURE,
        LONG_PROMPT.format(question="What is 3+4?"): LONG,
        "vote me": [[(" 5", -0.4)], [(" 6", -0.9)], [(" 5", -0.5)]],
        SHORT_PROMPT.format(question="Vote?"): [[(" 5", -0.4)], [(" 6", -0.9)], [(" 5", -0.5)]],
    }, default=[(" a", -1.0)] * 40, **kw)


def calibration():
    # PPL near 1 is right, PPL near 10 is wrong: routes what SURE keeps and UNSURE has.
    ppls = [1.05, 1.1, 1.2, 1.3, 1.5, 6.0, 8.0, 10.0, 12.0, 15.0]
    return fit_calibration(ppls, [True] * 5 + [False] * 5, model="scripted", threshold=0.5)


def test_generate_on_a_scripted_engine_gives_the_scripted_numbers():
    e = engine()
    r = generate(SHORT_PROMPT.format(question="What is 3+4?"), model=e)
    assert [t.logprob for t in r.tokens] == [lp for _, lp in UNSURE]
    assert r.end.ppl == pytest.approx(ppl(UNSURE), rel=1e-12)
    assert r.end.reason == "eos" and r.text == " maybe 7?"
    assert r.events[0].model == "scripted" and r.events[0].prompt_token_ids == e.streams[0].prompt_token_ids


def test_a_policy_stop_closes_the_stream_and_nothing_more_is_produced():
    e = engine()
    r = generate("anything", model=e, params=GenerationParams(max_new_tokens=40),
                 policies=[EarlyStop(1.5, metric="ppl", min_tokens=3)])
    assert r.end.reason == "policy" and r.end.n_tokens == 3
    assert e.produced == 3 and e.streams[0].closed


def test_chat_messages_are_a_prompt():
    e = engine()
    r = generate([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "vote me"}], model=e,
                 params=GenerationParams(temperature=0.7, seed=1))
    assert r.text == " 6"


def test_route_keeps_a_sure_answer_and_routes_an_unsure_one():
    e = engine()
    kept = route("What is 2+2?", engine=e, calibration=calibration())
    assert not kept.routed and kept.ppl == pytest.approx(ppl(SURE))
    routed = route("What is 3+4?", engine=e, calibration=calibration(), long_route=StepByStep(e))
    assert routed.routed and routed.ppl == pytest.approx(ppl(UNSURE))
    assert routed.long.text == "".join(t for t, _ in LONG) and routed.long.n_tokens == len(LONG)


def test_vote_and_generate_many_run_on_an_engine_without_batching():
    e = engine()
    results = generate_many(["vote me"], n=3, model=e, params=GenerationParams(temperature=0.7, seed=0))
    assert [r.text for r in results] == [" 5", " 6", " 5"]
    assert [p.seed for _, p in e.opened] == [0, 1, 2]
    answer = Vote(e, n=3, seed=0).run("Vote?", [])
    assert answer.text == " 5" and answer.detail["votes"] == 2 and answer.n_tokens == 3


def test_think_runs_deepconf_on_a_scripted_engine():
    e = ScriptedEngine({"Q": [[(" 5", -0.1)] * 4, [(" 6", -3.0)] * 4, [(" 5", -0.2)] * 4, [(" 6", -2.5)] * 4]})
    result = think("Q", engine=e, traces=4, mode="offline", eta=50, group=2, params=GenerationParams(temperature=0.7, seed=0, max_new_tokens=8))
    # Confidence here is −logprob per token; the scripted top-1 list makes a
    # trace's group confidence its −logprob, so the confident traces say 6.
    assert result.answer == "6"
    assert sorted(result.kept) == [1, 3]


def test_the_server_streams_and_routes_on_a_scripted_engine():
    e = engine()
    s = RunningServer(e)
    try:
        with connect(s.url) as ws:
            send(ws, type="generate", id="g", prompt=SHORT_PROMPT.format(question="What is 3+4?"), params={"max_new_tokens": 8})
            got = events_until_end(ws, "g", timeout=30)
            assert [x["logprob"] for x in got if x["type"] == "token"] == [lp for _, lp in UNSURE]
            assert got[-1]["type"] == "end" and got[-1]["ppl"] == pytest.approx(ppl(UNSURE))
            # route used to be refused on anything but a local model
            send(ws, type="route", id="r", question="What is 2+2?")
            out = []
            while not out or out[-1]["type"] not in ("answer", "error"):
                x = json.loads(ws.recv(timeout=30))
                if x.get("id") == "r":
                    out.append(x)
            assert out[-1]["type"] == "answer", out[-1]
            decision = next(x for x in out if x["type"] == "route")
            assert decision["ppl"] == pytest.approx(ppl(SURE))
    finally:
        s.stop()


def test_the_cli_runs_on_an_engine_given_by_the_embedding_application():
    e = engine()
    r = CliRunner().invoke(main, ["generate", SHORT_PROMPT.format(question="What is 3+4?"), "--json"], obj={"engine": e})
    assert r.exit_code == 0, r.output
    events = [json.loads(x) for x in r.stdout.splitlines()]
    assert [x["logprob"] for x in events if x["type"] == "token"] == [lp for _, lp in UNSURE]
    assert events[0]["model"] == "scripted" and events[-1]["reason"] == "eos"

    r = CliRunner().invoke(main, ["generate", "vote me", "-n", "3", "--temperature", "0.7", "--seed", "0", "--json"], obj={"engine": engine()})
    assert r.exit_code == 0, r.output
    ends = {x["sample"]: x["text"] for x in map(json.loads, r.stdout.splitlines()) if x["type"] == "end"}
    assert ends == {0: " 5", 1: " 6", 2: " 5"}


def test_the_route_command_runs_on_an_engine_given_by_the_embedding_application(tmp_path):
    cal = tmp_path / "cal.json"
    calibration().save(cal)
    r = CliRunner().invoke(main, ["route", "What is 3+4?", "--calibration", str(cal), "--json"], obj={"engine": engine()})
    assert r.exit_code == 0, r.output
    lines = [json.loads(x) for x in r.stdout.splitlines()]
    answer = lines[-1]
    assert answer["type"] == "answer" and answer["answer_from"] == "long"
    assert answer["text"] == "".join(t for t, _ in LONG)


def test_the_scripted_tests_pass_with_torch_forbidden():
    """Run every test above in a fresh interpreter where importing torch fails."""
    here = Path(__file__)
    env = dict(os.environ, LIVEPP_FORBID_TORCH="1")
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(here),
                          "-k", "not torch_forbidden and not core_imports"], capture_output=True, text=True, env=env,
                         cwd=here.parent.parent, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    n = sum(1 for name in globals() if name.startswith("test_")) - 2
    assert f"{n} passed" in out.stdout, out.stdout[-500:]


def test_core_imports_without_torch():
    """Every module of the core, the engine protocol, the remote engine, the
    API, CAR, the service and the CLI import without torch or transformers."""
    import livepp.core

    code = """
import importlib, pkgutil, sys
import livepp.core
mods = ['livepp.core.' + m.name for m in pkgutil.iter_modules(livepp.core.__path__)]
mods += ['livepp.engines.protocol', 'livepp.engines.remote', 'livepp.engines.detokenize', 'livepp.api',
         'livepp.car.calibration', 'livepp.car.heldout', 'livepp.car.tasks', 'livepp.car.routing', 'livepp.car.deepconf',
         'livepp.car.calibrate', 'livepp.serve.app', 'livepp.serve.jobs', 'livepp.serve.outbox', 'livepp.cli.main']
for m in mods:
    importlib.import_module(m)
print(len(mods), 'torch' in sys.modules, 'transformers' in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    n_core = len(list(Path(livepp.core.__path__[0]).glob("[a-z]*.py")))
    assert out.stdout.split() == [str(n_core + 14), "False", "False"]

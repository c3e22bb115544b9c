"""The README's "What works where" table, checked: every Y cell is run on
its engine, so a feature refused (or broken) where the table says it works
fails here. Real engines: the embedded model on torch (single, batch, the
continuous batch), on llama.cpp, a livepp server as a remote engine, and a
livepp gateway in front of it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from websockets.sync.client import connect

from livepp.core.batch_monitor import MonitoredBatch
from livepp.core.events import to_json_dict
from livepp.core.monitor import Monitor
from livepp.core.params import GenerationParams
from livepp.core.policies import parse_policy
from livepp.core.steps import DEFAULT_STEP_REGEX

pytestmark = pytest.mark.model

README = Path(__file__).resolve().parent.parent / "README.md"
COLUMNS = ["torch single", "torch batch", "continuous batch", "llama.cpp", "remote", "gateway"]
PROMPT, QUESTION = "Tell me about owls.", "What is 2 + 3?"
TEXT = "Owls hunt at night. They hear very well, and fly without a sound."


def table_rows() -> list[list[str]]:
    lines = README.read_text().split("<!-- feature-table -->", 1)[1].strip().splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header[1:] == COLUMNS
    rows = []
    for line in lines[2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


def table() -> list[tuple[str, str]]:
    return [(row[0], column) for row in table_rows() for column, cell in zip(COLUMNS, row[1:]) if cell.startswith("Y")]


POLICIES = {  # a row of the table: (the policy spec, what shows it acted, or None: it ran)
    "`early-stop` (stop)": ("early-stop:threshold=1.0001,metric=ppl,min_tokens=2", lambda ev: ev[-1]["reason"] == "policy"),
    "`spike` (note)": ("spike:z=0.01,min_tokens=2", None),
    "`confidence-stop`": ("confidence-stop:threshold=1000,min_tokens=2", lambda ev: ev[-1]["reason"] == "policy"),
    "`varentropy-stop`": ("varentropy-stop:threshold=1e-9", lambda ev: ev[-1]["reason"] == "policy"),
    "`step-ppl`, `--steps`": ("step-ppl:threshold=1.0001,action=note", lambda ev: any(e["type"] == "step" for e in ev)),
    "`inject`": ("inject:when=ppl>1.0001,min_tokens=2,text= Wait,", lambda ev: any(e.get("injected") for e in ev if e["type"] == "token")),
}


@pytest.fixture(scope="module")
def engines(decoder):
    from livepp.engines.llamacpp import LlamaCppEngine
    from livepp.engines.remote import OpenAIEngine
    from livepp.engines.scheduler import Scheduler
    from livepp.engines.torch.engine import TorchEngine
    from test_server import RunningServer

    torch_engine = TorchEngine(decoder)
    llama = LlamaCppEngine()
    upstream = RunningServer(decoder, max_batch=4)
    remote = OpenAIEngine(f"http://127.0.0.1:{upstream.port}/v1", decoder.loaded.name)
    gateway = RunningServer(remote)
    scheduler = Scheduler(TorchEngine(decoder), max_batch=4, gather_s=0)
    yield {"torch": torch_engine, "llama": llama, "remote": remote, "scheduler": scheduler, "gateway": gateway, "upstream": upstream}
    scheduler.close()
    gateway.stop()
    upstream.stop()
    llama.close()


def monitored(engine, spec: str, *, batch: bool = False) -> list[dict]:
    params = GenerationParams(max_new_tokens=8, ignore_eos=True)
    if batch:
        rows = MonitoredBatch(engine.open_batch([PROMPT, QUESTION], [params] * 2), [params] * 2, model=engine.name,
                              policies=lambda i: [parse_policy(spec)], steps=DEFAULT_STEP_REGEX)
        return [to_json_dict(e) for i, e in rows if i == 0]
    result = Monitor(policies=[parse_policy(spec)], steps=DEFAULT_STEP_REGEX).run(engine.open(PROMPT, params))
    return [to_json_dict(e) for e in result.events]


def over_websocket(server, message: dict, last: str) -> list[dict]:
    with connect(server.url) as ws:
        ws.send(json.dumps(message | {"id": "x"}))
        events = []
        while not events or events[-1]["type"] not in (last, "error"):
            events.append(json.loads(ws.recv(timeout=300)))
    assert events[-1]["type"] == last, events[-1]
    return events


def run_policy(feature: str, column: str, engines: dict) -> None:
    spec, acted = POLICIES[feature]
    if column == "gateway":
        events = over_websocket(engines["gateway"], {"type": "generate", "prompt": PROMPT, "policies": [spec], "steps": True,
                                                     "params": {"max_new_tokens": 8, "ignore_eos": True}}, "end")
    else:
        engine = {"torch single": "torch", "torch batch": "torch", "continuous batch": "scheduler", "llama.cpp": "llama",
                  "remote": "remote"}[column]
        events = monitored(engines[engine], spec, batch=column == "torch batch")
    assert events[-1]["type"] == "end" and events[-1]["reason"] != "error"
    if acted is not None:
        assert acted(events), (feature, column)


def run_think(column: str, engines: dict) -> None:
    from livepp.car.deepconf import think

    if column == "gateway":
        vote = over_websocket(engines["gateway"], {"type": "think", "question": QUESTION, "params": {
            "traces": 2, "mode": "offline", "group": 2, "max_new_tokens": 4}}, "vote")[-1]
        assert vote["traces"] == 2
        return
    engine = {"torch batch": "torch", "continuous batch": "scheduler", "llama.cpp": "llama", "remote": "remote"}[column]
    result = think(QUESTION, engine=engines[engine], traces=2, mode="offline", group=2,
                   params=GenerationParams(max_new_tokens=4, temperature=0.8, seed=0))
    assert len(result.traces) == 2 and all(t.n_tokens == 4 or t.reason == "eos" for t in result.traces)


def run_route(column: str, engines: dict) -> None:
    from livepp.car.calibration import Calibration, shipped_calibration
    from livepp.car.routing import StepByStep, Vote, route

    if column == "gateway":
        events = over_websocket(engines["gateway"], {"type": "route", "question": QUESTION, "params": {
            "short_max_tokens": 4, "long_max_tokens": 4}}, "answer")
        assert events[-1]["text"] is not None
        return
    engine = engines[{"torch single": "torch", "torch batch": "torch", "continuous batch": "scheduler", "llama.cpp": "llama",
                      "remote": "remote"}[column]]
    long_route = Vote(engine, n=2, max_new_tokens=4) if column == "torch batch" else StepByStep(engine, max_new_tokens=4)
    outcome = route(QUESTION, engine=engine, calibration=Calibration.load(shipped_calibration()), long_route=long_route,
                    short_max_new_tokens=4)
    assert outcome.answer is not None


def run_watch(column: str, engines: dict, loaded) -> None:
    from livepp.engines.feeding import ScheduledScorer
    from livepp.engines.scheduler import Scheduler
    from livepp.engines.torch.proxy import ProxyStream

    params = GenerationParams(top_logprobs=0)
    want = [r.logprob for r in ProxyStream(loaded, [TEXT], params, prompt=PROMPT)]
    if column == "torch single":
        return
    if column == "continuous batch":
        scheduler, owned = engines["scheduler"], None
    else:  # llama.cpp: fed rows of a scheduler on its own engine
        from livepp.engines.llamacpp import LlamaCppEngine

        owned = LlamaCppEngine()
        scheduler = Scheduler(owned, max_batch=2, gather_s=0)
    try:
        got = [r.logprob for r in ProxyStream(scheduler.text, [TEXT], params, prompt=PROMPT, scorer=ScheduledScorer(scheduler, params),
                                              tokenizer=scheduler.encoder.locked())]
    finally:
        if owned is not None:
            scheduler.close()
            owned.close()
    assert len(got) == len(want)
    if column == "continuous batch":
        assert max(abs(a - b) for a, b in zip(got, want)) <= 1e-4


def run_scoring(column: str, engines: dict, loaded) -> None:
    from livepp.engines.protocol import ScoreSpec
    from livepp.scoring.remote import RemoteScorer
    from livepp.scoring.teacher_forced import score_text

    want = score_text(loaded, TEXT)
    if column == "torch single":
        got = [t.logprob for t in want.tokens]
    elif column == "torch batch":
        got = [t.logprob for t in score_text(loaded, TEXT, max_length=8, stride=4, batch_size=2).tokens]
        assert len(got) == want.n_tokens
        return
    elif column == "continuous batch":
        scores: list = []
        stream = engines["scheduler"].open(loaded.tokenizer(TEXT)["input_ids"], GenerationParams(max_new_tokens=1),
                                           score=ScoreSpec(generate=False), on_scores=lambda row, s: scores.extend(s))
        list(stream)
        got = [s.logprob for s in scores]
    elif column == "llama.cpp":
        got = [t.logprob for t in score_text(engines["llama"], TEXT).tokens]
        assert len(got) == want.n_tokens
        return
    else:
        port = (engines["upstream"] if column == "remote" else engines["gateway"]).port
        got = [t.logprob for t in RemoteScorer(f"http://127.0.0.1:{port}/v1", loaded.name).score_text(TEXT).tokens]
    assert max(abs(a - b.logprob) for a, b in zip(got, want.tokens, strict=True)) <= 1e-4


def run_exact(column: str) -> None:
    from livepp.engines.llamacpp import LlamaCppEngine
    from livepp.engines.scheduler import Scheduler

    engine = LlamaCppEngine(exact=True)
    try:
        if column == "continuous batch":
            scheduler = Scheduler(engine, max_batch=2, gather_s=0)
            try:
                result = Monitor().run(scheduler.open(PROMPT, GenerationParams(max_new_tokens=4, ignore_eos=True)))
            finally:
                scheduler.close()
        else:
            result = Monitor().run(engine.open(PROMPT, GenerationParams(max_new_tokens=4, ignore_eos=True)))
        assert result.end.n_tokens == 4
    finally:
        engine.close()


def run_devices(column: str, engines: dict) -> None:
    from livepp.engines.torch.models import resolve_device

    assert resolve_device("auto") == str(engines["torch"].decoder.device)
    run_policy("`early-stop` (stop)", column, engines)


@pytest.mark.parametrize("feature,column", table())
def test_every_y_cell_runs(feature, column, engines, loaded):
    if feature in POLICIES:
        run_policy(feature, column, engines)
    elif feature.startswith("`think`"):
        run_think(column, engines)
    elif feature.startswith("`route`"):
        run_route(column, engines)
    elif feature.startswith("`watch`"):
        run_watch(column, engines, loaded)
    elif feature.startswith("scoring"):
        run_scoring(column, engines, loaded)
    elif feature == "`--exact`":
        run_exact(column)
    elif feature.startswith("devices"):
        run_devices(column, engines)
    else:
        raise AssertionError(f"the table has a feature this test does not know how to run: {feature!r}")


def test_the_table_names_every_policy_and_has_a_reason_in_every_other_cell():
    from livepp.core.policies import _SPECS

    rows = table_rows()
    for row in rows:
        assert len(row) == 1 + len(COLUMNS)
        for cell in row[1:]:
            assert cell.startswith("Y") or len(cell) > 8, f"a cell that is not Y must say why: {row}"
    features = " ".join(row[0] for row in rows)
    assert all(f"`{name}`" in features for name in _SPECS), "every policy has a row"

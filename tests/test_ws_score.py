"""The websocket `score` request: a text's (or a target's) PPL streamed window
by window as rows of the service's batch, equal to `livepp score --json`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from websockets.sync.client import connect

from livepp.cli.main import main
from livepp.engines.torch.engine import TorchEngine
from test_server import RunningServer, error_for, events_until_end, send

pytestmark = pytest.mark.model

GPL = Path("/usr/share/common-licenses/GPL-3")
TEXT = (GPL.read_text() if GPL.is_file() else "The quick brown fox jumps over the lazy dog. " * 100)[:4000]


@pytest.fixture(scope="module")
def server(decoder):
    s = RunningServer(decoder, prefill_chunk=64)
    yield s
    s.stop()


def reference(decoder, *args):
    r = CliRunner().invoke(main, ["score", *args, "--json"], input=TEXT, obj={"engine": TorchEngine(decoder)})
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


@pytest.mark.parametrize("options,args", [({"max_length": 256, "stride": 128}, ["-", "--max-length", "256", "--stride", "128"]),
                                          ({"max_length": 300, "convention": "lm-eval"}, ["-", "--max-length", "300", "--convention", "lm-eval"])])
def test_the_stream_equals_livepp_score_window_by_window(server, decoder, options, args):
    want = reference(decoder, *args)
    with connect(server.url) as ws:
        send(ws, type="score", id="s", text=TEXT, **options)
        events = events_until_end(ws, "s")
    start, windows, end = events[0], [e for e in events if e["type"] == "window"], events[-1]
    assert start["type"] == "start" and start["windows"] == want["windows"] == len(windows) > 2
    tokens = [t for w in windows for t in w["tokens"]]
    assert [t["token_id"] for t in tokens] == [t["token_id"] for t in want["tokens"]]
    assert max(abs(a["logprob"] - b["logprob"]) for a, b in zip(tokens, want["tokens"])) <= 1e-4
    seen = 0
    for w in windows:  # each window: its share of the tokens, and the running totals so far
        seen += len(w["tokens"])
        assert w["n_tokens"] == seen and w["end"] - w["score_from"] == len(w["tokens"])
    assert end["reason"] == "done" and end["n_tokens"] == want["n_tokens"]
    assert end["ppl"] == pytest.approx(want["ppl"], rel=1e-4) and end["first_token_rule"] == want["first_token_rule"]
    assert windows[-1]["ppl"] == pytest.approx(want["ppl"], rel=1e-4)


def test_a_target_given_a_prompt(server, decoder):
    prompt, target = "The capital of France is", " Paris, a city on the Seine."
    r = CliRunner().invoke(main, ["score", "--prompt", prompt, "--target", target, "--json"], obj={"engine": TorchEngine(decoder)})
    want = json.loads(r.stdout)
    with connect(server.url) as ws:
        send(ws, type="score", id="t", prompt=prompt, target=target)
        end = events_until_end(ws, "t")[-1]
    assert end["n_tokens"] == want["n_tokens"] == 9 and end["ppl"] == pytest.approx(want["ppl"], rel=1e-4)


def test_cancel_mid_document_stops_between_windows(server):
    with connect(server.url) as ws:
        send(ws, type="score", id="c", text=TEXT, max_length=64, stride=32)
        while json.loads(ws.recv(timeout=60))["type"] != "window":
            pass
        send(ws, type="cancel", id="c")
        events = events_until_end(ws, "c")
    end = events[-1]
    assert end["type"] == "end" and end["reason"] == "cancelled"
    assert end["windows"] < 30 and end["n_tokens"] < 900  # far from the whole document's ~1000 tokens and 30+ windows


@pytest.mark.parametrize("message,words", [({"text": ""}, "non-empty"), ({"prompt": "a"}, "prompt and target"),
                                           ({"text": "hi", "stride": 8}, "stride needs max_length"),
                                           ({"text": "hi", "convention": "lm-eval", "stride": 8, "max_length": 16}, "lm-eval")])
def test_bad_score_requests(server, message, words):
    with connect(server.url) as ws:
        send(ws, type="score", id="b", **message)
        e = error_for(ws, "b")
        assert e["code"] == "bad_params" and words in e["message"]

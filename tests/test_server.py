"""A real livepp server on an ephemeral port, driven by a real websocket client."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.error
import urllib.request

import pytest
from click.testing import CliRunner
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from livepp.cli.main import main
from livepp.serve.app import LiveppServer, ServerConfig, serve_forever

pytestmark = pytest.mark.model


class RunningServer:
    """Runs serve_forever in a thread with its own event loop."""

    def __init__(self, decoder, **config) -> None:
        self.server = LiveppServer(decoder, ServerConfig(port=0, **config))
        self._ready = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)
        self._thread.start()
        assert self._ready.wait(30), "server did not start"

    async def _main(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.stop_event = asyncio.Event()

        def ready(port: int) -> None:
            self.port = port
            self._ready.set()

        await serve_forever(self.server, ready=ready, stop=self.stop_event)

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.stop_event.set)
        self._thread.join(30)


@pytest.fixture(scope="module")
def server(decoder):
    s = RunningServer(decoder, max_new_tokens_cap=64, max_requests_per_connection=2)
    yield s
    s.stop()


def events_until_end(ws, request_id, timeout=120):
    out = []
    deadline = time.time() + timeout
    while time.time() < deadline:
        e = json.loads(ws.recv(timeout=timeout))
        if e.get("id") != request_id:
            continue
        out.append(e)
        if e["type"] in ("end", "error"):
            return out
    raise AssertionError("no end event")


def send(ws, **message):
    ws.send(json.dumps(message))


def error_for(ws, request_id=None, timeout=30):
    while True:
        e = json.loads(ws.recv(timeout=timeout))
        if e["type"] == "error" and e.get("id") == request_id:
            return e


TIMING = {"prefill_s", "decode_s", "tokens_per_s"}


def test_events_match_generate_json(server):
    params = {"max_new_tokens": 12, "temperature": 0.8, "seed": 3, "top_logprobs": 3}
    with connect(server.url) as ws:
        send(ws, type="generate", id="a", prompt="Tell me about owls.", params=params)
        got = events_until_end(ws, "a")
    r = CliRunner().invoke(main, ["generate", "Tell me about owls.", "--max-new-tokens", "12", "--temperature", "0.8", "--seed", "3", "--top-logprobs", "3", "--json"])
    want = [json.loads(x) for x in r.stdout.splitlines()]
    assert [e["type"] for e in got] == [e["type"] for e in want]
    assert all(e["id"] == "a" for e in got)
    assert got[0]["prompt_token_ids"] == want[0]["prompt_token_ids"]
    for g, w in zip(got[1:], want[1:]):
        g = {k: v for k, v in g.items() if k not in TIMING | {"id"}}
        w = {k: v for k, v in w.items() if k not in TIMING}
        assert g == w


def test_cancel_stops_within_one_token(server):
    with connect(server.url) as ws:
        send(ws, type="generate", id="c", prompt="Write a very long essay.", params={"max_new_tokens": 64, "ignore_eos": True})
        seen = 0
        while seen < 3:
            e = json.loads(ws.recv(timeout=60))
            seen += e["type"] == "token"
        send(ws, type="cancel", id="c")
        rest = events_until_end(ws, "c")
    end = rest[-1]
    assert end["type"] == "end" and end["reason"] == "cancelled"
    # The cancel arrived after token 3; at most the token in flight plus one more follow.
    assert end["n_tokens"] <= 3 + 2


def test_disconnect_frees_the_model(server, decoder):
    ws = connect(server.url).__enter__()
    send(ws, type="generate", id="d", prompt="Write a very long essay.", params={"max_new_tokens": 64, "ignore_eos": True})
    while json.loads(ws.recv(timeout=60))["type"] != "token":
        pass
    ws.close()
    deadline = time.time() + 10
    while server.server.jobs and time.time() < deadline:
        time.sleep(0.05)
    assert not server.server.jobs
    with decoder.count_forward_passes() as calls:
        time.sleep(0.5)
    assert calls[0] == 0  # nothing is computing for the departed client


def test_eight_concurrent_clients_all_get_their_end(server):
    results = {}

    def client(i):
        with connect(server.url) as ws:
            send(ws, type="generate", id=f"k{i}", prompt=f"Name a fruit number {i}.", params={"max_new_tokens": 8, "ignore_eos": True})
            results[i] = events_until_end(ws, f"k{i}")

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert sorted(results) == list(range(8))
    for i, events in results.items():
        assert events[0]["type"] == "start" and events[-1]["type"] == "end"
        assert events[-1]["n_tokens"] == 8
        assert "".join(e["text"] for e in events if e["type"] == "token") == events[-1]["text"]


@pytest.mark.parametrize(
    "message,code",
    [
        ("{not json", "bad_json"),
        (json.dumps({"type": "dance"}), "unknown_type"),
        (json.dumps([1, 2]), "bad_message"),
        (json.dumps({"type": "generate", "id": "x", "prompt": "hi", "params": {"temperature": "hot"}}), "bad_params"),
        (json.dumps({"type": "generate", "id": "x", "prompt": "hi", "params": {"max_new_tokens": 10_000}}), "bad_params"),
        (json.dumps({"type": "generate", "id": "x", "prompt": "hi", "params": {"bogus": 1}}), "bad_params"),
        (json.dumps({"type": "generate", "id": "x", "prompt": "hi", "policies": ["nope"]}), "bad_params"),
        (json.dumps({"type": "generate", "id": "x", "prompt": "   "}), "bad_params"),
        (json.dumps({"type": "cancel", "id": "nobody"}), "unknown_id"),
        (json.dumps({"type": "generate", "id": "x", "prompt": "a" * 70_000}), "message_too_large"),
        (json.dumps({"type": "generate", "id": "x", "prompt": "word " * 9000}), "prompt_too_long"),
    ],
)
def test_bad_input_gets_error_and_connection_stays_open(server, message, code):
    with connect(server.url) as ws:
        ws.send(message)
        e = json.loads(ws.recv(timeout=60))
        assert e["type"] == "error" and e["code"] == code, e
        assert e["message"]
        send(ws, type="generate", id="after", prompt="Hi!", params={"max_new_tokens": 2})
        assert events_until_end(ws, "after")[-1]["type"] == "end"


def test_too_many_requests_per_connection(server):
    with connect(server.url) as ws:
        for i in range(3):
            send(ws, type="generate", id=f"m{i}", prompt="Write a long essay.", params={"max_new_tokens": 30, "ignore_eos": True})
        e = error_for(ws, "m2")
        assert e["code"] == "too_many_requests"
        for i in range(2):
            send(ws, type="cancel", id=f"m{i}")
        ends = set()
        while len(ends) < 2:
            e = json.loads(ws.recv(timeout=60))
            if e["type"] == "end":
                ends.add(e["id"])
        assert ends == {"m0", "m1"}


def test_http_routes(server):
    base = f"http://127.0.0.1:{server.port}"
    with urllib.request.urlopen(base + "/healthz") as r:
        assert r.status == 200 and r.headers["Content-Type"] == "application/json"
        health = json.loads(r.read())
    assert health["status"] == "ok" and health["max_batch"] == 8
    assert health["running"] == health["queued"] == health["batch_size"] == 0
    with urllib.request.urlopen(base + "/") as r:
        assert r.headers["Content-Type"] == "text/html; charset=utf-8"
        page = r.read().decode()
    assert "<canvas" in page and "http://" not in page.replace("http://www.w3.org", "")  # no external assets
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(base + "/nope")
    assert info.value.code == 404


def test_foreign_origin_is_refused(server):
    with pytest.raises(InvalidStatus) as info:
        connect(server.url, origin="http://evil.example")
    assert info.value.response.status_code == 403
    with connect(server.url, origin=f"http://127.0.0.1:{server.port}") as ws:
        send(ws, type="generate", id="o", prompt="Hi", params={"max_new_tokens": 1})
        assert events_until_end(ws, "o")[-1]["type"] == "end"


def test_token_auth_and_shutdown_sends_end(decoder):
    s = RunningServer(decoder, token="s3cret")
    try:
        with pytest.raises(InvalidStatus) as info:
            connect(s.url)
        assert info.value.response.status_code == 401
        with pytest.raises(InvalidStatus):
            connect(s.url + "?token=wrong")
        with connect(s.url, additional_headers={"Authorization": "Bearer s3cret"}):
            pass
        ws = connect(s.url + "?token=s3cret").__enter__()
        send(ws, type="generate", id="s", prompt="Write a long essay.", params={"max_new_tokens": 200, "ignore_eos": True})
        while json.loads(ws.recv(timeout=60))["type"] != "token":
            pass
        s.stop()
        end = [e for e in events_until_end(ws, "s", timeout=30) if e["type"] == "end"]
        assert end and end[0]["reason"] == "shutdown"
    finally:
        if s._thread.is_alive():
            s.stop()


def test_route_message_runs_car_with_staged_events(server):
    with connect(server.url) as ws:
        send(ws, type="route", id="r", question="What is 6 + 7?", params={"long_max_tokens": 16})
        events = []
        while not events or events[-1]["type"] not in ("answer", "error"):
            e = json.loads(ws.recv(timeout=120))
            if e.get("id") == "r":
                events.append(e)
    assert events[-1]["type"] == "answer", events[-1]
    short = [e for e in events if e.get("stage") == "short"]
    assert short[0]["type"] == "start" and short[-1]["type"] == "end"
    decision = next(e for e in events if e["type"] == "route")
    assert decision["ppl"] == pytest.approx(short[-1]["ppl"])
    long = [e for e in events if e.get("stage") == "long"]
    assert (decision["decision"] == "long") == bool(long)
    assert events[-1]["tokens_total"] == short[-1]["n_tokens"] + (long[-1]["n_tokens"] if long else 0)


def test_route_message_bad_params(server):
    with connect(server.url) as ws:
        send(ws, type="route", id="r", question="", params={})
        assert error_for(ws, "r")["code"] == "bad_params"
        send(ws, type="route", id="r", question="What is 2+2?", params={"early": "yes"})
        assert error_for(ws, "r")["code"] == "bad_params"


def test_serve_remote_streams_an_engine(tmp_path):
    from test_remote_parsing import Stub, expected_from_sse, fixture

    from livepp.engines.remote import OpenAIEngine

    body = fixture("chat_stream.sse")
    stub = Stub(body)

    class Remote(RunningServer):
        def __init__(self) -> None:
            self.server = LiveppServer(OpenAIEngine(stub.url, "smollm2"), ServerConfig(port=0))
            self._ready = threading.Event()
            self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)
            self._thread.start()
            assert self._ready.wait(30)

    s = Remote()
    try:
        with connect(s.url) as ws:
            send(ws, type="generate", id="g", prompt="What is 2+2?", params={"max_new_tokens": 24})
            events = events_until_end(ws, "g")
    finally:
        s.stop()
        stub.close()
    lps, text = expected_from_sse(body, "chat")
    assert events[0]["type"] == "start" and events[0]["model"] == "smollm2"
    assert [e["logprob"] for e in events if e["type"] == "token"] == lps
    assert events[-1]["type"] == "end" and events[-1]["text"] == text

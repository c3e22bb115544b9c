"""The service under hostile or careless clients: rebinding, limits, races, exits."""

from __future__ import annotations

import asyncio
import http.client
import json
import time

import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from livepp.serve.outbox import Outbox
from livepp.serve.app import ERROR_CODES, Interrupts, LiveppServer, ServerConfig
from test_server import RunningServer, error_for, events_until_end, send

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def server(decoder):
    s = RunningServer(decoder, max_new_tokens_cap=64, max_requests_per_connection=2, allowed_origins=("http://app.example",))
    yield s
    s.stop()


def _status(port, path, host, **headers):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", path, headers={"Host": host, **headers})
    status = conn.getresponse().status
    conn.close()
    return status


def test_dns_rebinding_host_is_refused(server):
    port = server.port
    # A page on evil.test that resolves to 127.0.0.1: its requests name evil.test.
    assert _status(port, "/", f"evil.test:{port}") == 403
    assert _status(port, "/healthz", f"evil.test:{port}") == 403
    upgrade = {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
               "Sec-WebSocket-Version": "13", "Origin": f"http://evil.test:{port}"}
    assert _status(port, "/ws", f"evil.test:{port}", **upgrade) == 403
    assert _status(port, "/ws", f"127.0.0.1:{port}", **upgrade | {"Origin": f"http://127.0.0.1:{port}"}) == 101
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}"):
        assert _status(port, "/healthz", host) == 200


def test_allowed_hosts_and_origins(decoder):
    s = RunningServer(decoder, allowed_hosts=("model.lan",), allowed_origins=("http://app.example",))
    try:
        assert _status(s.port, "/healthz", f"model.lan:{s.port}") == 200
        assert _status(s.port, "/healthz", f"other.lan:{s.port}") == 403
    finally:
        s.stop()


def test_allowed_origin_connects_and_a_foreign_one_does_not(server):
    with connect(server.url, origin="http://app.example") as ws:
        send(ws, type="generate", id="o", prompt="Hi", params={"max_new_tokens": 1})
        assert events_until_end(ws, "o")[-1]["type"] == "end"
    with pytest.raises(InvalidStatus) as info:
        connect(server.url, origin="http://evil.example")
    assert info.value.response.status_code == 403


def test_non_ascii_token_is_refused_not_a_crash(decoder):
    s = RunningServer(decoder, token="s3cret")
    try:
        with pytest.raises(InvalidStatus) as info:
            connect(s.url + "?token=%C3%A9t%C3%A9")
        assert info.value.response.status_code == 401
    finally:
        s.stop()


def test_deeply_nested_json_is_bad_json(server):
    with connect(server.url) as ws:
        ws.send("[" * 30000 + "]" * 30000)
        e = json.loads(ws.recv(timeout=30))
        assert e["code"] == "bad_json" and "nested" in e["message"]


@pytest.mark.parametrize(
    "params,policies,message",
    [
        ({"stop": ["x"] * 9}, [], "stop strings"),
        ({"stop": ["y" * 201]}, [], "stop strings"),
        ({"top_logprobs": 21}, [], "top_logprobs"),
        ({}, ["spike"] * 9, "policies"),
    ],
)
def test_request_limits(server, params, policies, message):
    with connect(server.url) as ws:
        send(ws, type="generate", id="l", prompt="Hi", params=params | {"max_new_tokens": 2}, policies=policies)
        e = error_for(ws, "l")
        assert e["code"] == "bad_params" and message in e["message"]


def test_route_short_max_tokens_is_capped(server):
    with connect(server.url) as ws:
        send(ws, type="route", id="r", question="What is 2+2?", params={"short_max_tokens": 10_000})
        assert error_for(ws, "r")["code"] == "bad_params"


def test_global_job_cap_answers_busy(decoder):
    s = RunningServer(decoder, max_running_jobs=2, max_requests_per_connection=4)
    try:
        with connect(s.url) as ws:
            for i in range(2):
                send(ws, type="generate", id=f"b{i}", prompt="Write a long essay.", params={"max_new_tokens": 200, "ignore_eos": True})
            send(ws, type="generate", id="b2", prompt="Hi", params={"max_new_tokens": 2})
            assert error_for(ws, "b2")["code"] == "busy"
            for i in range(2):
                send(ws, type="cancel", id=f"b{i}")
    finally:
        s.stop()


def test_connection_cap(decoder):
    s = RunningServer(decoder, max_connections=1)
    try:
        with connect(s.url):
            with pytest.raises(InvalidStatus) as info:
                connect(s.url)
            assert info.value.response.status_code == 503
    finally:
        s.stop()


def test_error_flood_does_not_grow_the_outbox():
    async def main():
        box = Outbox(limit=8)
        for _ in range(1000):
            box.put({"type": "error", "id": None, "code": "bad_json", "message": "x"}, droppable=True)
        box.put({"type": "end", "id": "a"})  # never dropped
        return box

    box = asyncio.run(main())
    assert len(box) == 9 and box.dropped == 992


def test_outbox_coalesces_tokens_of_a_slow_reader_and_keeps_order():
    async def main():
        box = Outbox(limit=3)
        box.put({"type": "start", "id": "a"})
        for i in range(5):
            box.put({"type": "token", "id": "a", "index": i, "text": f"t{i}", "ppl": float(i)})
        box.put({"type": "policy", "id": "a", "index": 4})
        box.put({"type": "token", "id": "a", "index": 5, "text": "t5", "ppl": 5.0})
        box.put({"type": "end", "id": "a"})
        return [await box.get() for _ in range(len(box))], box.coalesced

    items, coalesced = asyncio.run(main())
    assert [e["type"] for e in items] == ["start", "token", "token", "policy", "token", "end"]
    merged = items[2]
    assert merged["text"] == "t1t2t3t4" and merged["ppl"] == 4.0 and merged["index"] == 4 and merged["coalesced"] == 4
    assert "".join(e["text"] for e in items if e["type"] == "token") == "t0t1t2t3t4t5"
    assert coalesced == 3


def test_id_reuse_right_after_end_is_accepted(server):
    with connect(server.url) as ws:
        for round_ in range(5):
            for i in range(2):  # the per-connection limit, refilled the moment each ends
                send(ws, type="generate", id=f"r{i}", prompt="Hi", params={"max_new_tokens": 2})
            ends = 0
            while ends < 2:
                e = json.loads(ws.recv(timeout=60))
                assert e["type"] != "error", (round_, e)
                ends += e["type"] == "end"


def test_cancelling_a_route_in_its_short_stage_makes_no_decision(server):
    with connect(server.url) as ws:
        send(ws, type="route", id="c", question="Tell me everything about the history of Rome.", params={"short_max_tokens": 64})
        while True:
            e = json.loads(ws.recv(timeout=60))
            if e.get("id") == "c" and e["type"] == "token":
                break
        send(ws, type="cancel", id="c")
        events = []
        while not events or events[-1]["type"] not in ("answer", "error"):
            e = json.loads(ws.recv(timeout=60))
            if e.get("id") == "c":
                events.append(e)
    assert not [e for e in events if e["type"] == "route"]
    assert not [e for e in events if e.get("stage") == "long"]
    assert [e["reason"] for e in events if e["type"] == "end"] == ["cancelled"]
    assert events[-1]["type"] == "answer" and events[-1]["stopped"] == "cancelled" and events[-1]["answer_from"] is None


def test_cancel_of_a_remote_stream_does_not_wait_for_the_next_token(tmp_path):
    from test_remote_parsing import SlowHTTP10Stub

    stub = SlowHTTP10Stub()
    from livepp.engines.remote import OpenAIEngine

    s = RunningServerRemote(OpenAIEngine(stub.url, "m", timeout=60.0))
    try:
        with connect(s.url) as ws:
            send(ws, type="generate", id="x", prompt="Hi", params={"max_new_tokens": 1000})
            while json.loads(ws.recv(timeout=30))["type"] != "token":
                pass
            cancelled_at = time.perf_counter()
            send(ws, type="cancel", id="x")
            end = [e for e in events_until_end(ws, "x", timeout=30) if e["type"] == "end"][0]
            assert end["reason"] == "cancelled"
            assert time.perf_counter() - cancelled_at < 5
        assert stub.disconnected.wait(5)
    finally:
        s.stop()
        stub.close()


class RunningServerRemote(RunningServer):
    def __init__(self, remote, **config):  # noqa: D401 - same as RunningServer, with a remote engine
        import threading

        self.server = LiveppServer(remote, ServerConfig(port=0, **config))
        self._ready = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)
        self._thread.start()
        assert self._ready.wait(30)


def test_remote_http_errors_have_their_own_code():
    from test_remote_parsing import Stub

    from livepp.engines.remote import OpenAIEngine

    stub = Stub(b'{"error": "no such model"}', status=404)
    s = RunningServerRemote(OpenAIEngine(stub.url, "m"))
    try:
        with connect(s.url) as ws:
            send(ws, type="generate", id="u", prompt="Hi", params={"max_new_tokens": 4})
            events = []
            while not events or events[-1]["type"] != "error":
                events.append(json.loads(ws.recv(timeout=30)))
            assert events[-1]["code"] == "upstream_error" and "HTTP 404" in events[-1]["message"]
            assert [e["reason"] for e in events if e["type"] == "end"] == ["error"]
    finally:
        s.stop()
        stub.close()


def test_non_finite_numbers_never_reach_the_wire(server):
    # Greedy decoding of a prompt, then a policy spec that cannot stop; the
    # server's JSON must parse in a browser: no NaN/Infinity tokens at all.
    with connect(server.url) as ws:
        send(ws, type="generate", id="n", prompt="Hi", params={"max_new_tokens": 3})
        raw = []
        while True:
            m = ws.recv(timeout=60)
            raw.append(m)
            if json.loads(m)["type"] == "end":
                break
    for m in raw:
        json.loads(m, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c} in {m}"))


def test_second_interrupt_forces_exit():
    forced = []

    async def main():
        stop = asyncio.Event()
        handler = Interrupts(stop, force_exit=lambda: forced.append(True))
        handler()
        assert stop.is_set() and not forced
        handler()
        return forced

    assert asyncio.run(main()) == [True]


def test_every_error_code_is_documented():
    from pathlib import Path

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    missing = [c for c in ERROR_CODES if f"`{c}`" not in readme]
    assert not missing, missing

"""`livepp serve` on its HTTP stack, as a hostile or careless client meets it:
keep-alive, chunked bodies, HEAD, malformed heads, lone surrogates, duplicate
headers, header injection, oversized bodies, and OpenAI errors that name the
field. A scripted engine answers (the stack is under test, not the model)."""

from __future__ import annotations

import http.client
import json
import socket

import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from scripted_engine import ScriptedEngine
from test_server import RunningServer, error_for, events_until_end, send

TOKEN = "s3cret"
SCRIPT = [("Hello", -0.5), (" there", -1.0), (".", -0.25)]


@pytest.fixture(scope="module")
def server():
    s = RunningServer(ScriptedEngine({"aaa": [("a", -0.1)] * 40}, default=SCRIPT), token=TOKEN, allowed_origins=("http://app.example",))
    yield s
    s.stop()


def raw(port: int, data: bytes, *, timeout: float = 10) -> bytes:
    """Everything the server answers to ``data`` until it closes or goes quiet."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
                if b"\r\n\r\n" in out:
                    s.settimeout(0.5)  # the head is in; take what follows promptly, then stop
        except (socket.timeout, ConnectionResetError):
            pass
    return out


def status_of(reply: bytes) -> int:
    return int(reply.split(b" ", 2)[1])


def head_lines(reply: bytes) -> list[str]:
    return reply.partition(b"\r\n\r\n")[0].decode("latin-1").lower().split("\r\n")


def request(port: int, method: str, path: str, body: dict | None = None, **headers: str) -> tuple[int, dict, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    data = json.dumps(body).encode() if body is not None else None
    conn.request(method, path, body=data, headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json", **headers})
    r = conn.getresponse()
    out = r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    conn.close()
    return out


def chat_body(**fields) -> dict:
    return {"model": "scripted", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3} | fields


def test_two_requests_on_one_connection_are_answered_on_the_same_socket(server):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    conn.request("GET", "/v1/models", headers=headers)
    first = conn.getresponse()
    assert first.status == 200 and first.getheader("connection", "keep-alive").lower() != "close"
    first.read()
    sock = conn.sock
    conn.request("POST", "/v1/chat/completions", body=json.dumps(chat_body()), headers=headers)
    second = conn.getresponse()
    assert second.status == 200 and json.loads(second.read())["choices"][0]["message"]["content"] == "Hello there."
    assert conn.sock is sock and sock.fileno() != -1  # http.client reconnects (a new socket) when the server closed
    conn.close()


def test_a_chunked_body_is_read(server):
    body = json.dumps({"model": "scripted", "prompt": "hi", "max_tokens": 2}).encode()
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + 7]), body[i:i + 7]) for i in range(0, len(body), 7)) + b"0\r\n\r\n"
    reply = raw(server.port, b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer s3cret\r\n"
                             b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks)
    assert status_of(reply) == 200
    assert json.loads(reply.partition(b"\r\n\r\n")[2])["choices"][0]["text"] == "Hello there"


@pytest.mark.parametrize("path", ["/", "/healthz", "/metrics", "/status", "/v1/models", "/v1/models/scripted", "/openapi.json"])
def test_head_answers_where_get_does(server, path):
    got, head, body = request(server.port, "GET", path)
    status, headers, empty = request(server.port, "HEAD", path)
    assert (status, empty) == (got, b"") and got == 200
    assert headers["content-type"] == head["content-type"]


def test_one_model_by_id(server):
    status, _, body = request(server.port, "GET", "/v1/models/scripted")
    assert status == 200 and json.loads(body)["id"] == "scripted"
    status, _, body = request(server.port, "GET", "/v1/models/gpt-4o")
    assert status == 404 and json.loads(body)["error"]["code"] == "model_not_found"


def test_openapi_describes_the_requests_and_responses(server):
    status, _, body = request(server.port, "GET", "/openapi.json")
    doc = json.loads(body)
    chat = doc["paths"]["/v1/chat/completions"]["post"]
    assert chat["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/ChatCompletionRequest")
    assert chat["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/ChatCompletion")
    assert "text/event-stream" in chat["responses"]["200"]["content"]
    assert chat["responses"]["400"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
    fields = doc["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    assert {"model", "messages", "temperature", "top_p", "seed", "stop", "livepp", "logprobs"} <= set(fields)
    assert fields["model"]["enum"] == ["scripted"]
    assert set(doc["components"]["schemas"]["LiveppOptions"]["properties"]) == {"policies", "window", "steps"}


@pytest.mark.parametrize("fields,param", [
    ({"seed": -1}, "seed"), ({"seed": 2**63}, "seed"), ({"seed": "1"}, "seed"),
    ({"temperature": -1}, "temperature"), ({"temperature": "hot"}, "temperature"),
    ({"top_p": 0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"min_p": 1}, "min_p"), ({"top_k": -2}, "top_k"),
    ({"stop": [""]}, "stop"), ({"stop": 5}, "stop"), ({"stop": ["x"] * 9}, "stop"),
    ({"n": 0}, "n"), ({"n": 99}, "n"), ({"max_tokens": 0}, "max_tokens"), ({"max_tokens": 10_000}, "max_tokens"),
    ({"messages": []}, "messages"), ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"), ({"top_logprobs": 3}, "top_logprobs"),
    ({"logit_bias": {"1": 2}}, "logit_bias"), ({"presence_penalty": 1}, "presence_penalty"),
    ({"response_format": {"type": "json_object"}}, "response_format.type"), ({"tools": [{"type": "function"}]}, "tools"),
    ({"stream": "yes"}, "stream"),
    ({"livepp": {"policies": ["no-such-policy"]}}, "livepp.policies[0]"), ({"livepp": {"policies": "spike"}}, "livepp.policies"),
    ({"livepp": {"steps": "("}}, "livepp.steps"), ({"livepp": {"steps": "x" * 300}}, "livepp.steps"),
    ({"livepp": {"window": 0}}, "livepp.window"), ({"livepp": {"colour": 1}}, "livepp.colour"),
])
def test_every_bad_parameter_is_named(server, fields, param):
    status, _, body = request(server.port, "POST", "/v1/chat/completions", chat_body(**fields))
    error = json.loads(body)["error"]
    assert status == 400 and error["param"] == param and error["type"] == "invalid_request_error", error
    assert param.split("[")[0].split(".")[-1] in error["message"] or param.split(".")[0] in error["message"]


def test_bad_json_and_non_objects_are_400(server):
    for data in (b"{x}", b"[1]", b"", b"[" * 5000 + b"]" * 5000, b'{"temperature": NaN, "model": "scripted"}',
                 b'{"model": "scripted", "prompt": "hi", "max_tokens": 1' + b"0" * 5000 + b"}"):
        reply = raw(server.port, b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer s3cret\r\n"
                                 b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(data) + data)
        assert status_of(reply) == 400, (data[:40], reply[:200])
        assert "error" in json.loads(reply.partition(b"\r\n\r\n")[2])


def test_bodies_orjson_refuses_or_reads_otherwise_are_read_as_the_standard_library_reads_them(server, monkeypatch):
    from livepp.serve import http_app

    fast, slow = [], []
    real_fast, real_slow = http_app.orjson.loads, http_app.json.loads
    monkeypatch.setattr(http_app.orjson, "loads", lambda data: fast.append(len(data)) or real_fast(data))
    monkeypatch.setattr(http_app.json, "loads", lambda data, **kw: slow.append(len(data)) or real_slow(data, **kw))
    body = {"model": "scripted", "prompt": "hi", "max_tokens": 3}
    assert request(server.port, "POST", "/v1/completions", body)[0] == 200
    assert fast == [len(json.dumps(body))] and len(json.dumps(body)) not in slow  # the fast path read it alone

    def answers(data: bytes) -> tuple[int, dict]:
        reply = raw(server.port, b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer s3cret\r\n"
                                 b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(data) + data)
        out = json.loads(reply.partition(b"\r\n\r\n")[2])
        out.pop("id", None), out.pop("created", None)
        return status_of(reply), out

    # UTF-16 (orjson takes UTF-8 only), integers past 64 bits (orjson makes them floats), in a field and in a token-id prompt
    bodies = [json.dumps(body).encode("utf-16"), json.dumps({**body, "max_tokens": 2 ** 70}).encode(),
              json.dumps({**body, "seed": 2 ** 64}).encode(), json.dumps({**body, "prompt": [5, 2 ** 70]}).encode()]
    got = []
    for data in bodies:
        slow.clear()
        got.append(answers(data))
        assert slow[:1] == [len(data)]  # the standard library read it (json.loads is also the test's own, after it)
    assert got[0][0] == 200 and got[0][1]["choices"][0]["text"] == "Hello there."
    # every answer is the one the standard library alone gives
    monkeypatch.setattr(http_app.orjson, "loads", lambda data: (_ for _ in ()).throw(http_app.orjson.JSONDecodeError("off", "", 0)))
    assert got == [answers(data) for data in bodies]


@pytest.mark.parametrize("head", [
    b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: \xc2\xb2\r\n\r\n",
    b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: " + b"9" * 5000 + b"\r\n\r\n",
    b"GET http://[/v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
    b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n",
    b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nHost: evil.example\r\n\r\n",
    b"GET /v1/models HTTP/1.1\r\n\r\n",
    b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer s3cret\r\nAuthorization: Bearer other\r\n\r\n",
    b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer s3cret\r\nOrigin: http://app.example\r\nOrigin: http://a\r\n\r\n",
])
def test_malformed_heads_get_400_and_the_server_goes_on(server, head):
    reply = raw(server.port, head)
    assert status_of(reply) == 400, reply[:200]
    status, _, _ = request(server.port, "GET", "/healthz")
    assert status == 200


def test_the_bearer_scheme_is_case_insensitive(server):
    for scheme in ("Bearer", "bearer", "BEARER"):
        assert request(server.port, "GET", "/v1/models", Authorization=f"{scheme} {TOKEN}")[0] == 200
    assert request(server.port, "GET", "/v1/models", Authorization=f"Basic {TOKEN}")[0] == 401


@pytest.mark.parametrize("fields,param", [
    ({"model": "scr\ud800"}, "model"),
    ({"messages": [{"role": "user", "content": "hi \ud800"}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "\udfff"}]}]}, "messages[0].content"),
    ({"stop": ["a\ud800"]}, "stop"),
    ({"user": "\ud800"}, "user"),
])
def test_a_lone_surrogate_in_a_chat_field_is_400_naming_it(server, fields, param):
    status, _, body = request(server.port, "POST", "/v1/chat/completions", chat_body(**fields))
    error = json.loads(body)["error"]
    assert status == 400 and error["param"].startswith(param) and "surrogate" in error["message"]


def test_a_lone_surrogate_in_a_prompt_is_400(server):
    status, _, body = request(server.port, "POST", "/v1/completions", {"model": "scripted", "prompt": ["ok", "x\ud800"]})
    assert status == 400 and json.loads(body)["error"]["param"] == "prompt[1]"


def test_a_lone_surrogate_over_the_websocket_is_an_error_and_the_connection_lives(server):
    with connect(f"{server.url}?token={TOKEN}") as ws:
        send(ws, type="generate", id="a\ud800", prompt="hi")
        e = json.loads(ws.recv(timeout=10))
        assert e["type"] == "error" and e["code"] == "bad_params" and e["id"] is None and "id" in e["message"]
        send(ws, type="generate", id="b", prompt="hi \udc00")
        e = error_for(ws, "b")
        assert "prompt" in e["message"] and "surrogate" in e["message"]
        send(ws, type="generate", id="c", prompt="hi", params={"stop": ["\ud83d"]})
        assert error_for(ws, "c")["code"] == "bad_params"
        send(ws, type="generate", id="d", prompt="hi", params={"max_new_tokens": 3})
        assert events_until_end(ws, "d")[-1]["reason"] == "eos"


def test_a_preflight_never_reflects_an_injected_header_line(server):
    for asked in (b"x\nSet-Cookie: a=1", b"x\rSet-Cookie: a=1", b"authorization, x y", b"x,\r\n Set-Cookie: a=1"):
        reply = raw(server.port, b"OPTIONS /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nOrigin: http://app.example\r\n"
                                 b"Access-Control-Request-Method: POST\r\nAccess-Control-Request-Headers: " + asked + b"\r\n\r\n")
        lines = head_lines(reply)
        assert status_of(reply) == 400, reply[:300]
        assert not [line for line in lines if line.startswith("set-cookie")]
    ok = raw(server.port, b"OPTIONS /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nOrigin: http://app.example\r\n"
                          b"Access-Control-Request-Method: POST\r\nAccess-Control-Request-Headers: authorization, x-stainless-os\r\n\r\n")
    assert status_of(ok) == 204 and "access-control-allow-headers: authorization, x-stainless-os" in head_lines(ok)


def test_duplicate_origin_on_the_websocket_is_refused_not_a_crash(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(b"GET /ws?token=s3cret HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
                  b"Origin: http://127.0.0.1\r\nOrigin: http://evil.example\r\n\r\n")
        reply = s.recv(4096)
    assert status_of(reply) in (400, 403)
    with pytest.raises(InvalidStatus) as refused:
        connect(f"{server.url}?token=wrong")
    assert refused.value.response.status_code == 401


def test_a_2mb_body_gets_a_413_that_http_client_reads_every_time(server):
    body = b"{" + b" " * (2 << 20) + b"}"
    for _ in range(10):
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        conn.request("POST", "/v1/completions", body=body, headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
        r = conn.getresponse()
        assert r.status == 413 and json.loads(r.read())["error"]["message"].startswith("request bodies are limited")
        conn.close()
    chunked = (b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer s3cret\r\nTransfer-Encoding: chunked\r\n\r\n"
               + b"".join(b"10000\r\n" + b" " * 0x10000 + b"\r\n" for _ in range(20)) + b"0\r\n\r\n")
    assert status_of(raw(server.port, chunked)) == 413


def test_a_crash_inside_a_websocket_request_ends_it_with_internal_and_keeps_the_connection(server, monkeypatch):
    import livepp.serve.generation as generation

    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(generation, "Monitor", broken)
    with connect(f"{server.url}?token={TOKEN}") as ws:
        send(ws, type="generate", id="x", prompt="hi")
        e = error_for(ws, "x")
        assert e["code"] == "internal" and "ZeroDivisionError" in e["message"]
        monkeypatch.undo()
        send(ws, type="generate", id="x", prompt="hi", params={"max_new_tokens": 3})  # the id is free again
        assert events_until_end(ws, "x")[-1]["type"] == "end"


def test_a_step_regex_that_backtracks_ends_its_own_request_only(server):
    import time

    with connect(f"{server.url}?token={TOKEN}") as ws:
        started = time.perf_counter()
        send(ws, type="generate", id="slow", prompt="aaa", steps="(a{1,5}){1,30}b", params={"max_new_tokens": 40})
        send(ws, type="generate", id="fine", prompt="hi", params={"max_new_tokens": 3})
        events: dict[str, list] = {"slow": [], "fine": []}
        while not (events["fine"] and events["fine"][-1]["type"] == "end" and events["slow"] and events["slow"][-1]["type"] == "error"):
            e = json.loads(ws.recv(timeout=30))
            if e["type"] in ("end", "error"):
                events[e["id"]].append(e)
        assert time.perf_counter() - started < 5
    assert events["fine"][-1]["type"] == "end" and events["fine"][-1]["reason"] == "eos"
    assert any(e["type"] == "error" and "backtracks" in e["message"] for e in events["slow"])


def test_a_request_trickled_in_is_dropped_after_the_request_timeout():
    import time

    s = RunningServer(ScriptedEngine({}, default=SCRIPT), request_timeout=1.0)
    try:
        with socket.create_connection(("127.0.0.1", s.port), timeout=10) as idle, \
                socket.create_connection(("127.0.0.1", s.port), timeout=10) as slow:
            slow.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # ...and the rest never comes
            started = time.perf_counter()
            assert slow.recv(100) == b"" and idle.recv(100) == b""  # both closed by the server
            assert time.perf_counter() - started < 5
        assert request(s.port, "GET", "/healthz")[0] == 200  # a prompt client is served
    finally:
        s.stop()

"""The OpenAI-compatible stream parser on chunks recorded from a real server.

The fixtures in tests/fixtures/ are raw SSE bodies recorded from llama.cpp's
server (llama-cpp-python) serving the embedded GGUF file; tests/fixtures/README.md
has the command that recorded them. A loopback stub replays them byte for byte,
so these tests are fast and need no engine.
"""

from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from livepp import GenerationParams, LiveppError, Monitor
from livepp.remote import OpenAISource

FIXTURES = Path(__file__).parent / "fixtures"


class Stub:
    """Serves one canned response to every POST, and remembers the request bodies."""

    def __init__(self, body: bytes, *, status: int = 200, chunk_delay: float = 0.0, cut_after: int | None = None) -> None:
        stub = self
        self.requests: list[dict] = []
        self.disconnected = threading.Event()

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                stub.requests.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(status)
                self.send_header("Content-Type", "text/event-stream" if status == 200 else "application/json")
                self.end_headers()
                data = body if cut_after is None else body[:cut_after]
                try:
                    for line in data.splitlines(keepends=True):
                        self.wfile.write(line)
                        self.wfile.flush()
                        if chunk_delay:
                            threading.Event().wait(chunk_delay)
                except (BrokenPipeError, ConnectionResetError):
                    stub.disconnected.set()

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()


def fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def sse(*chunks) -> bytes:
    return b"".join(b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks) + b"data: [DONE]\n\n"


def run(url, *, api="chat", params=None, policies=(), timeout=10.0):
    source = OpenAISource(url, "smollm2", api=api, timeout=timeout)
    return Monitor(policies=policies).run(source.stream("What is 2+2?", params or GenerationParams(max_new_tokens=32)))


def expected_from_sse(body: bytes, api: str):
    """Token logprobs and text straight from the recorded chunks (the oracle)."""
    lps, text = [], ""
    for line in body.splitlines():
        if not line.startswith(b"data:") or line.strip() == b"data: [DONE]":
            continue
        for choice in json.loads(line[5:]).get("choices", []):
            lp = choice.get("logprobs") or {}
            if api == "chat":
                lps += [e["logprob"] for e in lp.get("content") or []]
                text += (choice.get("delta") or {}).get("content") or ""
            else:
                lps += lp.get("token_logprobs") or []
                text += choice.get("text") or ""
    return lps, text


@pytest.mark.parametrize("name,api", [("chat_stream.sse", "chat"), ("completions_stream.sse", "completions"), ("completions_stream_chinese.sse", "completions")])
def test_recorded_streams_parse_to_the_servers_logprobs(name, api):
    body = fixture(name)
    stub = Stub(body)
    try:
        result = run(stub.url, api=api)
    finally:
        stub.close()
    lps, text = expected_from_sse(body, api)
    assert [t.logprob for t in result.tokens] == lps
    assert result.end.text == text
    assert result.end.reason in ("eos", "length")
    assert all(t.entropy is None and t.token_id == -1 for t in result.tokens)
    assert all(len(t.top_logprobs) <= 5 for t in result.tokens)
    if name.endswith("chinese.sse"):
        assert any(ord(c) > 0x2E80 for c in result.end.text) and "\ufffd" not in result.end.text


def test_request_body_asks_for_logprobs():
    stub = Stub(fixture("chat_stream.sse"))
    try:
        run(stub.url, params=GenerationParams(max_new_tokens=7, temperature=0.5, seed=2, stop=("\n",)))
    finally:
        stub.close()
    body = stub.requests[0]
    assert body["stream"] is True and body["logprobs"] is True and body["top_logprobs"] == 20
    assert body["max_tokens"] == 7 and body["temperature"] == 0.5 and body["seed"] == 2 and body["stop"] == ["\n"]
    assert body["messages"] == [{"role": "user", "content": "What is 2+2?"}]


def tok(t, lp, tops=()):
    return {"token": t, "logprob": lp, "bytes": list(t.encode()), "top_logprobs": [{"token": a, "logprob": b, "bytes": list(a.encode())} for a, b in tops]}


def test_quirks_multi_token_chunks_empty_deltas_and_missing_logprobs():
    body = sse(
        {"choices": [{"delta": {"role": "assistant"}, "logprobs": None, "finish_reason": None}]},  # role only
        {"choices": [{"delta": {"content": "Hel"}, "logprobs": {"content": [tok("Hel", -0.5, [("Hel", -0.5), ("Hi", -1.5)])]}}]},
        {"choices": [{"delta": {}, "logprobs": None}]},  # empty delta
        {"choices": [{"delta": {"content": "lo world"}, "logprobs": {"content": [tok("lo", -0.1), tok(" world", -2.0)]}}]},  # two tokens
        {"choices": [{"delta": {}, "logprobs": None, "finish_reason": "length"}]},  # finish without a token
        {"choices": [], "usage": {"completion_tokens": 3}},  # usage chunk
    )
    stub = Stub(body)
    try:
        result = run(stub.url)
    finally:
        stub.close()
    assert [t.logprob for t in result.tokens] == [-0.5, -0.1, -2.0]
    assert result.end.text == "Hello world" and result.end.reason == "length"
    assert result.tokens[0].confidence == pytest.approx(1.0)  # -(−0.5 − 1.5)/2
    assert result.tokens[1].confidence is None  # no alternatives sent


def test_utf8_split_over_tokens_is_reassembled():
    e = "é".encode()
    body = sse({"choices": [{"delta": {"content": "é"}, "logprobs": {"content": [
        {"token": "\\xc3", "logprob": -1.0, "bytes": [e[0]], "top_logprobs": []},
        {"token": "\\xa9", "logprob": -0.2, "bytes": [e[1]], "top_logprobs": []},
    ]}, "finish_reason": "stop"}]})
    stub = Stub(body)
    try:
        result = run(stub.url)
    finally:
        stub.close()
    assert [t.text for t in result.tokens] == ["", "é"] and result.end.reason == "eos"


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda: Stub(b'{"error": "model not found"}', status=404), "HTTP 404"),
        (lambda: Stub(b"data: {not json\n\n"), "malformed chunk"),
        (lambda: Stub(sse({"error": {"message": "overloaded"}})), "overloaded"),
    ],
)
def test_http_and_chunk_errors_are_clear(make, message):
    stub = make()
    try:
        with pytest.raises(LiveppError, match=message):
            run(stub.url)
    finally:
        stub.close()


def test_connection_refused_and_timeout():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(LiveppError, match="cannot connect"):
        run(f"http://127.0.0.1:{port}/v1")
    stub = Stub(fixture("chat_stream.sse"), chunk_delay=1.0)
    try:
        with pytest.raises(LiveppError, match="timed out"):
            run(stub.url, timeout=0.3)
    finally:
        stub.close()
    with pytest.raises(LiveppError, match="http"):
        OpenAISource("ftp://x", "m")


def test_partial_stream_keeps_what_arrived():
    body = fixture("chat_stream.sse")
    cut = body.index(b"\n\n", len(body) // 2) + 2  # the server dies half-way
    stub = Stub(body, cut_after=cut)
    try:
        result = run(stub.url)
    finally:
        stub.close()
    lps, _ = expected_from_sse(body[:cut], "chat")
    assert [t.logprob for t in result.tokens] == lps and len(lps) > 0
    assert result.end.n_tokens == len(lps)


def test_early_stop_closes_the_stream():
    from livepp import EarlyStop

    body = fixture("chat_stream.sse")
    stub = Stub(body, chunk_delay=0.02)
    try:
        result = run(stub.url, policies=[EarlyStop(1.0001, metric="ppl", min_tokens=2)])
        assert result.end.reason == "policy" and result.end.n_tokens == 2
        assert result.end.tokens_after_stop is not None
        assert stub.disconnected.wait(5), "the stub never saw the client go away"
    finally:
        stub.close()

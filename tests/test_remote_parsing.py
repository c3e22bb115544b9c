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
from livepp.engines.remote import OpenAIEngine

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
    source = OpenAIEngine(url, "smollm2", api=api, timeout=timeout)
    return Monitor(policies=policies).run(source.open("What is 2+2?", params or GenerationParams(max_new_tokens=32)))


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
        OpenAIEngine("ftp://x", "m")


def run_collecting(url, **kwargs):
    """Run to the end or an error; the events the monitor emitted either way."""
    from livepp import CallbackSink

    events = []
    source = OpenAIEngine(url, "smollm2", api=kwargs.pop("api", "chat"), timeout=10.0)
    error = None
    try:
        Monitor(sinks=[CallbackSink(events.append)]).run(source.open("What is 2+2?", GenerationParams(max_new_tokens=32)))
    except LiveppError as exc:
        error = exc
    return events, error


def test_partial_stream_keeps_what_arrived_and_ends_as_error():
    body = fixture("chat_stream.sse")
    cut = body.index(b"\n\n", len(body) // 2) + 2  # the server dies half-way, cleanly
    stub = Stub(body, cut_after=cut)
    try:
        events, error = run_collecting(stub.url)
    finally:
        stub.close()
    lps, _ = expected_from_sse(body[:cut], "chat")
    tokens = [e for e in events if e.type == "token"]
    assert [t.logprob for t in tokens] == lps and len(lps) > 0
    end = events[-1]
    assert end.type == "end" and end.reason == "error" and end.n_tokens == len(lps)
    assert error is not None and "without [DONE]" in str(error)


class RawStub:
    """A loopback server that writes the given bytes verbatim after reading a request."""

    def __init__(self, raw: bytes, *, hold: float = 0.0) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(1)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/v1"
        self.raw, self.hold = raw, hold
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        conn, _ = self.sock.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(self.raw)
            threading.Event().wait(self.hold)

    def close(self):
        self.sock.close()


def chunked(body: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(line), line) for line in body.splitlines(keepends=True))


def test_truncated_chunked_response_ends_as_error_with_a_clear_message():
    body = fixture("chat_stream.sse")
    encoded = chunked(body)
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    stub = RawStub(head + encoded[: len(encoded) // 2])  # then the socket closes mid-chunk
    try:
        events, error = run_collecting(stub.url)
    finally:
        stub.close()
    assert isinstance(error, LiveppError) and "broke off" in str(error)
    assert events[-1].type == "end" and events[-1].reason == "error" and events[-1].n_tokens > 0


@pytest.mark.parametrize(
    "raw,message",
    [
        (b"garbage that is not HTTP\r\n\r\n", "did not answer with valid HTTP"),
        (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}", "not a text/event-stream"),
    ],
)
def test_bad_status_line_and_wrong_content_type_are_one_line_errors(raw, message):
    stub = RawStub(raw)
    try:
        with pytest.raises(LiveppError, match=message) as info:
            run(stub.url)
    finally:
        stub.close()
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("engine_reason,reason", [("abort", "error"), ("content_filter", "error"), ("tool_calls", "eos"), ("stop", "eos"), ("length", "length")])
def test_engine_finish_reasons_map_to_the_contract_and_are_kept(engine_reason, reason):
    body = sse({"choices": [{"delta": {"content": "a"}, "logprobs": {"content": [
        {"token": "a", "logprob": -0.5, "top_logprobs": []}]}, "finish_reason": engine_reason}]})
    stub = Stub(body)
    try:
        result = run(stub.url)
    finally:
        stub.close()
    assert result.end.reason == reason and result.end.engine_finish_reason == engine_reason
    assert result.end.tokens_after_stop is None  # nobody stopped it


def test_utf8_decoder_is_flushed_at_the_end():
    e = "é".encode()
    body = sse({"choices": [{"delta": {"content": "x"}, "logprobs": {"content": [
        {"token": "x", "logprob": -1.0, "bytes": list(b"x"), "top_logprobs": []},
        {"token": "\\xc3", "logprob": -0.2, "bytes": [e[0]], "top_logprobs": []},  # never completed
    ]}, "finish_reason": "length"}]})
    stub = Stub(body)
    try:
        result = run(stub.url)
    finally:
        stub.close()
    assert result.end.text == "x\ufffd"


class SlowHTTP10Stub:
    """An HTTP/1.0 engine (the response owns the socket) that streams one event
    every 50 ms for a long time and records when its client goes away."""

    def __init__(self) -> None:
        stub = self
        self.disconnected = threading.Event()
        self.sent = 0

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def log_message(self, *args):
                pass

            def do_POST(self):
                self.rfile.read(int(self.headers["Content-Length"]))
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()
                chunk = {"choices": [{"delta": {"content": "a"}, "logprobs": {"content": [
                    {"token": "a", "logprob": -0.5, "top_logprobs": [{"token": "a", "logprob": -0.5}]}]}, "finish_reason": None}]}
                try:
                    for _ in range(2000):
                        self.wfile.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
                        self.wfile.flush()
                        stub.sent += 1
                        threading.Event().wait(0.05)
                except (BrokenPipeError, ConnectionResetError):
                    stub.disconnected.set()

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()


def test_early_stop_closes_the_stream_while_it_is_still_referenced():
    from livepp import EarlyStop

    stub = SlowHTTP10Stub()
    source = OpenAIEngine(stub.url, "smollm2", timeout=10.0)
    stream = source.open("hi", GenerationParams(max_new_tokens=1000))
    try:
        result = Monitor(policies=[EarlyStop(1.0001, metric="ppl", min_tokens=2)]).run(stream)
        assert result.end.reason == "policy" and result.end.n_tokens == 2
        assert isinstance(result.end.tokens_after_stop, int) and result.end.tokens_after_stop >= 0
        # `stream` is still referenced here, so garbage collection cannot be
        # what closes the socket.
        assert stub.disconnected.wait(5), "the engine kept streaming to a stopped client"
        assert stream._sock is None
    finally:
        stub.close()


def test_abort_from_another_thread_wakes_a_waiting_read():
    stub = SlowHTTP10Stub()
    source = OpenAIEngine(stub.url, "smollm2", timeout=30.0)
    stream = source.open("hi", GenerationParams(max_new_tokens=1000))
    try:
        next(stream)
        threading.Timer(0.2, stream.abort).start()
        import time

        t0 = time.perf_counter()
        rest = list(stream)  # blocks on the socket until abort() wakes it
        assert time.perf_counter() - t0 < 5
        assert len(rest) < 200
        assert stub.disconnected.wait(5)
    finally:
        stream.close()
        stub.close()


def test_remote_engine_takes_chat_messages_and_runs_a_batch_one_request_at_a_time():
    from livepp.api import generate_many

    body = fixture("chat_stream.sse")
    stub = Stub(body)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]
    try:
        results = generate_many([messages, "Hi"], n=2, model=OpenAIEngine(stub.url, "smollm2"),
                                params=GenerationParams(max_new_tokens=32, temperature=0.5, seed=4))
    finally:
        stub.close()
    lps, text = expected_from_sse(body, "chat")
    assert [[t.logprob for t in r.tokens] for r in results] == [lps] * 4
    assert [r.end.text for r in results] == [text] * 4
    # four requests, in sample order: prompts in order, then draws (seed + j)
    assert [b["messages"] for b in stub.requests] == [messages, messages, [{"role": "user", "content": "Hi"}]] + [[{"role": "user", "content": "Hi"}]]
    assert [b["seed"] for b in stub.requests] == [4, 5, 4, 5]
    with pytest.raises(LiveppError, match="completions API takes text"):
        OpenAIEngine(stub.url, "smollm2", api="completions").open(messages, GenerationParams())
    with pytest.raises(LiveppError, match="role"):
        OpenAIEngine(stub.url, "smollm2").open([{"role": "wizard", "content": "x"}], GenerationParams())

"""Clients that read slowly or not at all: their slots are freed when their
generations end, their connections are dropped after the send timeout, and
they never hold up anyone else's stream."""

from __future__ import annotations

import contextlib
import json
import http.client
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import openai
import pytest
from websockets.sync.client import connect

from scripted_engine import ScriptedEngine
from test_server import RunningServer, events_until_end, send

# 8 MB of text per answer, more than any socket buffer holds, in few tokens:
# 8 answers are generated well within the send timeout, so what is tested is
# that a generation ends and frees its slot while nobody reads (with 2,000
# tokens of 4 kB, the eight took longer than the timeout on a quiet machine,
# and the stall guard rightly cancelled them first).
TOKENS, TOKEN_TEXT = 100, "x" * 80_000
BIG = [(TOKEN_TEXT, -1.0)] * TOKENS
SEND_TIMEOUT = 2.0


@pytest.fixture(scope="module")
def server():
    s = RunningServer(ScriptedEngine({"big": BIG}, default=[("ok", -0.5)]), max_running_jobs=8, max_new_tokens_cap=4000,
                      send_timeout=SEND_TIMEOUT)
    yield s
    s.stop()


def stalled_request(port: int, body: dict) -> socket.socket:
    """A client with a small receive buffer that sends a request and reads nothing."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", port))
    data = json.dumps(body).encode()
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
              b"Content-Length: %d\r\n\r\n" % len(data) + data)
    return s


def read_all(s: socket.socket) -> bytes:
    s.settimeout(10)
    out = b""
    try:
        while chunk := s.recv(1 << 16):
            out += chunk
    except (ConnectionResetError, socket.timeout):
        pass
    s.close()
    return out


def wait_for(condition, timeout: float) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def test_clients_that_stop_reading_free_their_slots_and_are_dropped_after_the_send_timeout(server):
    stalled = [stalled_request(server.port, {"model": "scripted", "prompt": "big", "max_tokens": TOKENS, "stream": i % 2 == 0})
               for i in range(8)]
    # Every generation ends although nobody reads: the slots are free...
    assert wait_for(lambda: server.server.engine.produced >= 8 * TOKENS and not server.server.jobs, 60), len(server.server.jobs)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="unused", max_retries=0, timeout=30)
    assert client.completions.create(model="scripted", prompt="hello", max_tokens=1).choices[0].text == "ok"  # ...a new request is admitted
    time.sleep(SEND_TIMEOUT + 2)
    for i, s in enumerate(stalled):
        got = read_all(s)  # what the kernel buffered before the server dropped the connection
        assert b"200 OK" in got[:100]
        assert b"[DONE]" not in got and len(got) < TOKENS * len(TOKEN_TEXT), (i, len(got))


def test_a_websocket_client_that_stops_reading_is_dropped(server):
    ws = connect(server.url, max_size=None)
    ws.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    send(ws, type="generate", id="w", prompt="big", params={"max_new_tokens": TOKENS})
    assert wait_for(lambda: len(server.server.sessions) == 1, 10)
    # The generation ends (its slot is free) though the client reads nothing...
    assert wait_for(lambda: not server.server.jobs, 60)
    # ...and the connection is dropped once the client has taken nothing for the send timeout.
    assert wait_for(lambda: len(server.server.sessions) == 0, SEND_TIMEOUT + 10)
    ws.close()
    with connect(server.url) as other:  # the server is fine
        send(other, type="generate", id="n", prompt="hello", params={"max_new_tokens": 1})
        assert events_until_end(other, "n")[-1]["type"] == "end"


@contextlib.contextmanager
def served(*args: str):
    """``livepp serve`` as it is deployed, in a process of its own: its port.
    Its stderr is read all along (a full pipe would block it), up to 120 s
    for the line that says where it serves; it is killed if it does not stop."""
    proc = subprocess.Popen([sys.executable, "-m", "livepp", "serve", "--port", "0", *args], stderr=subprocess.PIPE, text=True,
                            env=os.environ | {"PYTHONUNBUFFERED": "1"})
    lines: list[str] = []
    ready = threading.Event()

    def read() -> None:
        for line in proc.stderr:
            lines.append(line)
            if " on http://127.0.0.1:" in line:
                ready.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        assert ready.wait(120), "".join(lines)[-2000:]
        line = next(x for x in lines if " on http://127.0.0.1:" in x)
        yield int(line.split(" on http://127.0.0.1:")[1].split("/")[0])
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@pytest.mark.model
@pytest.mark.parametrize("sizes", [[1_000_000] * 4, [300_000] * 2], ids=["4 x 1 MB, refused by characters", "2 x 300 kB, by words"])
def test_a_stream_keeps_its_pace_while_others_post_huge_prompts(sizes):
    # The server runs in its own process, as deployed: in the test's process
    # the client threads below would share the server's GIL, which no client
    # of a real server does. For the same reason the bodies are encoded
    # before the stream starts: the SDK serializing megabytes of JSON while the
    # stream runs was the clients' CPU on the server's two cores (and held
    # the GIL of the thread that times the tokens), not the server's work.
    with served("--max-batch", "8") as port:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=300)
        refused: list = []
        # Issue 20's load: 4 clients post 1 MB prompts (refused by their characters), all at once; and, as a
        # second case, 2 clients post 300 kB ones (refused by their 60,000 words). Never tokenized.
        bodies = [json.dumps({"model": "SmolLM2-135M-Instruct", "prompt": ("word " * 200_000)[:size], "max_tokens": 1}).encode()
                  for size in sizes]

        def post(body: bytes) -> None:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            try:
                conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
                answer = conn.getresponse()
                if answer.status == 400:
                    refused.append(json.loads(answer.read())["error"]["code"])
            finally:
                conn.close()

        arrivals = []
        stream = client.completions.create(model="SmolLM2-135M-Instruct", prompt="Write a long story about the sea.", max_tokens=60,
                                           temperature=0, stream=True, extra_body={"ignore_eos": True})
        posters = []
        for chunk in stream:
            arrivals.append(time.perf_counter())
            if len(arrivals) == 10:
                posters = [threading.Thread(target=post, args=(body,)) for body in bodies]
                for t in posters:
                    t.start()
        for t in posters:
            t.join(120)
    gaps = sorted(b - a for a, b in zip(arrivals[1:], arrivals[2:]))  # after the first token (its prefill)
    median, largest = gaps[len(gaps) // 2], gaps[-1]
    print(f"inter-token gap: median {median * 1000:.1f} ms, largest {largest * 1000:.1f} ms ({largest / median:.2f}x)")
    assert len(arrivals) >= 60  # every token came (and the closing chunk)
    assert sorted(refused) == ["context_length_exceeded"] * len(sizes)
    assert largest <= 3 * median

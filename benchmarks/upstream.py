"""A fast OpenAI-compatible upstream for measuring a gateway: it replays
recorded tokens in vLLM's streaming format, as many concurrent streams as
asked, at a set per-stream token rate, cheaply enough not to be the limit.

    python benchmarks/upstream.py [--port 8100] [--rate 100]      # serve
    python benchmarks/upstream.py --ceiling                        # its own ceiling, clients reading it directly

Where the tokens come from: ``tests/fixtures/chat_stream.sse``, recorded from
llama.cpp's server serving the embedded SmolLM2 GGUF with ``top_logprobs: 20``
(``tests/fixtures/record.py``): each recorded token's text, logprob and 20 top
alternatives, cycled to any length. The chunks are re-shaped as vLLM sends
them (``vllm/entrypoints/openai/serving_chat.py`` and
``serving_completion.py``): chat chunks with ``delta`` and
``logprobs.content[{token, logprob, bytes, top_logprobs[20]}]`` and
``stop_reason``; completions chunks with ``text`` and ``logprobs`` {tokens,
token_logprobs, top_logprobs (a dict of 20), text_offset}; a first chat chunk
with the role; the last token's chunk with ``finish_reason: "length"``; a
usage chunk when ``stream_options.include_usage``; ``data: [DONE]``. Every
chunk is encoded once, at start-up.

Requests whose prompt (or last message) is ``"hold N"`` stream N tokens like
the others; ``GET /stats`` says which requests ran, finished, or were closed
by their client, by their prompt: a gateway's test can tell that exactly the
stopped request was closed upstream.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import threading
import time
from pathlib import Path
from typing import Any

FIXTURE = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "chat_stream.sse"
MODEL = "replay"


def recorded_tokens() -> list[tuple[str, float, list[tuple[str, float]]]]:
    """(text, logprob, 20 alternatives) of every recorded token."""
    out = []
    for line in FIXTURE.read_text().splitlines():
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        choice = json.loads(line[6:])["choices"][0]
        for entry in ((choice.get("logprobs") or {}).get("content") or []):
            out.append((entry["token"], entry["logprob"], [(t["token"], t["logprob"]) for t in entry["top_logprobs"]]))
    return out


def _data(value: Any) -> bytes:
    return b"data: " + json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


class Chunks:
    """Every chunk the replay sends, encoded once."""

    def __init__(self) -> None:
        self.tokens = recorded_tokens()
        created = int(time.time())
        chat = {"id": "chatcmpl-replay", "object": "chat.completion.chunk", "created": created, "model": MODEL}
        completion = {"id": "cmpl-replay", "object": "text_completion", "created": created, "model": MODEL}
        self.chat, self.chat_last, self.completion, self.completion_last = [], [], [], []
        for text, lp, top in self.tokens:
            entry = {"token": text, "logprob": lp, "bytes": list(text.encode()),
                     "top_logprobs": [{"token": t, "logprob": v, "bytes": list(t.encode())} for t, v in top]}
            for finish, out in ((None, self.chat), ("length", self.chat_last)):
                out.append(_data(chat | {"choices": [{"index": 0, "delta": {"content": text}, "logprobs": {"content": [entry]},
                                                      "finish_reason": finish, "stop_reason": None}]}))
            lps = {"tokens": [text], "token_logprobs": [lp], "top_logprobs": [dict(top)], "text_offset": [0]}
            for finish, out in ((None, self.completion), ("length", self.completion_last)):
                out.append(_data(completion | {"choices": [{"index": 0, "text": text, "logprobs": lps, "finish_reason": finish,
                                                            "stop_reason": None}], "usage": None}))
        self.role = _data(chat | {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                               "finish_reason": None}]})
        self.chat_usage = {"id": "chatcmpl-replay", "object": "chat.completion.chunk", "created": created, "model": MODEL, "choices": []}
        self.completion_usage = {"id": "cmpl-replay", "object": "text_completion", "created": created, "model": MODEL, "choices": []}

    def stream(self, chat: bool, n: int) -> list[bytes]:
        body, last = (self.chat, self.chat_last) if chat else (self.completion, self.completion_last)
        k = len(body)
        return ([self.role] if chat else []) + [body[i % k] for i in range(n - 1)] + [last[(n - 1) % k]]

    def usage(self, chat: bool, n: int) -> bytes:
        return _data((self.chat_usage if chat else self.completion_usage) | {"usage": {"prompt_tokens": 8, "completion_tokens": n,
                                                                                        "total_tokens": 8 + n}})


class Replay:
    """The ASGI application: ``rate`` tokens/s per stream (0: as fast as the client reads)."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.chunks = Chunks()
        self.started: list[str] = []
        self.finished: list[str] = []
        self.disconnected: list[str] = []
        self.sent: dict[str, list[float]] = {}  # each stream's send times (time.monotonic), for latency
        self.record_times = False

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        if scope["method"] == "GET" and scope["path"] == "/stats":
            body = json.dumps({"started": self.started, "finished": self.finished, "disconnected": self.disconnected,
                               "sent": self.sent}).encode()
            await _answer(send, 200, body)
            return
        if scope["method"] == "POST" and scope["path"] == "/reset":
            self.started, self.finished, self.disconnected, self.sent = [], [], [], {}
            self.record_times = True
            await _answer(send, 200, b"{}")
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        chat = scope["path"].endswith("/chat/completions")
        if not chat and not scope["path"].endswith("/completions"):
            await _answer(send, 404, b'{"error": {"message": "no such route", "type": "invalid_request_error"}}')
            return
        request = json.loads(body)
        if not request.get("stream"):
            await _answer(send, 400, b'{"error": {"message": "the replay upstream streams only", "type": "invalid_request_error"}}')
            return
        name = request["messages"][-1]["content"] if chat else request["prompt"]
        n = max(1, int(request.get("max_tokens") or 16))
        self.started.append(name)
        gone = asyncio.Event()

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            gone.set()

        watcher = asyncio.create_task(watch())
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        loop = asyncio.get_running_loop()
        due = loop.time()
        times = self.sent.setdefault(name, []) if self.record_times else None
        try:
            for chunk in self.chunks.stream(chat, n):
                if gone.is_set():
                    self.disconnected.append(name)
                    return
                if self.rate:
                    due += 1 / self.rate
                    delay = due - loop.time()
                    if delay > 0:
                        await asyncio.sleep(delay)
                if times is not None:
                    times.append(time.monotonic())
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            tail = (self.chunks.usage(chat, n) if (request.get("stream_options") or {}).get("include_usage") else b"") + b"data: [DONE]\n\n"
            await send({"type": "http.response.body", "body": tail, "more_body": False})
            self.finished.append(name)
        finally:
            watcher.cancel()


async def _answer(send: Any, status: int, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})


class ReplayServer:
    """The replay upstream on a loopback port, in a thread of this process
    (tests) or in its own process (benchmarks: ``python upstream.py``)."""

    def __init__(self, rate: float = 0.0, port: int = 0) -> None:
        import uvicorn

        self.app = Replay(rate)
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/v1"
        config = uvicorn.Config(self.app, http="httptools", lifespan="off", log_level="warning", access_log=False, backlog=2048,
                                timeout_keep_alive=30)
        self.server = uvicorn.Server(config)
        self._sock = sock
        self.thread = threading.Thread(target=lambda: asyncio.run(self.server.serve(sockets=[sock])), daemon=True)
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started and time.time() < deadline:
            time.sleep(0.01)

    def stats(self) -> dict[str, list[str]]:
        return {"started": list(self.app.started), "finished": list(self.app.finished), "disconnected": list(self.app.disconnected)}

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


async def _ceiling(url: str, streams: int, tokens: int) -> float:
    """Tokens/s of clients reading the upstream directly (aiohttp, one event loop)."""
    import aiohttp

    async def one(session: Any, i: int) -> int:
        body = {"model": MODEL, "prompt": f"stream {i}", "max_tokens": tokens, "stream": True, "logprobs": 20}
        n = 0
        async with session.post(url + "/completions", json=body) as r:
            async for line in r.content:
                n += line.startswith(b"data: {")
        return n

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        t = time.perf_counter()
        counts = await asyncio.gather(*(one(session, i) for i in range(streams)))
        return sum(counts) / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--port", type=int, default=8100)
    ap.add_argument("--rate", type=float, default=0.0, help="Tokens/s per stream (0: as fast as the client reads).")
    ap.add_argument("--ceiling", action="store_true", help="Measure the replay's own ceiling (unpaced, clients in this process) and exit.")
    args = ap.parse_args()
    if args.ceiling:
        server = ReplayServer(0.0, 0)
        try:
            for streams in (1, 16, 64):
                print(f"replay upstream, {streams:>3} streams read directly: {asyncio.run(_ceiling(server.url, streams, 2000)):>8.0f} tokens/s")
        finally:
            server.close()
        return
    server = ReplayServer(args.rate, args.port)
    print(f"replaying at {server.url} ({args.rate or 'unpaced'} tokens/s per stream); Ctrl-C stops", flush=True)
    try:
        server.thread.join()
    except KeyboardInterrupt:
        server.close()


if __name__ == "__main__":
    main()

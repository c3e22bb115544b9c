"""Server latency and throughput against an in-process baseline, from one run.

    python benchmarks/server.py [--tokens 32] [--clients 1,4,8]

Baseline: one generation in the same process through the Monitor (no
server, no websocket). Then a real `livepp serve` instance on an ephemeral
loopback port and N websocket clients at once, each asking for the same
number of greedy tokens. Printed: time to first token (median over clients)
and aggregate tokens/s, with the ratio to the baseline. The model runs one
forward pass at a time, so aggregate tokens/s cannot exceed the baseline;
the ratio shows what the server costs on top of that.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import threading
import time

from websockets.sync.client import connect

from livepp import Decoder, GenerationParams, Monitor, load_model
from livepp.serve.app import LiveppServer, ServerConfig, serve_forever

PROMPT = "Write a long story about a cat who learns to sail."


def baseline(decoder: Decoder, n: int) -> tuple[float, float]:
    ids = decoder.encode(PROMPT)
    t = time.perf_counter()
    first = None

    class FirstToken:
        def emit(self, e):
            nonlocal first
            if e.type == "token" and first is None:
                first = time.perf_counter() - t

    Monitor(sinks=[FirstToken()]).run(decoder.stream(ids, GenerationParams(max_new_tokens=n, ignore_eos=True)))
    return first, n / (time.perf_counter() - t)


def run_clients(port: int, clients: int, n: int) -> tuple[float, float]:
    ttft, done = [], []
    start = threading.Barrier(clients + 1)

    def client(i: int) -> None:
        with connect(f"ws://127.0.0.1:{port}/ws") as ws:
            start.wait()
            t = time.perf_counter()
            ws.send(json.dumps({"type": "generate", "id": str(i), "prompt": PROMPT, "params": {"max_new_tokens": n, "ignore_eos": True}}))
            while True:
                e = json.loads(ws.recv(timeout=600))
                if e["type"] == "token" and e["index"] == 0:
                    ttft.append(time.perf_counter() - t)
                if e["type"] == "end":
                    assert e["n_tokens"] == n
                    done.append(time.perf_counter())
                    return

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for th in threads:
        th.start()
    start.wait()
    t0 = time.perf_counter()
    for th in threads:
        th.join()
    return statistics.median(ttft), clients * n / (max(done) - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--clients", default="1,4,8")
    args = ap.parse_args()
    decoder = Decoder(load_model())
    baseline(decoder, 4)  # warm-up

    server = LiveppServer(decoder, ServerConfig(port=0))
    ready = threading.Event()
    holder: dict = {}

    async def serve() -> None:
        holder["loop"], holder["stop"] = asyncio.get_running_loop(), asyncio.Event()
        await serve_forever(server, ready=lambda p: (holder.__setitem__("port", p), ready.set()), stop=holder["stop"])

    thread = threading.Thread(target=lambda: asyncio.run(serve()), daemon=True)
    thread.start()
    ready.wait(60)

    b_ttft, b_tps = baseline(decoder, args.tokens)
    print(f"{args.tokens} greedy tokens per request, embedded model, loopback\n")
    print(f"  {'setup':<28} {'TTFT (median)':>14} {'aggregate tokens/s':>19} {'vs in-process':>14}")
    print(f"  {'in-process, 1 request':<28} {b_ttft * 1000:>11.0f} ms {b_tps:>19.1f} {1.0:>13.2f}x")
    for clients in [int(c) for c in args.clients.split(",")]:
        ttft, tps = run_clients(holder["port"], clients, args.tokens)
        print(f"  {f'server, {clients} client(s)':<28} {ttft * 1000:>11.0f} ms {tps:>19.1f} {tps / b_tps:>13.2f}x")
    holder["loop"].call_soon_threadsafe(holder["stop"].set)
    thread.join(30)


if __name__ == "__main__":
    main()

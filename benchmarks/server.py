"""Server latency and throughput against in-process batches, from one run.

    python benchmarks/server.py [--tokens 32] [--clients 1,4,8] [--engine torch|llama.cpp]

For each N: the in-process baseline decodes N monitored requests as one
batch (``stream_many``: no server, no websocket); then real `livepp serve`
instances on ephemeral loopback ports get N websocket clients at once, each
asking for the same number of greedy tokens: the continuous-batching server
(``--max-batch 8``) and the one-step-at-a-time server (``--max-batch 1``, the
FIFO runner). Printed: time to first token (median over requests) and
aggregate tokens/s, with the ratio to the in-process batch of the same size
and, for the batched server, to its own 1-client figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import threading
import time
from typing import Any

from websockets.sync.client import connect

from livepp import Decoder, GenerationParams, load_model, stream_many
from livepp.serve.app import LiveppServer, ServerConfig, serve_forever

PROMPT = "Write a long story about a cat who learns to sail."


def in_process(decoder: Any, clients: int, n: int) -> tuple[float, float]:
    """N requests as one in-process batch with full monitoring."""
    t = time.perf_counter()
    first: dict[int, float] = {}
    for sample, e in stream_many([PROMPT] * clients, model=decoder, params=GenerationParams(max_new_tokens=n, ignore_eos=True)):
        if e.type == "token" and sample not in first:
            first[sample] = time.perf_counter() - t
    return statistics.median(first.values()), clients * n / (time.perf_counter() - t)


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


class Served:
    """A real server in a thread, on an ephemeral port."""

    def __init__(self, decoder: Any, max_batch: int) -> None:
        self.server = LiveppServer(decoder, ServerConfig(port=0, max_batch=max_batch, max_queue=16))
        ready = threading.Event()

        async def serve() -> None:
            self.loop, self.stop_event = asyncio.get_running_loop(), asyncio.Event()
            await serve_forever(self.server, ready=lambda p: (setattr(self, "port", p), ready.set()), stop=self.stop_event)

        self.thread = threading.Thread(target=lambda: asyncio.run(serve()), daemon=True)
        self.thread.start()
        ready.wait(60)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.stop_event.set)
        self.thread.join(30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--clients", default="1,4,8")
    ap.add_argument("--engine", choices=["torch", "llama.cpp"], default="torch")
    args = ap.parse_args()
    if args.engine == "llama.cpp":
        from livepp.engines.llamacpp import LlamaCppEngine

        # A served llama.cpp engine belongs to its server's scheduler: one each.
        decoder, for_batched, for_fifo = LlamaCppEngine(), LlamaCppEngine(), LlamaCppEngine()
    else:
        decoder = for_batched = for_fifo = Decoder(load_model())
    in_process(decoder, 2, 4)  # warm-up
    batched, fifo = Served(for_batched, 8), Served(for_fifo, 1)
    run_clients(batched.port, 2, 4)  # warm-up

    print(f"{args.tokens} greedy tokens per request, embedded model on the {args.engine} engine, loopback, full monitoring everywhere\n")
    print(f"  {'setup':<34} {'TTFT (median)':>14} {'aggregate tokens/s':>19} {'vs in-process batch':>20} {'vs 1 client':>12}")
    one: tuple[float, float] | None = None
    for clients in [int(c) for c in args.clients.split(",")]:
        b_ttft, b_tps = in_process(decoder, clients, args.tokens)
        ttft, tps = run_clients(batched.port, clients, args.tokens)
        f_ttft, f_tps = run_clients(fifo.port, clients, args.tokens)
        one = one or (ttft, tps)
        print(f"  {f'in-process batch of {clients}':<34} {b_ttft * 1000:>11.0f} ms {b_tps:>19.1f} {1.0:>19.2f}x {'':>12}")
        print(f"  {f'server, continuous batch, {clients} cl.':<34} {ttft * 1000:>11.0f} ms {tps:>19.1f} {tps / b_tps:>19.2f}x "
              f"{tps / one[1]:>11.2f}x  (TTFT {ttft / one[0]:.2f}x)")
        print(f"  {f'server, --max-batch 1, {clients} cl.':<34} {f_ttft * 1000:>11.0f} ms {f_tps:>19.1f} {f_tps / b_tps:>19.2f}x {'':>12}")
    batched.stop()
    fifo.stop()


if __name__ == "__main__":
    main()

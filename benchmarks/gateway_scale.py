"""The gateway at a GPU engine's scale, from one run: aggregate tokens/s of
1, 16, 64 and 256 concurrent streams read through one `livepp serve --remote`
process (full monitoring: tracker, a policy, statistics in every chunk, the
live list, /metrics) in front of the replay upstream (benchmarks/upstream.py),
against the same clients reading the upstream directly.

    python benchmarks/gateway_scale.py [--tokens 400] [--streams 1,16,64,256] [--workers 1] [--baseline DIR]

Printed per level: tokens/s direct and through the gateway (and the
ratio), the gateway's CPU per token (from /proc), its resident memory, and the
latency: each token's arrival at the client minus its send time at the
upstream (one monotonic clock), p50 and p99 over the tokens after each
stream's first, and over the first tokens (which include opening the
upstream request), through the gateway and direct. Throughput runs unpaced (the upstream sends as fast as it
is read); latency runs paced (``--rate`` tokens/s per stream).

Keeping the gateway's core its own on a 2-core machine: the gateway process is
pinned to CPU 0, the upstream and the clients (this process) to CPU 1
(``os.sched_setaffinity``); with ``--workers 2`` the workers get CPU 0 and 1
and the upstream and clients run beside them (so that figure includes their
cost). ``--baseline DIR`` runs another checkout's gateway (e.g. a git worktree
of an older commit) on the same levels.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TICK = os.sysconf("SC_CLK_TCK")
MODEL = "replay"


def cpu_seconds(pid: int) -> float:
    total = 0.0
    for p in [pid, *_children(pid)]:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / TICK
        except OSError:
            pass
    return total


def rss_mb(pid: int) -> float:
    total = 0.0
    for p in [pid, *_children(pid)]:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) / 1024
        except OSError:
            pass
    return total


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for t in Path(f"/proc/{pid}/task").iterdir() for c in (t / "children").read_text().split()]
    except OSError:
        return []


def pinned(cpu: int | None) -> dict:
    if cpu is None or not hasattr(os, "sched_setaffinity") or os.cpu_count() < 2:
        return {}
    return {"preexec_fn": lambda: os.sched_setaffinity(0, {cpu})}


def start(args: list[str], checkout: Path, cpu: int | None, marker: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, *args], stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=checkout,
                            env=os.environ | {"PYTHONPATH": str(checkout), "PYTHONUNBUFFERED": "1"}, **pinned(cpu))
    found: list[str] = []

    def read(stream) -> None:
        for line in stream:
            if marker in line and not found:
                found.append(line)

    for stream in (proc.stderr, proc.stdout):
        threading.Thread(target=read, args=(stream,), daemon=True).start()
    deadline = time.time() + 120
    while not found:
        if proc.poll() is not None or time.time() > deadline:
            raise SystemExit(f"{args[:3]} did not start")
        time.sleep(0.05)
    return proc, found[0]


async def read_streams(base: str, streams: int, tokens: int) -> tuple[int, float, dict[str, list[float]]]:
    """(tokens read, seconds, each stream's arrival times) of ``streams`` concurrent completions."""
    import aiohttp

    arrivals: dict[str, list[float]] = {}
    refused: list[int] = []

    async def one(session, i: int) -> int:
        name = f"s{i}"
        times = arrivals.setdefault(name, [])
        body = {"model": MODEL, "prompt": name, "max_tokens": tokens, "stream": True, "temperature": 0}
        async with session.post(base + "/completions", json=body) as r:
            if r.status != 200:
                refused.append(r.status)  # e.g. a gateway whose running-request cap is below this level
                return 0
            async for line in r.content:
                if line.startswith(b"data: {"):
                    times.append(time.monotonic())
        return len(times)

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        t = time.perf_counter()
        counts = await asyncio.gather(*(one(session, i) for i in range(streams)))
        if refused:
            print(f"  ({len(refused)} of {streams} requests refused: HTTP {sorted(set(refused))})")
        return sum(counts), time.perf_counter() - t, arrivals


def post(url: str, body: dict | None = None) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body or {}).encode(), headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def latency(upstream_root: str, arrivals: dict[str, list[float]]) -> tuple[list[float], list[float]]:
    """(each token's delay after the first, each stream's first token's delay):
    its arrival at the client minus its send time at the upstream."""
    with urllib.request.urlopen(upstream_root + "/stats", timeout=30) as r:
        sent = json.loads(r.read())["sent"]
    tokens, first = [], []
    for name, times in arrivals.items():
        delays = [a - s for a, s in zip(times, sent.get(name, []))]
        first += delays[:1]
        tokens += delays[1:]
    return tokens, first


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=400, help="Tokens per stream.")
    ap.add_argument("--streams", default="1,16,64,256")
    ap.add_argument("--rate", type=float, default=50.0, help="Tokens/s per stream in the latency runs.")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--baseline", type=Path, metavar="DIR", help="Another livepp checkout whose gateway runs the same levels.")
    args = ap.parse_args()
    if hasattr(os, "sched_setaffinity") and os.cpu_count() >= 2:
        os.sched_setaffinity(0, {1})  # the clients share CPU 1 with the upstream
    gateway_cpu = 0 if args.workers == 1 else None
    levels = [int(s) for s in args.streams.split(",")]
    fast, fast_line = start([str(HERE / "upstream.py"), "--port", "0", "--rate", "0"], ROOT, 1, "replaying at")
    paced, paced_line = start([str(HERE / "upstream.py"), "--port", "0", "--rate", str(args.rate)], ROOT, 1, "replaying at")
    procs = [fast, paced]
    try:
        fast_url = fast_line.split("replaying at ")[1].split(" ")[0]
        paced_url = paced_line.split("replaying at ")[1].split(" ")[0]
        gateways = {}
        for label, checkout in [("this checkout", ROOT)] + ([("baseline", args.baseline.resolve())] if args.baseline else []):
            extra = ["--max-jobs", "1024", "--max-connections", "1024"] if label == "this checkout" else []
            if args.workers > 1 and label == "this checkout":
                extra += ["--workers", str(args.workers)]
            pair = {}
            for kind, url in (("fast", fast_url), ("paced", paced_url)):
                proc, line = start(["-m", "livepp", "serve", "--remote", url, "--remote-model", MODEL, "--port", "0",
                                    "--policy", "early-stop:threshold=1e9,metric=window_ppl", *extra], checkout, gateway_cpu, "serving")
                procs.append(proc)
                pair[kind] = (proc, int(line.split(" on http://127.0.0.1:")[1].split("/")[0]))
            gateways[label] = pair
        asyncio.run(read_streams(fast_url, 4, 50))  # warm-up
        for pair in gateways.values():
            asyncio.run(read_streams(f"http://127.0.0.1:{pair['fast'][1]}/v1", 4, 50))
        print(f"{args.tokens} tokens per stream, completions with 20 top logprobs per token (vLLM's format); gateway pinned to CPU 0, "
              f"upstream and clients to CPU 1; {args.workers} worker(s)\n")
        print(f"  {'streams':>7} {'setup':<28} {'tokens/s':>9} {'vs direct':>9} {'gateway CPU µs/token':>21} {'RSS MB':>7} "
              f"{'token latency p50 ms':>21} {'p99 ms':>7} {'first token p50 ms':>19} {'p99 ms':>7}")
        for n in levels:
            got, secs, _ = asyncio.run(read_streams(fast_url, n, args.tokens))
            direct = got / secs
            post(paced_url[:-3] + "/reset")
            _, _, arrivals = asyncio.run(read_streams(paced_url, n, min(args.tokens, 200)))
            lat, first = latency(paced_url[:-3], arrivals)
            print(f"  {n:>7} {'direct':<28} {direct:>9.0f} {'1.00x':>9} {'':>21} {'':>7} {pct(lat, .5) * 1e3:>21.2f} {pct(lat, .99) * 1e3:>7.2f} "
                  f"{pct(first, .5) * 1e3:>19.2f} {pct(first, .99) * 1e3:>7.2f}")
            for label, pair in gateways.items():
                proc, port = pair["fast"]
                cpu0 = cpu_seconds(proc.pid)
                got, secs, _ = asyncio.run(read_streams(f"http://127.0.0.1:{port}/v1", n, args.tokens))
                cpu = (cpu_seconds(proc.pid) - cpu0) / max(got, 1)
                rss = rss_mb(proc.pid)
                post(paced_url[:-3] + "/reset")
                _, _, arrivals = asyncio.run(read_streams(f"http://127.0.0.1:{pair['paced'][1]}/v1", n, min(args.tokens, 200)))
                lat, first = latency(paced_url[:-3], arrivals)
                print(f"  {n:>7} {'through ' + label:<28} {got / secs:>9.0f} {got / secs / direct:>8.2f}x {cpu * 1e6:>21.0f} {rss:>7.0f} "
                      f"{pct(lat, .5) * 1e3:>21.2f} {pct(lat, .99) * 1e3:>7.2f} {pct(first, .5) * 1e3:>19.2f} {pct(first, .99) * 1e3:>7.2f}")
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


if __name__ == "__main__":
    main()

"""Monitoring overhead on a remote stream, from one run.

    python benchmarks/remote.py [--tokens 128] [--repeats 3] [--url URL --model NAME]

Without --url it starts llama.cpp's server (llama-cpp-python[server]) on a
loopback port with the embedded GGUF file. Baseline: the raw SSE stream read
and JSON-decoded line by line, counting tokens (what any client must do).
livepp: the same request through OpenAIEngine with the tracker, an EarlyStop
policy that never fires and JSON serialisation of every event. Interleaved,
best of N; prints tokens/s of both and the overhead.
"""

from __future__ import annotations

import argparse
import http.client
import json
import contextlib
import tempfile
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

from livepp import EarlyStop, GenerationParams, Monitor
from livepp.engines.remote import OpenAIEngine
from livepp.core.sinks import event_json

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from llama_server import llama_server  # noqa: E402

PROMPT = "Write a long story about a cat who learns to sail."


def timed(fn, *args) -> tuple[float, float]:
    """(tokens/s, client CPU seconds per token) of one run."""
    cpu = time.process_time()
    tps, count = fn(*args)
    return tps, (time.process_time() - cpu) / count


def raw_stream(url: str, model: str, n: int) -> tuple[float, int]:
    source = OpenAIEngine(url, model)
    body = source.request_body(PROMPT, GenerationParams(max_new_tokens=n, ignore_eos=True))
    u = urlsplit(url)
    t = time.perf_counter()
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=120)
    conn.request("POST", u.path + "/chat/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    count = 0
    for line in resp:
        if line.startswith(b"data:") and line.strip() != b"data: [DONE]":
            chunk = json.loads(line[5:])
            for choice in chunk.get("choices", []):
                count += len((choice.get("logprobs") or {}).get("content") or [])
    conn.close()
    return count / (time.perf_counter() - t), count


class Serialise:
    def emit(self, e) -> None:
        event_json(e)


def monitored(url: str, model: str, n: int) -> tuple[float, int]:
    t = time.perf_counter()
    result = Monitor(policies=[EarlyStop(1e9)], sinks=[Serialise()], keep_events=False).run(
        OpenAIEngine(url, model).open(PROMPT, GenerationParams(max_new_tokens=n, ignore_eos=True)))
    return result.end.n_tokens / (time.perf_counter() - t), result.end.n_tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--url")
    ap.add_argument("--model", default="smollm2")
    args = ap.parse_args()
    with contextlib.ExitStack() as stack:
        url = args.url or stack.enter_context(llama_server(Path(tempfile.mkdtemp()) / "llama-server.log"))
        raw_stream(url, args.model, 8)  # warm-up
        best_raw = best_mon = 0.0
        cpu_raw, cpu_mon = [], []
        for _ in range(args.repeats):
            tps, cpu = timed(raw_stream, url, args.model, args.tokens)
            best_raw, _ = max(best_raw, tps), cpu_raw.append(cpu)
            tps, cpu = timed(monitored, url, args.model, args.tokens)
            best_mon, _ = max(best_mon, tps), cpu_mon.append(cpu)
        raw_ms, mon_ms = 1000 * min(cpu_raw), 1000 * min(cpu_mon)
        interval_ms = 1000 / best_raw
        print(f"{url}, {args.tokens} tokens with top-20 logprobs, best of {args.repeats}")
        print(f"  {'':<34} {'tokens/s':>9} {'client CPU/token':>17}")
        print(f"  {'raw stream (read + JSON decode)':<34} {best_raw:9.1f} {raw_ms:14.2f} ms")
        print(f"  {'livepp monitored':<34} {best_mon:9.1f} {mon_ms:14.2f} ms")
        print(f"  wall-clock overhead               {100 * (1 - best_mon / best_raw):6.1f}%   (engine speed varies run to run)")
        print(f"  livepp's extra client CPU         {100 * (mon_ms - raw_ms) / interval_ms:6.2f}% of each token's interval   (target <= 3%)")


if __name__ == "__main__":
    main()

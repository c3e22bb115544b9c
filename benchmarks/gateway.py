"""What the livepp gateway adds to each streamed token, from one run.

    python benchmarks/gateway.py [--tokens 128] [--repeats 5] [--baseline DIR]

Starts llama.cpp's OpenAI-compatible server (llama-cpp-python[server]) with
the embedded GGUF file, and `livepp serve --remote` in front of it in its own
process. The official `openai` SDK streams the same greedy chat request:

* direct, the request the gateway sends upstream (logprobs, top 20: what
  monitoring needs), the baseline;
* through the gateway (the client asks for no logprobs; the gateway still
  monitors every token: tracker, an early-stop policy that never fires,
  livepp statistics in every chunk);
* direct without logprobs, for context (what the upstream costs without them);
* with ``--baseline DIR`` (another livepp checkout, e.g. a git worktree of
  an older commit), through that checkout's gateway too.

Runs are interleaved; each figure is the median over the repeats. Printed
per setup: client-side decode tokens/s (first to last token), the token
interval, and CPU per token of the client, the gateway and the upstream
process (from /proc). The verdict: how much longer a token's interval is
through the gateway than direct with the same upstream request.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import openai

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from llama_server import MODEL_ALIAS, llama_server  # noqa: E402

PROMPT = "Write a long story about a cat who learns to sail."
TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime + stime


def start_gateway(url: str, checkout: Path) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen([sys.executable, "-c", "from livepp.cli.main import main; main()", "serve", "--port", "0",
                             "--remote", url, "--remote-model", MODEL_ALIAS, "--policy", "early-stop:threshold=1e9,metric=window_ppl"],
                            stderr=subprocess.PIPE, text=True, env=os.environ | {"PYTHONPATH": str(checkout)}, cwd=checkout)
    found: list[int] = []

    def read() -> None:
        for line in proc.stderr:  # type: ignore[union-attr]
            if "serving" in line and not found:
                found.append(int(line.split(" on http://127.0.0.1:")[-1].split("/")[0]))

    threading.Thread(target=read, daemon=True).start()
    deadline = time.time() + 120
    while not found:
        if proc.poll() is not None or time.time() > deadline:
            raise SystemExit("the livepp gateway did not start")
        time.sleep(0.1)
    return proc, found[0]


def run(client: openai.OpenAI, tokens: int, logprobs: bool, pids: dict[str, int]) -> dict[str, float]:
    kwargs = {"logprobs": True, "top_logprobs": 20} if logprobs else {}
    cpu0 = {name: cpu_seconds(pid) for name, pid in pids.items()}
    client_cpu = time.process_time()
    stamps: list[float] = []
    for chunk in client.chat.completions.create(model=MODEL_ALIAS, messages=[{"role": "user", "content": PROMPT}], max_tokens=tokens,
                                                temperature=0, top_p=1.0, stream=True, **kwargs):
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        extra = choice.model_extra.get("livepp") or {}
        if "index" in extra or (choice.logprobs and choice.logprobs.content) or (not extra and not logprobs and choice.delta.content):
            stamps.append(time.perf_counter())
    n = len(stamps)
    out = {"tokens": n, "tps": (n - 1) / (stamps[-1] - stamps[0]), "client_cpu": (time.process_time() - client_cpu) / n}
    for name, pid in pids.items():
        out[name + "_cpu"] = (cpu_seconds(pid) - cpu0[name]) / n
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--baseline", type=Path, metavar="DIR", help="Another livepp checkout whose gateway runs beside this one's.")
    args = ap.parse_args()
    log = Path(os.environ.get("TMPDIR", "/tmp")) / "livepp-bench-llama.log"
    with llama_server(log) as url:
        upstream_pid = int(subprocess.check_output(["pgrep", "-n", "-f", "llama_cpp.server"]).strip())
        gateway, port = start_gateway(url, Path(__file__).resolve().parent.parent)
        gateways = [gateway]
        try:
            direct = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600)
            through = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=600)
            pids = {"gateway": gateway.pid, "upstream": upstream_pid}
            paths = {"direct, logprobs top 20 (baseline)": (direct, True, pids), "through the livepp gateway": (through, False, pids)}
            if args.baseline is not None:
                old, old_port = start_gateway(url, args.baseline.resolve())
                gateways.append(old)
                old_client = openai.OpenAI(base_url=f"http://127.0.0.1:{old_port}/v1", api_key="unused", max_retries=0, timeout=600)
                paths["through the baseline checkout's gateway"] = (old_client, False, {"gateway": old.pid, "upstream": upstream_pid})
            paths["direct, no logprobs"] = (direct, False, pids)
            for client, logprobs, p in paths.values():
                run(client, 8, logprobs, p)  # warm every path up
            results: dict[str, list[dict[str, float]]] = {name: [] for name in paths}
            for r in range(args.repeats):
                for name, (client, logprobs, p) in paths.items():
                    results[name].append(run(client, args.tokens, logprobs, p))
                print(f"repeat {r + 1}/{args.repeats} done", file=sys.stderr, flush=True)
        finally:
            for g in gateways:
                g.terminate()
                g.wait(30)

    def med(rows: list[dict[str, float]], key: str) -> float:
        return statistics.median(row[key] for row in rows)

    print(f"openai SDK streaming {args.tokens} greedy tokens of one chat request, median of {args.repeats} interleaved runs\n")
    print(f"{'setup':<38} {'tokens':>6} {'tokens/s':>9} {'interval ms':>12} {'client CPU ms/tok':>18} {'gateway CPU ms/tok':>19} {'upstream CPU ms/tok':>20}")
    for name, rows in results.items():
        gw = med(rows, "gateway_cpu") * 1e3 if name.startswith("through") else 0.0
        print(f"{name:<38} {med(rows, 'tokens'):>6.0f} {med(rows, 'tps'):>9.1f} {1e3 / med(rows, 'tps'):>12.2f} "
              f"{med(rows, 'client_cpu') * 1e3:>18.3f} {gw:>19.3f} {med(rows, 'upstream_cpu') * 1e3:>20.3f}")
    base, gate = results["direct, logprobs top 20 (baseline)"], results["through the livepp gateway"]
    ratios = [b["tps"] / g["tps"] - 1 for b, g in zip(base, gate)]
    interval = 1 / med(base, "tps")
    print(f"\nthe gateway adds {100 * statistics.median(ratios):+.1f}% to each token's interval (median of per-repeat ratios; "
          f"ratio of medians {100 * (med(base, 'tps') / med(gate, 'tps') - 1):+.1f}%; target <= 3%)")
    print(f"gateway CPU per token: {med(gate, 'gateway_cpu') * 1e3:.3f} ms = {100 * med(gate, 'gateway_cpu') / interval:.1f}% of the direct interval")
    old_rows = results.get("through the baseline checkout's gateway")
    if old_rows:
        added = [b["tps"] / g["tps"] - 1 for b, g in zip(base, old_rows)]
        print(f"the baseline checkout's gateway adds {100 * statistics.median(added):+.1f}% to each token's interval; its CPU per token "
              f"{med(old_rows, 'gateway_cpu') * 1e3:.3f} ms (this checkout / baseline: {med(gate, 'gateway_cpu') / med(old_rows, 'gateway_cpu'):.2f}x)")


if __name__ == "__main__":
    main()

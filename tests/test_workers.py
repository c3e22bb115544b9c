"""`livepp serve --remote ... --workers 2`: two gateway processes on one
port; /metrics adds up both workers' tokens, /status lists both workers'
live requests."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from upstream import MODEL, ReplayServer  # noqa: E402


@pytest.fixture
def workers():
    replay = ReplayServer(rate=40)
    proc = subprocess.Popen([sys.executable, "-m", "livepp", "serve", "--remote", replay.url, "--remote-model", MODEL, "--port", "0",
                             "--workers", "2"], stderr=subprocess.PIPE, text=True, env=os.environ | {"PYTHONUNBUFFERED": "1"})
    try:
        line = proc.stderr.readline()
        assert "2 gateway workers" in line, line
        yield int(line.split(" on http://127.0.0.1:")[1].split("/")[0]), replay
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        replay.close()
    assert proc.returncode == 0


def get(port: int, path: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
        return r.read().decode()


async def stream(port: int, i: int, tokens: int) -> int:
    import aiohttp

    body = {"model": MODEL, "prompt": f"stream {i}", "max_tokens": tokens, "stream": True}
    n = 0
    async with aiohttp.ClientSession() as session:  # a connection each: the kernel spreads them over the workers
        async with session.post(f"http://127.0.0.1:{port}/v1/completions", json=body) as r:
            async for line in r.content:
                if line.startswith(b"data: {"):
                    chunk = json.loads(line[6:])
                    n += bool(chunk["choices"] and "token_id" in (chunk["choices"][0].get("livepp") or {}))
    return n


def test_two_workers_share_metrics_and_status(workers):
    port, replay = workers
    seen_workers: set[int] = set()

    async def run() -> list[int]:
        tasks = [asyncio.create_task(stream(port, i, 80)) for i in range(16)]
        while not all(t.done() for t in tasks):
            status = await asyncio.to_thread(get, port, "/status")
            seen_workers.update(r["worker"] for r in json.loads(status)["requests"])
            await asyncio.sleep(0.2)
        return [t.result() for t in tasks]

    counts = asyncio.run(run())
    assert counts == [80] * 16
    assert len(seen_workers) == 2  # both workers served requests, and each one's /status showed the other's too
    families = {f.name: f for f in text_string_to_metric_families(get(port, "/metrics"))}
    total = sum(s.value for s in families["livepp_tokens_generated"].samples if s.name.endswith("_total"))
    assert total == 16 * 80
    ended = sum(s.value for s in families["livepp_requests"].samples if s.name.endswith("_total"))
    assert ended == 16

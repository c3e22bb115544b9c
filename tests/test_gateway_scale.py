"""The gateway at a GPU engine's scale: 64 concurrent streams through one
`livepp serve --remote` in front of the replay upstream (recorded tokens in
vLLM's format, benchmarks/upstream.py). Every client's tokens and statistics
equal a direct monitored run of the same stream; a policy stop or a client
leaving closes exactly that upstream request."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

import pytest

from livepp.core.events import to_json_dict
from livepp.core.monitor import Monitor
from livepp.core.params import GenerationParams
from livepp.core.policies import parse_policy
from livepp.engines.remote import OpenAIEngine
from test_server import RunningServer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from upstream import MODEL, ReplayServer  # noqa: E402

TOKENS = 40
STATS = ("logprob", "ppl", "window_ppl", "mean_nll", "confidence", "group_confidence", "surprise_z")
STOP = "early-stop:threshold=1.0001,metric=ppl,min_tokens=3"


@pytest.fixture(scope="module")
def replay():
    server = ReplayServer(rate=200)
    yield server
    server.close()


@pytest.fixture(scope="module")
def gateway(replay):
    s = RunningServer(OpenAIEngine(replay.url, MODEL, vocab_size=49152), max_running_jobs=128, max_connections=128)
    yield s
    s.stop()


def direct(replay, prompt: str, policies=()) -> list[dict]:
    """The same stream read by livepp directly, monitored: the reference."""
    stream = OpenAIEngine(replay.url, MODEL, vocab_size=49152).open(prompt, GenerationParams(max_new_tokens=TOKENS, temperature=0.0))
    result = Monitor(policies=[parse_policy(p) for p in policies]).run(stream)
    return [to_json_dict(t) for t in result.tokens], result.end


async def client(port: int, prompt: str, *, policies=(), leave_after: int | None = None, tokens: int = TOKENS) -> list[dict]:
    import aiohttp

    body = {"model": MODEL, "messages": [{"role": "user", "content": prompt}], "max_tokens": tokens, "temperature": 0, "stream": True,
            "livepp": {"policies": list(policies)}}
    stats = []
    async with aiohttp.ClientSession() as session:
        async with session.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body) as r:
            assert r.status == 200, await r.text()
            async for line in r.content:
                if not line.startswith(b"data: {"):
                    continue
                chunk = json.loads(line[6:])
                extra = (chunk["choices"][0].get("livepp") or {}) if chunk["choices"] else {}
                if "index" in extra:
                    stats.append(extra)
                elif "n_tokens" in extra:
                    stats.append({"end": extra})
                if leave_after is not None and len(stats) == leave_after:
                    return stats  # the response is closed: the client leaves
    return stats


def test_64_streams_each_equal_a_direct_run_and_a_stop_closes_only_its_upstream_request(replay, gateway):
    prompts = [f"stream {i}" for i in range(64)]

    async def all_clients():
        # The stopped and the abandoned streams are long (5 s upstream): their upstream requests can only end by being closed.
        jobs = [client(gateway.port, p, policies=[STOP] if p == "stream 7" else (), leave_after=5 if p == "stream 9" else None,
                       tokens=1000 if p in ("stream 7", "stream 9") else TOKENS) for p in prompts]
        return await asyncio.gather(*jobs)

    started = time.perf_counter()
    results = dict(zip(prompts, asyncio.run(all_clients())))
    took = time.perf_counter() - started
    want, want_end = direct(replay, "reference")
    for prompt, got in results.items():
        if prompt in ("stream 7", "stream 9"):
            continue
        tokens, end = got[:-1], got[-1]["end"]
        assert len(tokens) == TOKENS == len(want) and end["reason"] == "length" and end["n_tokens"] == TOKENS, prompt
        for g, w in zip(tokens, want):
            for name in STATS:
                assert (g[name] is None) == (w[name] is None) and (g[name] is None or abs(g[name] - w[name]) <= 1e-9 * max(1, abs(w[name]))), (prompt, name)
            assert g["entropy_bounds"] == pytest.approx(w["entropy_bounds"], rel=1e-12) and g["tail_mass"] == pytest.approx(w["tail_mass"], rel=1e-12)
        assert end["ppl"] == pytest.approx(want_end.ppl, rel=1e-12)
    stopped = results["stream 7"]
    assert stopped[-1]["end"]["reason"] == "policy" and stopped[-1]["end"]["n_tokens"] == 3
    deadline = time.time() + 10
    while time.time() < deadline and not {"stream 7", "stream 9"} <= set(replay.stats()["disconnected"]):
        time.sleep(0.05)
    stats = replay.stats()
    assert sorted(stats["disconnected"]) == ["stream 7", "stream 9"]  # exactly those two upstream requests were closed
    assert sorted(stats["finished"]) == sorted(["reference", *(p for p in prompts if p not in ("stream 7", "stream 9"))])
    assert took < TOKENS / 200 * 20  # 64 streams at 200 tokens/s each ran concurrently, not one after another
    assert not gateway.server.jobs

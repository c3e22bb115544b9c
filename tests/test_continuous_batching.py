"""Continuous batching in `livepp serve`: a real server on an ephemeral port,
real websocket clients, the real embedded model."""

from __future__ import annotations

import json
import threading
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.sync.client import connect

from livepp.core.monitor import Monitor
from livepp.core.params import GenerationParams
from livepp.engines.torch.engine import TorchEngine
from test_server import RunningServer, events_until_end, send

pytestmark = pytest.mark.model

PROMPTS = ["Tell me about owls.", "What is 2+2?", "Write a haiku about rain.", "Name three colours.",
           "Why is the sky blue? Explain it to a child in a few words.", "Count to five.", "Say hello in French.", "What is a prime number?"]


def alone(decoder, prompt: str, params: dict) -> tuple[list[int], list[float]]:
    r = Monitor().run(TorchEngine(decoder).open(prompt, GenerationParams.from_dict(params)))
    return r.token_ids, [t.logprob for t in r.tokens]


def client(url: str, request_id: str, prompt: str, params: dict, out: dict, start: threading.Event | None = None) -> None:
    with connect(url) as ws:
        if start is not None:
            start.wait(30)
        send(ws, type="generate", id=request_id, prompt=prompt, params=params)
        out[request_id] = events_until_end(ws, request_id, timeout=300)


def tokens(events: list[dict]) -> tuple[list[int], list[float]]:
    toks = [e for e in events if e["type"] == "token"]
    return [e["token_id"] for e in toks], [e["logprob"] for e in toks]


def clients_at_once(url: str, prompts: list[str], params: list[dict], timeout: float = 300) -> dict:
    """Each prompt from its own websocket client, all sent together once
    every client is connected; every client's events by id c0, c1, ..."""
    out: dict = {}
    start = threading.Event()
    threads = [threading.Thread(target=client, args=(url, f"c{i}", p, q, out, start)) for i, (p, q) in enumerate(zip(prompts, params))]
    for t in threads:
        t.start()
    time.sleep(0.5)
    start.set()
    for t in threads:
        t.join(timeout)
    return out


def test_eight_clients_each_equal_their_request_run_alone(decoder):
    s = RunningServer(decoder, max_batch=8)
    params = [{"max_new_tokens": 20, "ignore_eos": True} if i % 2 == 0 else
              {"max_new_tokens": 20, "ignore_eos": True, "temperature": 0.8, "seed": 10 + i} for i in range(8)]
    try:
        out = clients_at_once(s.url, PROMPTS[:8], params)
        scheduler = s.server.scheduler
        assert scheduler.peak_batch >= 6, "the requests should have shared forward passes"
        assert scheduler.forward_passes < 8 * 20 / 3
    finally:
        s.stop()
    for i in range(8):
        got_ids, got_lps = tokens(out[f"c{i}"])
        want_ids, want_lps = alone(decoder, PROMPTS[i], params[i])
        assert got_ids == want_ids, f"client {i}"
        assert max(abs(a - b) for a, b in zip(got_lps, want_lps)) <= 1e-4
        assert out[f"c{i}"][-1]["type"] == "end" and out[f"c{i}"][-1]["reason"] == "length"


def test_a_request_joins_a_running_batch_and_a_cancel_leaves_the_others_unchanged(decoder):
    s = RunningServer(decoder, max_batch=8)
    params = {"max_new_tokens": 40, "ignore_eos": True}
    first_token_at: dict[str, float] = {}
    end_at: dict[str, float] = {}
    events: dict[str, list] = {k: [] for k in ("a", "b", "c", "late")}
    try:
        with connect(s.url) as ws:
            for k, prompt in zip("abc", PROMPTS):
                send(ws, type="generate", id=k, prompt=prompt, params=params)
            late_sent = False
            while len(end_at) < 4:
                e = json.loads(ws.recv(timeout=120))
                k = e.get("id")
                events[k].append(e)
                if e["type"] == "token":
                    first_token_at.setdefault(k, time.perf_counter())
                    if k == "a" and e["index"] == 4 and not late_sent:
                        send(ws, type="generate", id="late", prompt=PROMPTS[3], params={"max_new_tokens": 8, "ignore_eos": True})
                        late_sent = True
                    if k == "b" and e["index"] == 10:
                        send(ws, type="cancel", id="b")
                if e["type"] == "end":
                    end_at[k] = time.perf_counter()
    finally:
        s.stop()
    assert first_token_at["late"] < min(end_at[k] for k in "abc"), "the late request waited for the batch to drain"
    assert events["b"][-1]["reason"] == "cancelled" and events["b"][-1]["n_tokens"] <= 13
    for k, prompt in (("a", PROMPTS[0]), ("c", PROMPTS[2]), ("late", PROMPTS[3])):
        p = params if k != "late" else {"max_new_tokens": 8, "ignore_eos": True}
        got_ids, got_lps = tokens(events[k])
        want_ids, want_lps = alone(decoder, prompt, p)
        assert got_ids == want_ids and max(abs(x - y) for x, y in zip(got_lps, want_lps)) <= 1e-4


def metrics(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics") as r:
        text = r.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def test_queue_busy_health_and_metrics_at_max_batch_2(decoder):
    s = RunningServer(decoder, max_batch=2, max_queue=2, max_requests_per_connection=8)
    long = {"max_new_tokens": 40, "ignore_eos": True}
    try:
        with connect(s.url) as ws:
            for i in range(4):
                send(ws, type="generate", id=f"r{i}", prompt=PROMPTS[i], params=long)
                time.sleep(0.05)
            send(ws, type="generate", id="r4", prompt=PROMPTS[4], params=long)
            seen: dict[str, list] = {f"r{i}": [] for i in range(5)}
            health = None
            while True:
                e = json.loads(ws.recv(timeout=120))
                seen[e["id"]].append(e)
                if health is None and sum(x["type"] == "token" for x in seen["r0"]) == 3:
                    with urllib.request.urlopen(f"http://127.0.0.1:{s.port}/healthz") as r:
                        health = json.loads(r.read())
                if all(seen[f"r{i}"] and seen[f"r{i}"][-1]["type"] in ("end", "error") for i in range(5)):
                    break
            # a short request after the rush, to check the counters
            send(ws, type="generate", id="r5", prompt=PROMPTS[5], params={"max_new_tokens": 5, "ignore_eos": True})
            seen["r5"] = events_until_end(ws, "r5")
        m = metrics(s.port)
    finally:
        s.stop()
    assert [e["type"] for e in seen["r4"]] == ["error"] and seen["r4"][0]["code"] == "busy"
    assert [(e["type"], e["position"]) for e in seen["r2"] if e["type"] == "queued"] == [("queued", 1)]
    assert [(e["type"], e["position"]) for e in seen["r3"] if e["type"] == "queued"] == [("queued", 2)]
    assert not any(e["type"] == "queued" for e in seen["r0"] + seen["r1"])
    assert health == {"status": "ok", "model": health["model"], "running": 2, "queued": 2, "batch_size": 2, "max_batch": 2, "max_queue": 2}
    # the queued ones got their first token only after a running one ended
    n_tokens = sum(e["type"] == "token" for k in seen for e in seen[k])
    assert m[("livepp_tokens_generated_total", ())] == n_tokens == 4 * 40 + 5
    assert m[("livepp_requests_total", (("reason", "length"),))] == 5
    assert m[("livepp_time_to_first_token_seconds_count", ())] == 5
    assert m[("livepp_inter_token_latency_seconds_count", ())] == n_tokens - 5
    assert m[("livepp_batch_size", ())] == 0 and m[("livepp_queue_length", ())] == 0 and m[("livepp_max_batch", ())] == 2


def test_think_traces_are_rows_of_the_shared_batch(decoder):
    from livepp.car.deepconf import think

    s = RunningServer(decoder, max_batch=8)
    params = {"traces": 4, "mode": "offline", "eta": 50, "group": 4, "max_new_tokens": 16, "temperature": 0.8, "seed": 3}
    try:
        with connect(s.url) as ws:
            send(ws, type="think", id="t", question="What is 17 + 25?", params=params)
            got = []
            while not got or got[-1]["type"] not in ("vote", "error"):
                e = json.loads(ws.recv(timeout=300))
                if e.get("id") == "t":
                    got.append(e)
        peak = s.server.scheduler.peak_batch
    finally:
        s.stop()
    assert got[-1]["type"] == "vote", got[-1]
    assert peak == 4
    want = think("What is 17 + 25?", engine=decoder, traces=4, mode="offline", eta=50, group=4,
                 params=GenerationParams(max_new_tokens=16, temperature=0.8, top_p=0.95, seed=3))
    vote = got[-1]
    assert vote["answer"] == want.answer and vote["traces_kept"] == want.kept
    assert vote["weights"] == pytest.approx(want.weights, abs=1e-4)
    samples = {e["sample"] for e in got if e["type"] == "token"}
    assert samples == {0, 1, 2, 3}

"""`livepp serve --remote`: the monitoring gateway in front of a real
llama.cpp server (llama.cpp's own OpenAI-compatible server), driven by the
official `openai` SDK."""

from __future__ import annotations

import json
import math
import time
import urllib.request

import openai
import pytest

from livepp.engines.remote import OpenAIEngine
from llama_server import MODEL_ALIAS
from test_server import RunningServer

pytestmark = pytest.mark.model

PROMPT = "What is the capital of France? Answer in one sentence."


@pytest.fixture(scope="module")
def upstream(llama_upstream):
    return llama_upstream


@pytest.fixture(scope="module")
def gateway(upstream):
    url, _ = upstream
    s = RunningServer(OpenAIEngine(url, MODEL_ALIAS), max_new_tokens_cap=400)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(gateway):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{gateway.port}/v1", api_key="unused", max_retries=0, timeout=120)


def upstream_answer(url: str, path: str, body: dict) -> dict:
    req = urllib.request.Request(url + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())["choices"][0]


def test_streaming_through_the_gateway_gives_the_servers_own_ppl_and_shows_on_the_page(client, upstream, gateway):
    url, _ = upstream
    own = upstream_answer(url, "/chat/completions", {"model": MODEL_ALIAS, "messages": [{"role": "user", "content": PROMPT}],
                                                     "max_tokens": 24, "temperature": 0, "logprobs": True, "top_logprobs": 5})
    own_lps = [e["logprob"] for e in own["logprobs"]["content"]]
    chunks, live = [], []
    for chunk in client.chat.completions.create(model=MODEL_ALIAS, messages=[{"role": "user", "content": PROMPT}], max_tokens=24,
                                                temperature=0, stream=True, logprobs=True, top_logprobs=2):
        chunks.append(chunk)
        if len(chunks) == 3:  # mid-stream: the page's live list has this request
            with urllib.request.urlopen(f"http://127.0.0.1:{gateway.port}/status", timeout=10) as r:
                live = json.loads(r.read())["requests"]
    assert [row["kind"] for row in live] == ["chat"] and live[0]["n_tokens"] >= 1
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == own["message"]["content"]
    streamed_lps = [e.logprob for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert streamed_lps == pytest.approx(own_lps, abs=1e-6)
    final = chunks[-1].choices[0].model_extra["livepp"]
    assert final["n_tokens"] == len(own_lps)
    assert final["ppl"] == pytest.approx(math.exp(-sum(own_lps) / len(own_lps)), rel=1e-9)
    per_token = [c.choices[0].model_extra["livepp"] for c in chunks if c.choices and "index" in (c.choices[0].model_extra.get("livepp") or {})]
    assert [t["index"] for t in per_token] == list(range(len(own_lps)))
    assert per_token[-1]["ppl"] == pytest.approx(final["ppl"], rel=1e-12)
    assert per_token[0]["entropy"] is None  # the stream carries only the top-k; livepp does not estimate


def test_logprobs_only_if_asked_and_completions_pass_through(client, upstream):
    url, _ = upstream
    r = client.chat.completions.create(model=MODEL_ALIAS, messages=[{"role": "user", "content": PROMPT}], max_tokens=12, temperature=0)
    assert r.choices[0].logprobs is None
    assert r.choices[0].model_extra["livepp"]["ppl"] > 1  # monitored all the same
    own = upstream_answer(url, "/completions", {"model": MODEL_ALIAS, "prompt": "The capital of France is", "max_tokens": 8,
                                                "temperature": 0, "logprobs": 2})
    got = client.completions.create(model=MODEL_ALIAS, prompt="The capital of France is", max_tokens=8, temperature=0, logprobs=2)
    assert got.choices[0].text == own["text"]
    assert got.choices[0].logprobs.token_logprobs == pytest.approx(own["logprobs"]["token_logprobs"], abs=1e-6)


def test_a_policy_stop_closes_the_upstream_request(client, upstream):
    _, log = upstream
    before = log.read_text().lower().count("disconnect")
    chunks = list(client.chat.completions.create(
        model=MODEL_ALIAS, messages=[{"role": "user", "content": "Write a very long story about the sea."}], max_tokens=300,
        temperature=0, stream=True, extra_body={"livepp": {"policies": ["early-stop:threshold=1.0001,metric=ppl,min_tokens=3"]}}))
    last = chunks[-1].choices[0]
    assert last.finish_reason == "stop" and last.model_extra["livepp"]["reason"] == "policy"
    assert last.model_extra["livepp"]["n_tokens"] == 3
    deadline = time.time() + 10
    while log.read_text().lower().count("disconnect") <= before and time.time() < deadline:
        time.sleep(0.2)
    assert log.read_text().lower().count("disconnect") > before, "the upstream server never saw the request closed"


def test_upstream_errors_pass_through_in_openais_schema(decoder, client):
    # An upstream that refuses in OpenAI's schema: a livepp server with a small cap.
    upstream = RunningServer(decoder, max_new_tokens_cap=8)
    gateway = RunningServer(OpenAIEngine(f"http://127.0.0.1:{upstream.port}/v1", "SmolLM2-135M-Instruct"), max_new_tokens_cap=400)
    try:
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{gateway.port}/v1", api_key="unused", max_retries=0, timeout=60)
        with pytest.raises(openai.BadRequestError) as bad:
            c.chat.completions.create(model="SmolLM2-135M-Instruct", messages=[{"role": "user", "content": "hi"}], max_tokens=50, stream=True)
        assert bad.value.body["param"] == "max_tokens" and "cap of 8" in bad.value.message
    finally:
        gateway.stop()
        upstream.stop()
    # llama.cpp's server ends a too-long prompt's stream without a word: a bad gateway.
    with pytest.raises(openai.InternalServerError) as broken:
        client.chat.completions.create(model=MODEL_ALIAS, messages=[{"role": "user", "content": "word " * 3000}], max_tokens=2)
    assert broken.value.status_code == 502 and broken.value.body["type"] == "upstream_error"


def test_generate_remote_proxy_scores_the_engines_text_with_the_local_model(upstream, decoder):
    """An engine asked for no logprobs: the local model scores its text live,
    and the numbers equal `livepp score` of that text given the prompt."""
    url, log = upstream
    from click.testing import CliRunner

    from livepp.cli.main import main
    from livepp.engines.torch.engine import TorchEngine

    def run(*args):
        r = CliRunner().invoke(main, list(args), obj={"engine": TorchEngine(decoder)})
        assert r.exit_code == 0, r.output
        return [json.loads(line) for line in r.stdout.splitlines() if line.strip()]

    events = run("generate", PROMPT, "--remote", url, "--remote-model", MODEL_ALIAS, "--proxy", "--max-new-tokens", "40", "--json")
    assert events[0]["engine"] == "proxy" and events[0]["params"]["proxy"] == "SmolLM2-135M-Instruct"
    end = events[-1]
    reference = run("score", "--prompt", PROMPT, "--target", end["text"], "--chat", "--json")[0]
    tokens = [e for e in events if e["type"] == "token"]
    assert [t["token_id"] for t in tokens] == [t["token_id"] for t in reference["tokens"]]
    assert max(abs(a["logprob"] - b["logprob"]) for a, b in zip(tokens, reference["tokens"])) <= 1e-4
    assert end["ppl"] == pytest.approx(reference["ppl"], rel=1e-4)

    before = log.read_text().lower().count("disconnect")
    stopped = run("generate", "Write a very long story about the sea.", "--remote", url, "--remote-model", MODEL_ALIAS, "--proxy",
                  "--max-new-tokens", "300", "--policy", "early-stop:threshold=1.0001,metric=ppl,min_tokens=3", "--json")
    assert stopped[-1]["reason"] == "policy" and stopped[-1]["n_tokens"] == 3
    deadline = time.time() + 10
    while log.read_text().lower().count("disconnect") <= before and time.time() < deadline:
        time.sleep(0.2)
    assert log.read_text().lower().count("disconnect") > before, "the proxy's stop did not close the upstream request"

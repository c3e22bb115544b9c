"""The OpenAI-compatible API of `livepp serve`, through the official `openai`
SDK (a client nobody here wrote), against a real server on an ephemeral port
with the real embedded model. The reference is `livepp generate --json`."""

from __future__ import annotations

import json
import socket
import time

import openai
import pytest
from click.testing import CliRunner
from hypothesis import given, settings, strategies as st

from livepp.cli.main import main
from livepp.engines.torch.engine import TorchEngine
from livepp.serve.openai_schema import ContentGate
from test_server import RunningServer

pytestmark = pytest.mark.model

PROMPT = "Why is the sky blue? Answer briefly."
TOKEN = "s3cret-key"
STATS = ("logprob", "entropy", "varentropy", "ppl", "window_ppl", "mean_nll", "confidence", "group_confidence", "surprise_z")


@pytest.fixture(scope="module")
def server(decoder):
    s = RunningServer(decoder, token=TOKEN, max_new_tokens_cap=64)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key=TOKEN, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model(client):
    models = client.models.list().data
    assert [m.id for m in models] == ["SmolLM2-135M-Instruct"]
    return models[0].id


def generate_json(decoder, *args):
    r = CliRunner().invoke(main, ["generate", *args, "--json"], obj={"engine": TorchEngine(decoder)})
    assert r.exit_code == 0, r.output
    return [json.loads(line) for line in r.stdout.splitlines() if line.strip()]


def token_events(events, sample=None):
    return [e for e in events if e["type"] == "token" and (sample is None or e.get("sample") == sample)]


def assert_stats_equal(got: dict, want: dict) -> None:
    assert got["index"] == want["index"] and got["token_id"] == want["token_id"]
    for name in STATS:
        if want[name] is None:
            assert got[name] is None, name
        else:
            assert got[name] == pytest.approx(want[name], rel=1e-4, abs=1e-4), name


def test_chat_not_streamed_equals_generate(client, model, decoder):
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": PROMPT}], max_tokens=24,
                                       temperature=0, logprobs=True, top_logprobs=3)
    want = generate_json(decoder, PROMPT, "--max-new-tokens", "24", "--top-logprobs", "3")
    tokens, end = token_events(want), want[-1]
    choice = r.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == end["text"]
    entries = choice.logprobs.content
    assert [e.token for e in entries] == [t["text"] for t in tokens]
    assert max(abs(e.logprob - t["logprob"]) for e, t in zip(entries, tokens)) <= 1e-4
    for e, t in zip(entries, tokens):
        assert [a.token for a in e.top_logprobs] == [a["text"] for a in t["top_logprobs"]]
        assert bytes(e.bytes) == t["text"].encode("utf-8")
    extra = choice.model_extra["livepp"]
    for got, t in zip(extra["tokens"], tokens):
        assert_stats_equal(got, t)
    assert extra["ppl"] == pytest.approx(end["ppl"], rel=1e-4) and extra["n_tokens"] == end["n_tokens"]
    assert choice.finish_reason == ("length" if end["reason"] == "length" else "stop")
    assert r.usage.completion_tokens == end["n_tokens"]
    assert r.usage.prompt_tokens == len(want[0]["prompt_token_ids"])


def test_chat_streamed_carries_each_tokens_statistics(client, model, decoder):
    stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": PROMPT}], max_tokens=24,
                                            temperature=0, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    want = generate_json(decoder, PROMPT, "--max-new-tokens", "24")
    tokens, end = token_events(want), want[-1]
    assert chunks[0].choices[0].delta.role == "assistant"
    token_chunks = [c for c in chunks if c.choices and "index" in (c.choices[0].model_extra.get("livepp") or {})]
    assert len(token_chunks) == len(tokens)
    for c, t in zip(token_chunks, tokens):
        assert_stats_equal(c.choices[0].model_extra["livepp"], t)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == end["text"]
    last = [c for c in chunks if c.choices][-1].choices[0]
    assert last.finish_reason == "length" and last.model_extra["livepp"]["stop_reason"] == "length"
    assert last.model_extra["livepp"]["ppl"] == pytest.approx(end["ppl"], rel=1e-4)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 24


def test_completions_streamed_and_not_equal_generate_raw(client, model, decoder):
    prompt = "The three primary colours are"
    want = generate_json(decoder, prompt, "--raw", "--max-new-tokens", "16", "--top-logprobs", "2")
    tokens, end = token_events(want), want[-1]
    r = client.completions.create(model=model, prompt=prompt, max_tokens=16, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert r.choices[0].text == end["text"]
    assert lp.tokens == [t["text"] for t in tokens]
    assert max(abs(a - t["logprob"]) for a, t in zip(lp.token_logprobs, tokens)) <= 1e-4
    assert lp.text_offset == [sum(len(t["text"]) for t in tokens[:i]) for i in range(len(tokens))]
    assert [list(d) for d in lp.top_logprobs] == [[a["text"] for a in t["top_logprobs"]] for t in tokens]
    streamed = list(client.completions.create(model=model, prompt=prompt, max_tokens=16, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == end["text"]
    stats = [c.choices[0].model_extra["livepp"] for c in streamed if "index" in (c.choices[0].model_extra.get("livepp") or {})]
    for got, t in zip(stats, tokens, strict=True):
        assert_stats_equal(got, t)


def test_a_policy_in_extra_body_stops_where_generate_stops(client, model, decoder):
    spec = "early-stop:threshold=2.2,metric=window_ppl,min_tokens=4"
    want = generate_json(decoder, PROMPT, "--max-new-tokens", "48", "--policy", spec)
    assert want[-1]["reason"] == "policy" and want[-1]["n_tokens"] < 48, "the reference run should be stopped by the policy"
    chunks = list(client.chat.completions.create(model=model, messages=[{"role": "user", "content": PROMPT}], max_tokens=48,
                                                 temperature=0, stream=True, extra_body={"livepp": {"policies": [spec]}}))
    last = chunks[-1].choices[0]
    assert last.finish_reason == "stop"
    extra = last.model_extra["livepp"]
    assert extra["reason"] == "policy" and extra["stop_reason"].startswith("EarlyStop")
    assert extra["n_tokens"] == want[-1]["n_tokens"]
    assert extra["policy"]["index"] == [e for e in want if e["type"] == "policy"][0]["index"]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want[-1]["text"]


def test_n_samples_decode_as_a_batch_and_equal_generate_n(client, model, decoder, server):
    before = server.server.scheduler.peak_batch
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Name a fruit."}], max_tokens=12,
                                       temperature=0.8, seed=7, n=3, logprobs=True)
    want = generate_json(decoder, "Name a fruit.", "-n", "3", "--temperature", "0.8", "--seed", "7", "--max-new-tokens", "12")
    assert [c.index for c in r.choices] == [0, 1, 2]
    for i, c in enumerate(r.choices):
        tokens = token_events(want, sample=i)
        assert [e.token for e in c.logprobs.content] == [t["text"] for t in tokens]
        assert max(abs(e.logprob - t["logprob"]) for e, t in zip(c.logprobs.content, tokens)) <= 1e-4
    assert len({c.message.content for c in r.choices}) > 1, "seeded samples should differ"
    assert server.server.scheduler.peak_batch >= max(before, 3)


def test_a_stop_string_is_cut_from_the_content(client, model, decoder):
    want = generate_json(decoder, PROMPT, "--max-new-tokens", "24")
    text = want[-1]["text"]
    stop = text[10:14]
    assert stop.strip(), text
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": PROMPT}], max_tokens=24,
                                       temperature=0, stop=[stop])
    assert r.choices[0].message.content == text[: text.find(stop)]
    assert r.choices[0].finish_reason == "stop" and r.choices[0].model_extra["livepp"]["reason"] == "stop_string"
    streamed = list(client.chat.completions.create(model=model, messages=[{"role": "user", "content": PROMPT}], max_tokens=24,
                                                   temperature=0, stop=[stop], stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == text[: text.find(stop)]


@settings(max_examples=200, deadline=None)
@given(text=st.text(alphabet="ab\n", max_size=30), stops=st.lists(st.text(alphabet="ab\n", min_size=1, max_size=4), max_size=3),
       cuts=st.lists(st.integers(0, 30), max_size=10))
def test_content_gate_releases_exactly_the_text_before_the_first_stop(text, stops, cuts):
    """Chunks are tokens: generation ends with the first chunk that completes
    a stop string, and the content is what comes before that stop string."""
    gate = ContentGate(tuple(stops))
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    out = "".join(gate.feed(text[a:b]) for a, b in zip(bounds, bounds[1:])) + gate.flush()
    want = text
    for b in bounds[1:]:
        seen = text[:b]
        if any(s in seen for s in stops):
            want = seen[: min(seen.find(s) for s in stops if s in seen)]
            break
    assert out == want


def test_errors_are_openai_shaped(client, model, server):
    anonymous = openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as auth:
        anonymous.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert auth.value.body["code"] == "invalid_api_key"
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=2, temperature=-1)
    assert "temperature" in bad.value.message
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                       extra_body={"livepp": {"policies": ["no-such-policy"]}})
    assert "no-such-policy" in bad.value.message
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=1000)
    assert bad.value.body["param"] == "max_tokens"
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert missing.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as long:
        client.completions.create(model=model, prompt="word " * 9000, max_tokens=2)
    assert long.value.body["code"] == "context_length_exceeded"


def raw_http(port: int, data: bytes) -> tuple[int, dict, bytes]:
    """(status, headers lower-cased, body) of one raw HTTP exchange: the
    answer is read by its Content-Length (the connection may stay open), or
    to the end of the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(data)
        reply = b""
        while b"\r\n\r\n" not in reply and (chunk := s.recv(65536)):
            reply += chunk
        head, _, body = reply.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.lower(): v for k, _, v in (line.partition(": ") for line in lines[1:])}
        length = headers.get("content-length")
        while (length is None or len(body) < int(length)) and (chunk := s.recv(65536)):
            body += chunk
    return int(lines[0].split(" ")[1]), headers, body


def raw_json(port: int, data: bytes) -> tuple[int, dict]:
    status, _, body = raw_http(port, data)
    return status, json.loads(body)


def test_malformed_http_gets_a_json_error_and_the_websocket_side_still_works(server):
    port = server.port
    status, body = raw_json(port, b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 3\r\n\r\n{x}")
    assert status == 401  # auth comes before the body is read
    auth = f"Authorization: Bearer {TOKEN}\r\n".encode()
    status, body = raw_json(port, b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n" + auth + b"Content-Length: 3\r\n\r\n{x}")
    assert status == 400 and "JSON" in body["error"]["message"]
    status, body = raw_json(port, b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 99999999\r\n\r\n")
    assert status == 413
    status, body = raw_json(port, b"POST /v1/completions HTTP/1.1\r\nHost: evil.example\r\n" + auth + b"Content-Length: 2\r\n\r\n{}")
    assert status == 403
    status, body = raw_json(port, b"GET /v1/nothing HTTP/1.1\r\nHost: 127.0.0.1\r\n" + auth + b"\r\n")
    assert status == 404 and body["error"]["code"] == "not_found"
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert b"200 OK" in s.recv(4096)


def test_a_client_that_leaves_mid_stream_stops_its_request(client, model, server):
    stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Write a long story."}],
                                            max_tokens=64, temperature=0, stream=True)
    seen = 0
    for chunk in stream:
        seen += 1
        if seen == 4:
            break
    stream.close()
    deadline = time.time() + 20
    while server.server.jobs and time.time() < deadline:
        time.sleep(0.05)
    assert not server.server.jobs, "the request kept running after its client left"
    cancelled = [s for s in server.server.metrics.requests.collect()[0].samples
                 if s.labels.get("reason") == "cancelled" and s.name.endswith("_total")]
    assert cancelled and cancelled[0].value >= 1


def test_the_servers_default_policies_apply_to_every_request(decoder):
    spec = "early-stop:threshold=2.2,metric=window_ppl,min_tokens=4"
    want = generate_json(decoder, PROMPT, "--max-new-tokens", "48", "--policy", spec)
    assert want[-1]["reason"] == "policy"
    s = RunningServer(decoder, default_policies=(spec,))
    try:
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{s.port}/v1", api_key="unused", max_retries=0, timeout=120)
        r = c.chat.completions.create(model="SmolLM2-135M-Instruct", messages=[{"role": "user", "content": PROMPT}],
                                      max_tokens=48, temperature=0)
    finally:
        s.stop()
    extra = r.choices[0].model_extra["livepp"]
    assert extra["reason"] == "policy" and extra["n_tokens"] == want[-1]["n_tokens"]
    assert r.choices[0].message.content == want[-1]["text"]


def test_curl_style_expect_100_continue_gets_its_interim_answer(server, model):
    body = json.dumps({"model": model, "prompt": "2 + 2 =", "max_tokens": 2, "temperature": 0}).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer " + TOKEN.encode() +
                  b"\r\nContent-Type: application/json\r\nExpect: 100-continue\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n")
        assert s.recv(64).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        s.sendall(body)
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 200 OK") and json.loads(reply.partition(b"\r\n\r\n")[2])["usage"]["completion_tokens"] == 2


def test_a_shutdown_ends_a_streamed_answer_with_its_last_chunks(decoder):
    import threading

    s = RunningServer(decoder)
    c = openai.OpenAI(base_url=f"http://127.0.0.1:{s.port}/v1", api_key="unused", max_retries=0, timeout=120)
    chunks = []
    stream = c.chat.completions.create(model="SmolLM2-135M-Instruct", messages=[{"role": "user", "content": "Write a long story."}],
                                       max_tokens=200, temperature=0, stream=True)
    stopper = None
    for chunk in stream:
        chunks.append(chunk)
        if len(chunks) == 4:
            stopper = threading.Thread(target=s.stop)
            stopper.start()
    stopper.join()
    last = chunks[-1].choices[0]
    assert last.finish_reason == "abort" and last.model_extra["livepp"]["reason"] == "shutdown"
    assert last.model_extra["livepp"]["n_tokens"] < 200


def test_a_page_of_an_allowed_origin_may_call_the_api(decoder):
    s = RunningServer(decoder, token=TOKEN, allowed_origins=("http://app.example",))
    try:
        preflight = (b"OPTIONS /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nOrigin: http://app.example\r\n"
                     b"Access-Control-Request-Method: POST\r\nAccess-Control-Request-Headers: authorization, content-type\r\n\r\n")
        status, headers, _ = raw_http(s.port, preflight)
        assert status == 204 and headers["access-control-allow-origin"] == "http://app.example"
        assert "POST" in headers["access-control-allow-methods"] and headers["access-control-allow-headers"] == "authorization, content-type"
        status, headers, _ = raw_http(s.port, b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nOrigin: http://app.example\r\n"
                                           b"Authorization: Bearer " + TOKEN.encode() + b"\r\n\r\n")
        assert status == 200 and headers["access-control-allow-origin"] == "http://app.example"
        status, headers, _ = raw_http(s.port, preflight.replace(b"http://app.example", b"http://evil.example"))
        assert status == 403 and "access-control-allow-origin" not in headers
    finally:
        s.stop()

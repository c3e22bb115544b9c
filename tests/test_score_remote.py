"""`livepp score --remote`: any server that serves prompt logprobs scores a
text or a target as local `score` does: against a real `livepp serve`, and
against vLLM's recorded echo answer (tests/fixtures/README.md)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from click.testing import CliRunner

from livepp.cli.main import main
from test_remote_parsing import FIXTURES, Stub
from test_server import RunningServer

GPL = Path("/usr/share/common-licenses/GPL-3")


def score(*args, engine=None):
    r = CliRunner().invoke(main, ["score", *args, "--json"], obj={"engine": engine} if engine else None)
    return r.exit_code, r.stdout, r.stderr


@pytest.fixture(scope="module")
def served(decoder):
    s = RunningServer(decoder)
    yield f"http://127.0.0.1:{s.port}/v1"
    s.stop()


@pytest.mark.model
@pytest.mark.parametrize("args", [[], ["--max-length", "128", "--stride", "64"]])
def test_a_text_on_livepp_serve_equals_local_score(served, decoder, tmp_path, args):
    path = tmp_path / "doc.txt"
    path.write_text((GPL.read_text() if GPL.is_file() else "The quick brown fox. " * 60)[:1500])
    code, out, err = score(str(path), *args)
    assert code == 0, err
    local = json.loads(out)
    code, out, err = score(str(path), "--remote", served, "--remote-model", "SmolLM2-135M-Instruct", *args)
    assert code == 0, err
    remote = json.loads(out)
    assert remote["n_tokens"] == local["n_tokens"] and remote["ppl"] == pytest.approx(local["ppl"], rel=1e-4)
    assert [t["token_id"] for t in remote["tokens"]] == [t["token_id"] for t in local["tokens"]]
    assert max(abs(a["logprob"] - b["logprob"]) for a, b in zip(remote["tokens"], local["tokens"])) <= 1e-4
    assert remote.get("windows", 1) == local.get("windows", 1)


@pytest.mark.model
def test_a_target_on_livepp_serve_equals_local_score(served, decoder):
    prompt, target = "The capital of France is", " Paris, a city on the Seine."
    _, out, _ = score("--prompt", prompt, "--target", target)
    local = json.loads(out)
    code, out, err = score("--prompt", prompt, "--target", target, "--remote", served, "--remote-model", "SmolLM2-135M-Instruct")
    assert code == 0, err
    remote = json.loads(out)
    assert remote["n_tokens"] == local["n_tokens"] == 9 and remote["ppl"] == pytest.approx(local["ppl"], rel=1e-4)


def test_vllms_recorded_echo_answer_parses_right(tmp_path):
    body = (FIXTURES / "vllm_echo_opt125m.json").read_bytes()
    stub = Stub(body)
    try:
        path = tmp_path / "p.txt"
        path.write_text("Hi, I love my cat")
        code, out, err = score(str(path), "--remote", stub.url, "--remote-model", "opt-125m")
    finally:
        stub.close()
    assert code == 0, err
    result = json.loads(out)
    recorded = json.loads(body)["choices"][0]["logprobs"]["token_logprobs"][1:7]  # the prompt's, after the BOS
    assert [t["text"] for t in result["tokens"]] == ["Hi", ",", " I", " love", " my", " cat"]
    assert [t["logprob"] for t in result["tokens"]] == recorded
    assert result["n_tokens"] == 6 and result["ppl"] == pytest.approx(math.exp(-sum(recorded) / 6), rel=1e-12)
    echo = stub.requests[0]
    assert echo["echo"] is True and echo["logprobs"] == 0 and echo["max_tokens"] == 1 and echo["prompt"] == "Hi, I love my cat"


def test_a_target_in_vllms_recorded_answer_is_found_by_offsets():
    stub = Stub((FIXTURES / "vllm_echo_opt125m.json").read_bytes())
    try:
        code, out, err = score("--prompt", "Hi, I love", "--target", " my cat", "--remote", stub.url, "--remote-model", "opt-125m")
    finally:
        stub.close()
    assert code == 0, err
    result = json.loads(out)
    assert [t["text"] for t in result["tokens"]] == [" my", " cat"] and result["n_tokens"] == 2


@pytest.mark.parametrize("body,status,words", [
    (b'{"error": {"message": "echo is not supported", "type": "invalid_request_error"}}', 400, "refused echo with logprobs (HTTP 400): echo is not supported"),
    (json.dumps({"choices": [{"index": 0, "text": " cat", "logprobs": None, "finish_reason": "length"}], "usage": {"prompt_tokens": 5}}).encode(),
     200, "no prompt logprobs"),
    (json.dumps({"choices": [{"index": 0, "text": "x", "logprobs": {"tokens": ["a", "b"], "token_logprobs": [None, None], "text_offset": [0, 1]}}],
                 "usage": {"prompt_tokens": 2}}).encode(), 200, "did not echo"),
])
def test_a_server_that_refuses_echo_is_a_one_line_error(tmp_path, body, status, words):
    stub = Stub(body, status=status)
    path = tmp_path / "p.txt"
    path.write_text("ab")
    try:
        r = CliRunner().invoke(main, ["score", str(path), "--remote", stub.url, "--remote-model", "m"])
    finally:
        stub.close()
    assert r.exit_code == 2 and words in r.stderr and len(r.stderr.strip().splitlines()) == 1

"""`livepp generate`: the JSON contract and clear errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from livepp.cli.main import main

TOKEN_KEYS = {"type", "index", "token_id", "text", "logprob", "entropy", "top_logprobs", "mean_nll", "ppl", "window_ppl", "ema_nll", "confidence"}
END_KEYS = {"type", "reason", "n_tokens", "text", "mean_nll", "ppl", "prefill_s", "decode_s", "tokens_per_s"}


def run(*args, input=None):
    return CliRunner().invoke(main, list(args), input=input)


def lines(output):
    return [json.loads(line) for line in output.splitlines() if line.strip()]


@pytest.mark.model
def test_json_contract(loaded):
    r = run("generate", "Say hello.", "--max-new-tokens", "12", "--json", "--top-logprobs", "3")
    assert r.exit_code == 0, r.output
    events = lines(r.stdout)
    assert events[0]["type"] == "start"
    assert events[0]["model"] == "SmolLM2-135M-Instruct"
    assert all(isinstance(i, int) for i in events[0]["prompt_token_ids"])
    assert events[0]["params"]["max_new_tokens"] == 12
    tokens = [e for e in events if e["type"] == "token"]
    assert tokens and [t["index"] for t in tokens] == list(range(len(tokens)))
    for t in tokens:
        assert TOKEN_KEYS <= set(t)
        assert len(t["top_logprobs"]) == 3
        assert set(t["top_logprobs"][0]) == {"token_id", "text", "logprob"}
        assert t["logprob"] <= 0
    end = events[-1]
    assert end["type"] == "end" and END_KEYS <= set(end)
    assert end["n_tokens"] == len(tokens)
    assert end["text"] == "".join(t["text"] for t in tokens)
    assert end["ppl"] == pytest.approx(tokens[-1]["ppl"])


@pytest.mark.model
def test_stop_window_ppl_emits_policy_event_then_end(loaded):
    r = run("generate", "Tell me a long story.", "--max-new-tokens", "40", "--stop-window-ppl", "1.0001", "--min-tokens", "4", "--json")
    assert r.exit_code == 0, r.output
    events = lines(r.stdout)
    policy = [e for e in events if e["type"] == "policy"]
    assert len(policy) == 1 and policy[0]["action"] == "stop" and policy[0]["index"] == 3
    assert events[-1]["type"] == "end" and events[-1]["reason"] == "policy" and events[-1]["n_tokens"] == 4


@pytest.mark.model
def test_prompt_from_stdin_raw(loaded):
    r = run("generate", "-", "--raw", "--max-new-tokens", "3", "--json", input="The capital of France is")
    assert r.exit_code == 0, r.output
    assert lines(r.stdout)[-1]["n_tokens"] <= 3


@pytest.mark.model
def test_terminal_view_runs(loaded):
    r = run("generate", "Hi!", "--max-new-tokens", "6")
    assert r.exit_code == 0, r.output
    assert "PPL" in r.output and "end:" in r.output


@pytest.mark.parametrize(
    "args,message",
    [
        (["--temperature", "-1"], "temperature must be a number >= 0"),
        (["--top-p", "0"], "top_p must be in (0, 1]"),
        (["--max-new-tokens", "0"], "max_new_tokens must be an integer >= 1"),
        (["--stop-ppl", "0.5"], "--stop-ppl"),
        (["--model", "/no/such/model"], "model path does not exist"),
    ],
)
def test_bad_input_gives_error_and_json_error_line(args, message):
    r = run("generate", "hello", "--json", *args)
    assert r.exit_code == 2
    assert message in r.stderr
    events = lines(r.stdout)
    assert events == [{"type": "error", "message": events[0]["message"]}]
    assert message in events[0]["message"]


def test_empty_prompt(loaded):
    r = run("generate", "   ", "--json")
    assert r.exit_code == 2 and "the prompt is empty" in r.stderr


def test_python_dash_m_help():
    out = subprocess.run([sys.executable, "-m", "livepp", "generate", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    assert "--stop-window-ppl" in out.stdout and "Examples" in out.stdout

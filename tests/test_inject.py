"""Interventions: an `inject` policy appends text to the sequence and the
local engine decodes on from it; injected tokens are shown, counted nowhere."""

from __future__ import annotations

import json
import math

import pytest
from click.testing import CliRunner

from livepp import GenerationParams, Monitor
from livepp.cli.main import main
from livepp.core.params import LiveppError
from livepp.core.policies import Inject, parse_policy
from livepp.engines.torch.engine import TorchEngine

pytestmark = pytest.mark.model

PROMPT = "What is 17 times 3?"
TEXT = "\nLet me check step by step:"


def run_with_injection(decoder, spec: str, max_new_tokens: int = 40):
    ids = decoder.encode(PROMPT)
    result = Monitor(policies=[parse_policy(spec)]).run(decoder.stream(ids, GenerationParams(max_new_tokens=max_new_tokens)))
    return ids, result


def test_after_an_injection_decoding_equals_a_plain_run_whose_prompt_ends_with_the_text(decoder):
    ids, result = run_with_injection(decoder, f"inject:when=ppl>1.0001,min_tokens=5,text={TEXT}")
    tokens = result.tokens
    injected = [t for t in tokens if t.injected]
    assert "".join(t.text for t in injected) == TEXT
    at = tokens.index(injected[0])
    before = [t.token_id for t in tokens[:at]]
    after = [t for t in tokens[at + len(injected):]]
    assert len(before) == 5 and len(after) >= 10
    # The reference: no policy, the injected text put at the end of the prompt.
    plain_prompt = ids + before + [t.token_id for t in injected]
    plain = Monitor().run(decoder.stream(plain_prompt, GenerationParams(max_new_tokens=40 - 5)))
    assert [t.token_id for t in after] == [t.token_id for t in plain.tokens][: len(after)]
    assert max(abs(a.logprob - b.logprob) for a, b in zip(after, plain.tokens)) <= 1e-4
    # The injected tokens' own logprobs are what the model gives them in that context.
    teacher = decoder.loaded.model(input_ids=__import__("torch").tensor([plain_prompt])).logits[0].log_softmax(-1)
    start = len(ids) + len(before)
    for k, t in enumerate(injected):
        assert t.logprob == pytest.approx(teacher[start + k - 1, t.token_id].item(), abs=1e-4)


def test_injected_tokens_are_in_no_statistic_and_the_limit_holds(decoder):
    _, result = run_with_injection(decoder, "inject:when=ppl>1.0001,min_tokens=3,max=2,gap=4,text=\\nWait,")
    tokens = result.tokens
    counted = [t for t in tokens if not t.injected]
    injections = [e for e in result.events if e.type == "policy" and e.action == "inject"]
    assert len(injections) == 2 and injections[1].index - injections[0].index >= 4
    assert sum(t.injected for t in tokens) == 2 * len(decoder.tokenizer("\nWait,", add_special_tokens=False)["input_ids"])
    assert result.end.n_tokens == len(counted) == tokens[-1].index + 1
    assert [t.index for t in counted] == list(range(len(counted)))
    nll = -sum(t.logprob for t in counted) / len(counted)
    assert result.end.ppl == pytest.approx(math.exp(nll), rel=1e-12)
    for t in tokens:  # an injected token leaves the running statistics as they were
        if t.injected:
            previous = max((c for c in counted if c.index < t.index), key=lambda c: c.index)
            assert (t.ppl, t.window_ppl, t.mean_nll) == (previous.ppl, previous.window_ppl, previous.mean_nll)
    assert result.end.text.count("\nWait,") == 2


def test_inject_from_the_command_line_and_where_it_cannot_run(decoder):
    r = CliRunner().invoke(main, ["generate", PROMPT, "--max-new-tokens", "20", "--json", "--policy",
                                  f"inject:when=ppl>1.0001,min_tokens=5,text={TEXT}"], obj={"engine": TorchEngine(decoder)})
    assert r.exit_code == 0, r.output
    events = [json.loads(line) for line in r.stdout.splitlines()]
    marked = [e for e in events if e["type"] == "token" and e.get("injected")]
    assert "".join(e["text"] for e in marked) == TEXT
    assert all("injected" not in e for e in events if e["type"] == "token" and e not in marked)
    # Rows of a batch (generate P1 P2 -n N) take it too, each its own.
    r = CliRunner().invoke(main, ["generate", PROMPT, "Name a colour.", "-n", "2", "--temperature", "0.7", "--max-new-tokens", "12",
                                  "--json", "--policy", f"inject:when=ppl>1.0001,min_tokens=5,text={TEXT}"], obj={"engine": TorchEngine(decoder)})
    assert r.exit_code == 0, r.output
    events = [json.loads(line) for line in r.stdout.splitlines()]
    for sample in range(4):
        marked = [e for e in events if e["type"] == "token" and e["sample"] == sample and e.get("injected")]
        assert "".join(e["text"] for e in marked) == TEXT
    # A stream that cannot take text (a remote engine's) is refused up front, saying why.
    from livepp.core.stream import RecordStream

    with pytest.raises(LiveppError, match="a remote engine's API cannot"):
        Monitor(policies=[parse_policy("inject:text=x")]).run(RecordStream([]))
    with pytest.raises(LiveppError, match="text="):
        parse_policy("inject:when=ppl>2")
    with pytest.raises(LiveppError, match="when must be"):
        parse_policy("inject:when=loudness>2,text=x")
    assert isinstance(parse_policy("inject:max=3,text=a, b, c"), Inject)
    assert parse_policy("inject:max=3,text=a, b, c").text == "a, b, c"

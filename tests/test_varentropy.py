"""Varentropy (the variance of −log p under the raw distribution) on both
local engines, the varentropy-stop policy, and `generate --policy`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from livepp.cli.main import main
from livepp.core.events import TokenRecord
from livepp.core.monitor import Monitor
from livepp.core.params import GenerationParams
from livepp.core.policies import VarentropyStop, parse_policy
from livepp.core.replay import read_traces, replay_trace
from livepp.core.stream import RecordStream


def varentropy_of(logits: np.ndarray) -> tuple[float, float]:
    """(entropy, varentropy) of softmax(logits), in float64, by the textbook formulas."""
    z = logits.astype(np.float64)
    logp = z - z.max() - np.log(np.exp(z - z.max()).sum())
    p = np.exp(logp)
    h = -(p * logp).sum()
    return h, (p * logp**2).sum() - h**2


@pytest.mark.model
def test_torch_engine_varentropy_equals_the_formula_on_teacher_forced_logits(decoder):
    r = Monitor().run(decoder.stream(decoder.encode("Tell me about owls."), GenerationParams(max_new_tokens=12, temperature=0.9, seed=4)))
    ids = list(r.events[0].prompt_token_ids) + r.token_ids
    with torch.inference_mode():
        logits = decoder.model(input_ids=torch.tensor([ids])).logits[0].numpy()
    n = len(r.events[0].prompt_token_ids)
    for k, t in enumerate(r.tokens):
        h, v = varentropy_of(logits[n - 1 + k])
        assert t.entropy == pytest.approx(h, abs=1e-4)
        assert t.varentropy == pytest.approx(v, abs=1e-3, rel=1e-4)
    assert any(t.varentropy > 0.5 for t in r.tokens)  # not a constant


@pytest.mark.model
def test_llamacpp_engine_varentropy_equals_the_formula_on_its_own_logits():
    from livepp.engines.llamacpp import LlamaContext, LlamaCppEngine

    engine = LlamaCppEngine(exact=True)
    try:
        r = Monitor().run(engine.open("What is 2+2?", GenerationParams(max_new_tokens=8, ignore_eos=True)))
        ids = list(r.events[0].prompt_token_ids) + r.token_ids
        n = len(r.events[0].prompt_token_ids)
        ctx = LlamaContext(engine.path, n_seq=1)
        logits = [lg.numpy() for pos, t in enumerate(ids[:-1]) for lg in ctx.decode([(t, pos, 0, pos >= n - 1)])]
        ctx.close()
    finally:
        engine.close()
    for t, lg in zip(r.tokens, logits):
        assert t.varentropy == pytest.approx(varentropy_of(lg)[1], abs=1e-3, rel=1e-4)


@pytest.mark.parametrize("vocab", [5000, 49152, 262144])
def test_the_statistics_of_a_step_are_float32_close_to_a_float64_evaluation(vocab):
    """A step's logprob, top-k, entropy and varentropy (taken from exp(x −
    max) and its dot products, without a log-softmax block) against float64,
    for rows peaked and flat, and a row with tokens of probability 0 (logits
    of −inf): the same numbers, the zero-probability tokens adding exactly 0
    (not 0·∞), and a forced token of probability 0 scored −inf.

    A logprob is the logit less the row's shift (its largest logit plus
    log Z), all in float32: it is asserted within 4 float32 ulps of that
    shift, a bound the rounding holds on any processor (the order of a
    sum's terms, and so its last bit, is the processor's); the errors
    measured are printed (here about 1e-6: 0.1-0.3 of the bound)."""
    from livepp.engines.torch.sampling import batch_token_stats, forced_token_stats, unpack_stats

    g = torch.Generator().manual_seed(vocab)
    x = torch.randn(4, vocab, generator=g) * torch.tensor([[1.0], [4.0], [12.0], [3.0]])
    x[3, ::3] = -float("inf")
    params = GenerationParams(max_new_tokens=1, top_logprobs=5, confidence_k=20, entropy=True)
    packed, failed = batch_token_stats(x, [params] * 4, [None] * 4)
    forced = forced_token_stats(x, [0, 1, 2, 3], params)
    assert not failed
    worst = {"logprob": 0.0, "top": 0.0, "confidence": 0.0, "entropy": 0.0}
    for k in range(4):
        row = x[k].numpy()
        h, v = varentropy_of(row[np.isfinite(row)])  # tokens of probability 0 add nothing
        z = x[k].double()
        logp = z - torch.logsumexp(z, 0)
        peak = z.max().item()
        ulps = 4 * float(np.finfo(np.float32).eps) * (abs(peak) + torch.logsumexp(z, 0).item() - peak)  # of |peak| + log Z
        got = unpack_stats(packed[k].tolist(), 5)
        errors = {"logprob": abs(got.logprob - logp.max().item()), "top": max(abs(lp - logp[i].item()) for i, lp in got.top),
                  "confidence": abs(got.confidence + torch.topk(logp, 20).values.mean().item()), "entropy": abs(got.entropy - h)}
        worst = {name: max(worst[name], error) for name, error in errors.items()}
        assert got.token_id == int(z.argmax())
        assert errors["logprob"] <= ulps and errors["top"] <= ulps and errors["confidence"] <= ulps
        assert got.entropy == pytest.approx(h, abs=5e-6, rel=1e-6)
        assert got.varentropy == pytest.approx(v, abs=5e-5, rel=1e-5)
        assert [i for i, _ in got.top] == torch.topk(logp, 5).indices.tolist()
        assert forced[k].entropy == pytest.approx(h, abs=5e-6, rel=1e-6) and forced[k].varentropy == pytest.approx(v, abs=5e-5, rel=1e-5)
        assert forced[k].logprob == pytest.approx(logp[k].item(), abs=ulps)  # −inf for row 3's token 3, exactly
    assert forced[3].logprob == -float("inf")  # token 3 of row 3 has logit −inf
    print(f"vocabulary {vocab}: largest error against float64", {name: f"{e:.1e}" for name, e in worst.items()})


def test_the_statistics_of_logits_that_carry_a_gradient_are_those_of_the_same_logits_without():
    """A caller's logits may come out of a graph with a gradient (a model
    run outside inference mode): the statistics are taken of their values
    (out= writes refused such a block before)."""
    from livepp.engines.torch.sampling import batch_token_stats, forced_token_stats

    w = torch.randn(3, 2000, generator=torch.Generator().manual_seed(1), requires_grad=True)
    params = GenerationParams(max_new_tokens=1, top_logprobs=3, confidence_k=5, entropy=True)
    with_grad = w * 2.0
    plain = with_grad.detach().clone()
    got, failed = batch_token_stats(with_grad, [params] * 3, [None] * 3)
    want, _ = batch_token_stats(plain, [params] * 3, [None] * 3)
    assert not failed and torch.equal(got.nan_to_num(), want.nan_to_num())
    assert forced_token_stats(with_grad, [0, 1, 2], params) == forced_token_stats(plain, [0, 1, 2], params)


def records(varentropies):
    return [TokenRecord(token_id=i, text="x", logprob=-1.0, entropy=1.0, varentropy=v) for i, v in enumerate(varentropies)]


def test_varentropy_stop_fires_on_the_first_token_of_a_long_enough_streak():
    vs = [9.0, 0.1, 5.0, 0.2, 5.0, 6.0, 7.0, 0.1]
    r = Monitor(policies=[VarentropyStop(4.0, min_tokens=2, patience=2)]).run(RecordStream(records(vs)))
    # token 0 is before min_tokens; tokens 4 and 5 are the first streak of 2
    assert r.end.reason == "policy" and r.end.n_tokens == 6
    note = Monitor(policies=[parse_policy("varentropy-stop:threshold=4,action=note")]).run(RecordStream(records(vs)))
    assert note.end.reason == "length" and [e.index for e in note.events if e.type == "policy"] == [0, 2, 4, 5, 6]
    # a stream without varentropy (a remote engine) never triggers it
    assert Monitor(policies=[VarentropyStop(0.5)]).run(RecordStream(records([None] * 5))).end.reason == "length"
    with pytest.raises(Exception, match="threshold"):
        parse_policy("varentropy-stop:threshold=-1")


@pytest.mark.model
def test_generate_policy_stops_where_replay_of_its_trace_stops(decoder, tmp_path):
    args = ["generate", "Write a poem about the sea.", "--max-new-tokens", "40", "--ignore-eos", "--json"]
    full = CliRunner().invoke(main, args)
    assert full.exit_code == 0, full.output
    trace = tmp_path / "t.jsonl"
    trace.write_text(full.stdout)
    tokens = [e for e in map(json.loads, full.stdout.splitlines()) if e["type"] == "token"]
    assert len(tokens) == 40
    assert all(isinstance(t["varentropy"], float) for t in tokens)
    # a threshold that fires mid-way on this text
    threshold = float(np.median([t["varentropy"] for t in tokens[4:]]))
    spec = f"varentropy-stop:threshold={threshold!r},min_tokens=4,patience=2"
    replayed = replay_trace(read_traces(trace)[0], [parse_policy(spec)])
    assert replayed is not None, "choose a threshold that fires on this text"
    live = CliRunner().invoke(main, args + ["--policy", spec])
    end = json.loads(live.stdout.splitlines()[-1])
    assert end["type"] == "end" and end["reason"] == "policy" and end["n_tokens"] == replayed + 1
    bad = CliRunner().invoke(main, ["generate", "hi", "--policy", "varentropy-stop:limit=3"])
    assert bad.exit_code == 2 and "bad option" in bad.output

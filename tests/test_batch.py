"""Batched decoding on the real model: parity with single sequences, rows
leaving the batch, shared prefill, and the many-prompt CLI."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from livepp import EarlyStop, GenerationParams, Monitor, generate_many
from livepp.engines.torch.batch import BatchDecoder, BatchRequest
from livepp.cli.main import main

pytestmark = pytest.mark.model

PROMPTS = ["Hi!", "Write a poem about the sea, the moon and the stars over the harbour.", "What is 2+2?",
           "Tell me about owls, please, with some detail about how they hunt."]


def teacher_forced(model, ids, n_prompt):
    """Oracle: logprob of each generated id from one forward pass over prompt + generated."""
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    lps = torch.log_softmax(logits[n_prompt - 1 : -1], -1)
    return lps.gather(1, torch.tensor(ids[n_prompt:])[:, None])[:, 0].tolist()


def run_batch(decoder, requests):
    stream = BatchDecoder(decoder).stream(requests)
    rows = {i: [] for i in range(len(requests))}
    for i, record in stream:
        rows[i].append(record)
    return stream, rows


@pytest.mark.parametrize("sampling", [False, True])
def test_every_row_equals_its_own_teacher_forced_pass(decoder, sampling):
    prompt_ids = [decoder.encode(p) for p in PROMPTS]
    assert len(set(map(len, prompt_ids))) == 4  # different lengths: padding is exercised
    params = [GenerationParams(max_new_tokens=16, ignore_eos=True, **({"temperature": 0.9, "top_p": 0.95, "seed": 10 + i} if sampling else {}))
              for i in range(4)]
    _, rows = run_batch(decoder, [BatchRequest(tuple(ids), p) for ids, p in zip(prompt_ids, params)])
    for ids, p, records in zip(prompt_ids, params, rows.values()):
        gen = [r.token_id for r in records]
        assert len(gen) == 16
        expected = teacher_forced(decoder.model, ids + gen, len(ids))
        assert max(abs(a - r.logprob) for a, r in zip(expected, records)) <= 1e-4
        alone = [r.token_id for r in decoder.stream(ids, p)]
        assert gen == alone  # greedy: the batch-1 ids; seeded: the same draws


def test_a_stopped_row_leaves_the_batch_and_the_others_go_on(decoder):
    prompt_ids = [decoder.encode(p) for p in PROMPTS]
    params = GenerationParams(max_new_tokens=10, ignore_eos=True)
    batch_sizes = []
    handle = decoder.model.base_model.register_forward_pre_hook(lambda m, args, kwargs: batch_sizes.append(kwargs["input_ids"].shape[0]), with_kwargs=True)
    try:
        stream = BatchDecoder(decoder).stream([BatchRequest(tuple(ids), params) for ids in prompt_ids])
        rows = {i: [] for i in range(4)}
        for i, record in stream:
            rows[i].append(record)
            if i == 1 and len(rows[1]) == 3:
                stream.stop(1)
    finally:
        handle.remove()
    assert len(rows[1]) == 3 and stream.finish_reasons[1] == "policy"
    assert [len(rows[i]) for i in (0, 2, 3)] == [10, 10, 10]
    # Prefill with 4 rows, 2 steps with 4, then 3 rows for the remaining 7 steps.
    assert batch_sizes == [4, 4, 4] + [3] * 7
    _, alone = run_batch(decoder, [BatchRequest(tuple(prompt_ids[i]), params) for i in (0, 2, 3)])
    for k, i in enumerate((0, 2, 3)):
        assert [r.token_id for r in rows[i]] == [r.token_id for r in alone[k]]


def test_samples_of_one_prompt_share_one_prefill(decoder):
    ids = tuple(decoder.encode("Name a colour."))
    batch_sizes = []
    handle = decoder.model.base_model.register_forward_pre_hook(lambda m, args, kwargs: batch_sizes.append(kwargs["input_ids"].shape), with_kwargs=True)
    try:
        requests = [BatchRequest(ids, GenerationParams(max_new_tokens=4, temperature=1.0, seed=s, ignore_eos=True)) for s in range(3)]
        _, rows = run_batch(decoder, requests)
    finally:
        handle.remove()
    assert tuple(batch_sizes[0]) == (1, len(ids))  # one prefill row for three samples
    assert all(tuple(s) == (3, 1) for s in batch_sizes[1:])
    for s, records in rows.items():
        assert [r.token_id for r in records] == [r.token_id for r in decoder.stream(list(ids), requests[s].params)]


def test_generate_many_monitors_each_sample_like_a_single_run(decoder):
    params = GenerationParams(max_new_tokens=12, temperature=0.8, seed=4, ignore_eos=True)
    policy = lambda: [EarlyStop(3.0, metric="window_ppl", min_tokens=4)]  # noqa: E731
    results = generate_many(PROMPTS[:2], n=2, model=decoder, params=params, policies=policy)
    assert len(results) == 4
    for i, r in enumerate(results):
        p = PROMPTS[i // 2]
        seed = 4 + i % 2
        single = Monitor(policies=policy()).run(decoder.stream(decoder.encode(p), GenerationParams(max_new_tokens=12, temperature=0.8, seed=seed, ignore_eos=True)))
        assert r.end.reason == single.end.reason and r.token_ids == single.token_ids
        assert [t.logprob for t in r.tokens] == pytest.approx([t.logprob for t in single.tokens], abs=1e-4)
        assert r.events[0].params["sample"] == i and r.events[0].params["seed"] == seed


def test_cli_many_prompts_and_samples_tag_events(decoder):
    out = CliRunner().invoke(main, ["generate", "Name a colour.", "Name a fruit.", "-n", "2", "--temperature", "0.8", "--seed", "1",
                                    "--max-new-tokens", "5", "--json"])
    assert out.exit_code == 0, out.output
    events = [json.loads(line) for line in out.stdout.splitlines()]
    ends = {e["sample"]: e for e in events if e["type"] == "end"}
    assert sorted(ends) == [0, 1, 2, 3]
    starts = {e["sample"]: e for e in events if e["type"] == "start"}
    assert [starts[i]["params"]["seed"] for i in range(4)] == [1, 2, 1, 2]
    assert starts[0]["prompt_token_ids"] == starts[1]["prompt_token_ids"] != starts[2]["prompt_token_ids"]
    out = CliRunner().invoke(main, ["generate", "a", "b", "--remote", "http://127.0.0.1:1/v1", "--remote-model", "m"])
    # A remote engine runs the rows one request after another (no longer refused).
    assert out.exit_code == 2 and "cannot connect to http://127.0.0.1:1/v1" in out.output


def test_vote_samples_its_answers_as_one_batch(decoder):
    from livepp.car.routing import SHORT_PROMPT, Vote

    shapes = []
    handle = decoder.model.base_model.register_forward_pre_hook(lambda m, args, kwargs: shapes.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True)
    try:
        answer = Vote(decoder, n=4, max_new_tokens=6, seed=3).run("What is 2 + 3?", [])
    finally:
        handle.remove()
    assert shapes[0][0] == 1 and shapes[1] == (4, 1)  # one shared prefill, then 4 rows per step
    ids = decoder.encode(SHORT_PROMPT.format(question="What is 2 + 3?"))
    alone = ["".join(r.text for r in decoder.stream(ids, GenerationParams(max_new_tokens=6, temperature=0.7, seed=3 + i))) for i in range(4)]
    assert answer.detail["samples"] == alone


@pytest.mark.asyncio
async def test_astream_yields_the_same_events_and_stops_when_left(decoder):
    from livepp import astream

    params = GenerationParams(max_new_tokens=6, ignore_eos=True)
    got = [(s, e) async for s, e in astream(PROMPTS[:2], model=decoder, params=params)]
    ends = {s: e for s, e in got if e.type == "end"}
    expected = generate_many(PROMPTS[:2], model=decoder, params=params)
    assert [ends[i].text for i in range(2)] == [r.text for r in expected]
    # Leaving early stops the batch: the worker finishes and rows end cancelled.
    calls = []
    handle = decoder.model.base_model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        seen = 0
        stream = astream(PROMPTS[:2], model=decoder, params=GenerationParams(max_new_tokens=200, ignore_eos=True))
        async for s, e in stream:
            seen += e.type == "token"
            if seen == 4:
                break
        await stream.aclose()
    finally:
        handle.remove()
    assert len(calls) <= 4  # the prefill, a step or two, never the 200 tokens


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 8, 64, 65, 130])
def test_the_output_layer_of_a_batch_equals_the_models_own(decoder, rows):
    """A few rows go through ``W @ hidden.T`` (CPU kernels several times
    faster than linear's for 2 to 64 rows), more through linear padded to a
    multiple of 4, one row through linear as the model computes it: every
    way, the model's own logits."""
    import torch

    from livepp.engines.torch.rowcache import final_logits

    torch.manual_seed(rows)
    hidden = torch.randn(rows, decoder.model.config.hidden_size) * 3
    with torch.inference_mode():
        got, want = final_logits(decoder.model, hidden), decoder.model.lm_head(hidden)
    assert got.shape == want.shape and got.is_contiguous()
    if rows == 1:
        assert torch.equal(got, want)
    assert (got - want).abs().max().item() <= 1e-4 * want.abs().max().item()
    assert torch.equal(got.argmax(-1), want.argmax(-1))

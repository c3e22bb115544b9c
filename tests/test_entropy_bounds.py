"""Remote streams send only the top-k: the entropy they do not send lies in
the bounds livepp reports (livepp.core.entropy_bounds), checked against full
distributions: random ones, and the embedded model's on every token of a run."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from livepp.core.entropy_bounds import entropy_bounds
from livepp.engines.openai_chunks import ChunkParser


def entropy(p: np.ndarray) -> float:
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


@settings(max_examples=300, deadline=None)
@given(st.integers(2, 400), st.integers(1, 30), st.floats(0.05, 5.0), st.integers(0, 2**32 - 1), st.booleans())
def test_the_bounds_hold_the_entropy_of_any_distribution(vocab, k, alpha, seed, chosen_outside):
    p = np.random.default_rng(seed).dirichlet([alpha] * vocab)
    order = np.argsort(-p)
    k = min(k, vocab)
    top = np.log(p[order[:k]])
    chosen = math.log(p[order[k]]) if chosen_outside and k < vocab and p[order[k]] > 0 else None
    low, high, tail = entropy_bounds(top.tolist(), vocab_size=vocab, chosen=chosen)
    h = entropy(p)
    assert low - 1e-9 <= h <= high + 1e-9
    assert tail == pytest.approx(1 - p[order[:k]].sum() - (math.exp(chosen) if chosen is not None else 0), abs=1e-9)
    low_unknown_vocab, high_unknown_vocab, _ = entropy_bounds(top.tolist(), chosen=chosen)
    assert low_unknown_vocab == low and (high_unknown_vocab is None or tail <= 1e-12)


def test_the_bounds_meet_when_the_top_k_holds_all_the_mass():
    p = np.array([0.5, 0.25, 0.125, 0.0625, 0.0625])
    low, high, tail = entropy_bounds(np.log(p).tolist(), vocab_size=5)
    assert low == high == pytest.approx(entropy(p), rel=1e-12) and tail <= 1e-12
    # and the lower bound beats putting the whole tail on one token
    q = np.array([0.3, 0.2] + [0.5 / 50] * 50)
    low, high, tail = entropy_bounds(np.log(q[:2]).tolist(), vocab_size=52)
    one_token = entropy(np.array([0.3, 0.2, 0.5]))
    assert one_token < low <= entropy(q) <= high + 1e-12 and high == pytest.approx(entropy(q), rel=1e-12)


@pytest.mark.model
def test_the_bounds_hold_the_models_entropy_on_every_token_of_a_run(loaded, decoder):
    """The embedded model's own run, each token's top 20 sent through the
    remote chunk parser as a vLLM chunk: its bounds hold the entropy of the
    full distribution the token was drawn from."""
    import torch

    from livepp import GenerationParams, Monitor

    result = Monitor().run(decoder.stream(decoder.encode("Tell me about the history of Rome."),
                                          GenerationParams(max_new_tokens=48, temperature=0.9, seed=4, ignore_eos=True)))
    ids = list(result.events[0].prompt_token_ids) + result.token_ids
    with torch.inference_mode():
        logprobs = torch.log_softmax(loaded.model(torch.tensor([ids])).logits[0].double(), -1)
    n_prompt = len(result.events[0].prompt_token_ids)
    parser = ChunkParser("completions", vocab_size=logprobs.shape[-1])
    widths = []
    for i, token in enumerate(result.tokens):
        row = logprobs[n_prompt - 1 + i]
        values, top_ids = torch.topk(row, 20)
        top = {loaded.tokenizer.decode([int(t)]) + f"#{int(t)}": float(v) for t, v in zip(top_ids, values)}
        own = loaded.tokenizer.decode([token.token_id]) + f"#{token.token_id}"
        chunk = {"choices": [{"index": 0, "text": own, "logprobs": {"tokens": [own], "token_logprobs": [float(row[token.token_id])],
                                                                      "top_logprobs": [top], "text_offset": [0]}, "finish_reason": None}]}
        [record] = parser.records(chunk)
        low, high = record.entropy_bounds
        h = float(-(row.exp() * row).sum())
        assert low - 1e-9 <= h <= high + 1e-9, (i, low, h, high)
        assert record.tail_mass == pytest.approx(1 - float(values.exp().sum()) - (0 if own in top else math.exp(row[token.token_id])), abs=1e-9)
        widths.append(high - low)
    print(f"{len(widths)} tokens: bound width median {np.median(widths):.3f}, max {max(widths):.3f} nats")

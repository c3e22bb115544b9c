"""The compiled decoder's static KV cache: sized per generation, one stream at a time.

torch.compile with the "eager" backend traces the same graph without
generating kernels, so these run in seconds on a tiny random Llama."""

from __future__ import annotations

import pytest
import torch

from livepp import Decoder, GenerationParams, LiveppError
from livepp.engines.torch.models import LoadedModel


class _Tok:
    chat_template = None
    eos_token_id = None
    bos_token_id = None

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(97 + i % 26) for i in ids)


@pytest.fixture(scope="module")
def tiny():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, max_position_embeddings=4096)
    return LoadedModel(LlamaForCausalLM(config).eval(), _Tok(), "tiny", "memory")


def test_compiled_cache_is_sized_from_prompt_and_max_new_tokens(tiny):
    eager = Decoder(tiny)
    compiled = Decoder(tiny).compile(backend="eager")
    params = GenerationParams(max_new_tokens=2300, ignore_eos=True, top_logprobs=0)
    prompt = [3, 4, 5]
    # More than the 2048 tokens the old fixed cache silently capped at.
    got = [r.token_id for r in compiled.stream(prompt, params)]
    assert len(got) == 2300
    assert compiled._cache_len >= 3 + 2300
    want = [r.token_id for r in eager.stream(prompt, GenerationParams(max_new_tokens=40, ignore_eos=True, top_logprobs=0))]
    assert got[:40] == want


def test_a_fixed_cache_refuses_what_does_not_fit(tiny):
    compiled = Decoder(tiny).compile(backend="eager", max_cache_len=64)
    with pytest.raises(LiveppError, match="need a KV cache of 70 tokens"):
        compiled.stream([1, 2, 3, 4, 5, 6], GenerationParams(max_new_tokens=64))


def test_two_interleaved_streams_on_a_compiled_decoder_are_refused(tiny):
    compiled = Decoder(tiny).compile(backend="eager")
    params = GenerationParams(max_new_tokens=8, ignore_eos=True, top_logprobs=0)
    first = compiled.stream([1, 2, 3], params)
    next(first)
    second = compiled.stream([7, 8, 9], params)
    with pytest.raises(LiveppError, match="one stream at a time"):
        next(second)
    rest = list(first)  # the first stream is unharmed
    assert len(rest) == 7
    # Once it is done, the next stream runs and equals the eager decoder.
    again = [r.token_id for r in compiled.stream([7, 8, 9], params)]
    assert again == [r.token_id for r in Decoder(tiny).stream([7, 8, 9], params)]

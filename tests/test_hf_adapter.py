"""LiveppStoppingCriteria: final logits, finished rows, several generate() calls."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import StoppingCriteriaList

from livepp import GenerationParams, Monitor
from livepp.engines.torch.hf import LiveppStoppingCriteria


def test_reads_the_models_final_logits_after_softcapping():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                          num_key_value_heads=1, head_dim=16, final_logit_softcapping=1.5, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    model = Gemma2ForCausalLM(config).eval()
    prompt = torch.tensor([[2, 5, 9, 13]])
    with LiveppStoppingCriteria(model, policies=lambda: [], eos_token_id=[]) as stop:
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=6,
                             min_new_tokens=6, stopping_criteria=StoppingCriteriaList([stop]), eos_token_id=None)
    generated = out[0, prompt.shape[1]:]
    with torch.no_grad():
        logits = model(out).logits[0].float()  # softcapped by the model itself
    lps = torch.log_softmax(logits[prompt.shape[1] - 1 : -1], -1).gather(1, generated[:, None])[:, 0]
    expected = math.exp(-lps.mean().item())
    assert stop.trackers[0].n == 6
    assert stop.ppl[0] == pytest.approx(expected, rel=1e-5)


@pytest.mark.model
def test_batch_with_a_row_ending_early_and_two_calls_in_a_row(decoder):
    prompts = [decoder.encode("Name three colours."), decoder.encode("Write a long poem about the sea and the sky.")]
    params = GenerationParams(max_new_tokens=12, ignore_eos=True)
    alone = [Monitor().run(decoder.stream(p, params)) for p in prompts]
    a_ids, b_ids = alone[0].token_ids, alone[1].token_ids
    # An "end" token that row 0 emits at index 3 and row 1 never does.
    end_at = next(i for i in range(3, 12) if a_ids[i] not in a_ids[:i] and a_ids[i] not in b_ids)
    end_token = a_ids[end_at]

    width = max(map(len, prompts))
    pad = 0
    batch = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with LiveppStoppingCriteria(decoder.model, policies=lambda: [], eos_token_id=end_token) as stop:
        out = decoder.model.generate(batch, attention_mask=mask, do_sample=False, max_new_tokens=12,
                                     eos_token_id=end_token, pad_token_id=pad, stopping_criteria=StoppingCriteriaList([stop]))
        assert out[0, width:].tolist()[: end_at + 1] == a_ids[: end_at + 1]
        # Row 0 counts its tokens up to and including the end token, never the pads after it.
        assert stop.trackers[0].n == end_at + 1
        ppl_a = math.exp(-sum(e.logprob for e in alone[0].tokens[: end_at + 1]) / (end_at + 1))
        assert stop.ppl[0] == pytest.approx(ppl_a, rel=1e-4)
        assert stop.trackers[1].n == 12
        assert stop.ppl[1] == pytest.approx(alone[1].end.ppl, rel=1e-4)

        # A second call with the same adapter starts from fresh trackers.
        one = torch.tensor([prompts[1]])
        decoder.model.generate(one, attention_mask=torch.ones_like(one), do_sample=False, max_new_tokens=5, min_new_tokens=5,
                               pad_token_id=pad, stopping_criteria=StoppingCriteriaList([stop]))
        assert len(stop.trackers) == 1 and stop.trackers[0].n == 5
        ppl_b5 = math.exp(-sum(e.logprob for e in alone[1].tokens[:5]) / 5)
        assert stop.ppl[0] == pytest.approx(ppl_b5, rel=1e-4)

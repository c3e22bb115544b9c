"""The streaming decoder on the real embedded model."""

from __future__ import annotations

import pytest
import torch

from livepp import Decoder, EarlyStop, GenerationParams, LiveppError, Monitor, Tracker
from livepp.engines.detokenize import IncrementalDetokenizer

pytestmark = pytest.mark.model

PROMPT = "Name three colours of the rainbow."


def teacher_forced(decoder: Decoder, prompt_ids, generated_ids):
    """Log-probs, entropies and top-5 of the generated ids from ONE forward pass."""
    ids = torch.tensor([list(prompt_ids) + list(generated_ids)])
    with torch.inference_mode():
        logits = decoder.model(input_ids=ids).logits[0].float()
    # Position p predicts token p+1: the generated tokens are predicted by the
    # positions from the last prompt token onwards.
    start = len(prompt_ids) - 1
    logprobs = torch.log_softmax(logits[start : start + len(generated_ids)], dim=-1)
    target = torch.tensor(generated_ids)
    chosen = logprobs[torch.arange(len(generated_ids)), target]
    entropy = -(logprobs.exp() * logprobs).sum(-1)
    return chosen, entropy, logprobs


def stream_all(decoder, prompt, params):
    ids = decoder.encode(prompt, raw=params.raw)
    return ids, list(decoder.stream(ids, params))


@pytest.mark.parametrize(
    "params",
    [
        GenerationParams(max_new_tokens=24),
        GenerationParams(max_new_tokens=24, temperature=0.9, top_k=50, top_p=0.95, seed=7),
        GenerationParams(max_new_tokens=24, temperature=1.3, min_p=0.05, seed=11, ignore_eos=True),
    ],
    ids=["greedy", "sampled-topk-topp", "sampled-minp"],
)
def test_streamed_logprobs_equal_one_teacher_forced_pass(decoder, params):
    prompt_ids, records = stream_all(decoder, PROMPT, params)
    gen = [r.token_id for r in records]
    chosen, entropy, logprobs = teacher_forced(decoder, prompt_ids, gen)
    streamed = torch.tensor([r.logprob for r in records], dtype=torch.float32)
    assert (streamed - chosen).abs().max().item() <= 1e-4
    streamed_entropy = torch.tensor([r.entropy for r in records], dtype=torch.float32)
    assert (streamed_entropy - entropy).abs().max().item() <= 1e-3
    # The top alternatives are the raw distribution's top-5, best first.
    for i, r in enumerate(records):
        assert len(r.top_logprobs) == 5
        ref_vals, ref_ids = torch.topk(logprobs[i], 5)
        assert [t.logprob for t in r.top_logprobs] == pytest.approx(ref_vals.tolist(), abs=1e-4)
        # DeepConf token confidence: -mean of the top-20 raw logprobs.
        assert r.confidence == pytest.approx(-torch.topk(logprobs[i], 20).values.mean().item(), abs=1e-4)
        if params.greedy:
            assert r.token_id == r.top_logprobs[0].token_id
            assert r.sampling_logprob is None
        else:
            assert r.sampling_logprob is not None
    assert records[-1].finish_reason in ("eos", "length")
    assert all(r.finish_reason is None for r in records[:-1])


def test_greedy_ids_equal_hf_generate(decoder):
    params = GenerationParams(max_new_tokens=40)
    prompt_ids, records = stream_all(decoder, PROMPT, params)
    with torch.inference_mode():
        out = decoder.model.generate(
            torch.tensor([prompt_ids]), do_sample=False, max_new_tokens=40, attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long)
        )
    hf_ids = out[0, len(prompt_ids) :].tolist()
    assert [r.token_id for r in records] == hf_ids


def test_seeded_sampling_is_reproducible(decoder):
    params = GenerationParams(max_new_tokens=16, temperature=1.0, seed=123)
    _, a = stream_all(decoder, PROMPT, params)
    _, b = stream_all(decoder, PROMPT, params)
    assert [r.token_id for r in a] == [r.token_id for r in b]


def test_no_forward_pass_runs_after_an_early_stop(decoder):
    params = GenerationParams(max_new_tokens=64, ignore_eos=True)
    prompt_ids = decoder.encode("Write a long poem about the sea.")
    # Window PPL of any real text exceeds 1.0001, so this fires exactly at min_tokens.
    monitor = Monitor(policies=[EarlyStop(1.0001, metric="window_ppl", min_tokens=5)], tracker_factory=Tracker)
    with decoder.count_forward_passes() as calls:
        result = monitor.run(decoder.stream(prompt_ids, params))
    assert result.end.reason == "policy"
    assert result.end.n_tokens == 5
    # One prefill + one decode step for each token after the first.
    assert calls[0] == 5


def test_max_new_tokens_and_stop_strings(decoder):
    _, records = stream_all(decoder, PROMPT, GenerationParams(max_new_tokens=3, ignore_eos=True))
    assert len(records) == 3 and records[-1].finish_reason == "length"
    _, full = stream_all(decoder, "Count from 1 to 20, separated by commas.", GenerationParams(max_new_tokens=60))
    text = "".join(r.text for r in full)
    assert "5" in text
    _, stopped = stream_all(decoder, "Count from 1 to 20, separated by commas.", GenerationParams(max_new_tokens=60, stop=("5",)))
    stopped_text = "".join(r.text for r in stopped)
    assert stopped[-1].finish_reason == "stop_string"
    # The stop fires on the token that completes the first "5", not later:
    # the same tokens as the full run up to there, and no "5" before the last token.
    first = next(i for i in range(len(full)) if "5" in "".join(r.text for r in full[: i + 1]))
    assert [r.token_id for r in stopped] == [r.token_id for r in full[: first + 1]]
    assert "5" not in "".join(r.text for r in stopped[:-1]) and "5" in stopped[-1].text
    # Two stop strings: whichever appears first ends the run.
    _, either = stream_all(decoder, "Count from 1 to 20, separated by commas.", GenerationParams(max_new_tokens=60, stop=("7", "3")))
    first3 = next(i for i in range(len(full)) if "3" in "".join(r.text for r in full[: i + 1]))
    assert len(either) == first3 + 1


UTF8_SAMPLES = ["你好，世界！今天天气很好。", "Cats 🐱🐶 and emoji 👩‍👩‍👧 mixed with 中文 and ñ é ü", "🎉🎉🎉 日本語のテキスト"]


@pytest.mark.parametrize("text", UTF8_SAMPLES)
def test_incremental_detokenizer_round_trips_multibyte_text(loaded, text):
    tok = loaded.tokenizer
    ids = tok(text, add_special_tokens=False)["input_ids"]
    detok = IncrementalDetokenizer(tok)
    pieces = [detok.add(i) for i in ids]
    pieces.append(detok.finish())
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=True) == text
    assert all("\ufffd" not in p for p in pieces)
    # Some character really was split over several tokens.
    assert len(ids) > len(text.encode("utf-8")) / 4


def test_a_token_that_really_decodes_to_the_replacement_character_is_released(loaded):
    tok = loaded.tokenizer
    [fffd] = tok("\ufffd", add_special_tokens=False)["input_ids"]  # one token, U+FFFD itself
    ids = tok("ok", add_special_tokens=False)["input_ids"] + [fffd] * 12
    detok = IncrementalDetokenizer(tok)
    calls = []
    original = detok._decode  # every decode it makes goes through this

    def counting(ids_):
        calls.append(len(ids_))
        return original(ids_)

    detok._decode = counting
    pieces = [detok.add(i) for i in ids]
    # Held at most 4 ids (the longest UTF-8 character), then released: the
    # decode window stays bounded instead of growing with every token.
    assert "".join(pieces).count("\ufffd") >= 12 - 4
    assert max(calls) <= 6 + 4 + 1
    rest = detok.finish()
    assert "".join(pieces) + rest == tok.decode(ids) == "ok" + "\ufffd" * 12


def test_the_detokenizer_decodes_with_the_tokenizers_library_directly_only_where_the_text_is_the_same(loaded):
    """SmolLM2's fast tokenizer adds nothing to the ``tokenizers`` decode, so
    the detokenizer calls it directly (transformers' wrapper was most of a
    token's decode): the same text for any window of ids, special tokens
    kept or skipped. A tokenizer that cleans up spaces, or whose class
    decodes its own way, keeps its own ``decode``."""
    import copy
    import random

    from livepp.engines.detokenize import _plain_decode

    tok = loaded.tokenizer
    fast = _plain_decode(tok)
    assert fast is not None
    rng = random.Random(0)
    specials = list(tok.all_special_ids)
    for skip in (True, False):
        detok = IncrementalDetokenizer(tok, skip_special_tokens=skip)
        for _ in range(2000):
            ids = [rng.choice(specials) if rng.random() < 0.1 else rng.randrange(len(tok)) for _ in range(rng.randint(1, 8))]
            assert detok._decode(ids) == tok.decode(ids, skip_special_tokens=skip)
    cleaning = copy.deepcopy(tok)
    cleaning.clean_up_tokenization_spaces = True
    assert _plain_decode(cleaning) is None

    class OwnDecode(type(tok)):
        def _decode(self, token_ids, **kwargs):
            return "!" + super()._decode(token_ids, **kwargs)

    own = copy.deepcopy(tok)
    own.__class__ = OwnDecode
    assert _plain_decode(own) is None
    assert IncrementalDetokenizer(own)._decode(tok("Hi", add_special_tokens=False)["input_ids"]) == "!Hi"


def test_finish_releases_a_dangling_byte_at_the_end(loaded):
    tok = loaded.tokenizer
    # A dangling first byte of a character at the very end.
    ids = tok("abc é", add_special_tokens=False)["input_ids"]
    detok = IncrementalDetokenizer(tok)
    pieces = [detok.add(i) for i in ids]
    partial = [i for i in range(tok.vocab_size) if tok.convert_ids_to_tokens(i) == "Ã"][:1]  # byte 0xC3 alone
    pieces += [detok.add(i) for i in partial]
    pieces.append(detok.finish())
    assert partial and "".join(pieces) == tok.decode(ids + partial) == "abc é\ufffd"


@pytest.mark.parametrize("prompt", ["用中文介绍一下你自己。", "Reply with only emoji: 🐱🎉🌍"])
def test_streamed_text_round_trips_for_chinese_and_emoji_prompts(decoder, prompt):
    params = GenerationParams(max_new_tokens=40, temperature=0.8, seed=3)
    _, records = stream_all(decoder, prompt, params)
    ids = [r.token_id for r in records]
    streamed = "".join(r.text for r in records)
    assert streamed == decoder.tokenizer.decode(ids, skip_special_tokens=True)


def test_raw_text_continuation_in_chinese(decoder):
    params = GenerationParams(max_new_tokens=30, ignore_eos=True, raw=True)
    _, records = stream_all(decoder, "中文：你好，世界！我们", params)
    ids = [r.token_id for r in records]
    streamed = "".join(r.text for r in records)
    assert streamed == decoder.tokenizer.decode(ids, skip_special_tokens=True)
    assert any(ord(c) > 0x2E80 for c in streamed), streamed  # really multi-byte output


def test_bad_inputs_fail_before_any_compute(decoder):
    with decoder.count_forward_passes() as calls:
        with pytest.raises(LiveppError, match="the prompt is empty"):
            decoder.encode("   ")
        too_long = [42] * decoder.context_length
        with pytest.raises(LiveppError, match="context is 8192 tokens"):
            decoder.stream(too_long, GenerationParams())
        with pytest.raises(LiveppError, match="no tokens"):
            decoder.stream([], GenerationParams())
    assert calls[0] == 0


def test_generation_never_runs_past_the_context(loaded):
    # The same clamp as at 8192 tokens, on a decoder told its context is 64
    # (an 8k-token prefill would cost most of a minute here).
    small = Decoder(loaded)
    small.context_length = 64
    ids = [42] * 61
    records = list(small.stream(ids, GenerationParams(max_new_tokens=50, ignore_eos=True, top_logprobs=0, confidence_k=0, entropy=False)))
    assert len(records) == 3 and records[-1].finish_reason == "length"
    assert all(r.entropy is None and r.confidence is None and r.top_logprobs == () for r in records)

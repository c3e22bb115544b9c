"""A text too long for the context is refused after counting its words, or
about a context's worth of its tokens, never by tokenizing all of it; a
text that fits is never refused."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from livepp.core.params import PromptTooLong
from livepp.engines.encoder import PromptEncoder
from livepp.engines.prompt_size import COUNT_FROM, SizeGuard, count_words

RUNS = ["-" * 40, " " * 70, "=" * 64]
PIECES = ["word", " ", "  ", "\n", "\n\n", "-" * 40, " " * 70, "0", "日本語", "😀", " internationalization", ".", "a", "\t", "\u3000", "\xa0"]


class Counting:
    """A tokenizer that counts the characters it is asked to tokenize."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.chars = tokenizer, 0

    def __call__(self, text, **kwargs):
        self.chars += len(text)
        return self.tokenizer(text, **kwargs)


@given(st.text(alphabet=st.sampled_from("ab \t\n\r\x0b\x0c\x1c\x85\xa0\u1680\u2000\u2028\u3000\u3001日😀"), max_size=60))
def test_words_are_counted_as_str_split_counts_them(text):
    assert count_words(text) == len(text.split())


def test_smollm2s_vocabulary_gives_each_word_a_token(loaded):
    guard = SizeGuard(loaded.tokenizer, 8192)
    assert (guard.chars_per_token, guard.words_per_token) == (82, 1)


def test_characters_the_tokenizer_drops_neither_separate_nor_make_words(loaded):
    """SmolLM2's tokenizer drops six control characters (\\x04, \\x06, \\x13,
    \\x14, \\x16, and \\x1d, which str.split takes for whitespace): a run
    of them is no word, and words joined by one are one run."""
    guard = SizeGuard(loaded.tokenizer, 512)
    assert count_words("\x04 \x04 a\x1db c", guard._sep, guard._keep) == 2
    assert count_words("\x04 \x04 a\x1db c") == len("\x04 \x04 a\x1db c".split()) == 5
    for text in ("\x04 " * 2000, "\x1d".join(["ab"] * 2000), "\x04\x06".join(["a"] * 3000), "日本 " * 2000):
        tokens = len(loaded.tokenizer(text)["input_ids"])
        try:
            guard.check(text)
        except PromptTooLong:
            assert tokens >= 512, (text[:8], tokens)


def test_a_long_text_is_refused_by_its_words_untokenized(loaded):
    encoder = PromptEncoder(loaded.tokenizer, context_length=8192, name="m")
    text = "word " * 60_000  # 300 kB: under the 82-characters-a-token bound, 60,000 words
    with pytest.raises(PromptTooLong, match="60000 words"):
        encoder.check_size(text)
    encoder._tokenizer = None  # encode must refuse it without a tokenizer
    with pytest.raises(PromptTooLong, match="words"):
        encoder.encode(text, raw=True)


def test_a_long_text_without_words_is_refused_after_about_a_contexts_worth_of_tokenization(loaded):
    text = "日本語" * 100_000  # 300,000 characters, no whitespace: one word, 100,000 tokens or so
    guard = SizeGuard(loaded.tokenizer, 8192)
    guard.check(text)  # neither characters nor words can tell
    counting = Counting(loaded.tokenizer)
    with pytest.raises(PromptTooLong, match="more than 8191 tokens"):
        guard.count_slices(counting, text)
    assert counting.chars <= 2 * 2 * 8192  # two slices of 2 x context characters, not 300,000
    with pytest.raises(PromptTooLong):
        PromptEncoder(loaded.tokenizer, context_length=8192, name="m").encode(text, raw=True)


def test_a_long_text_that_fits_is_not_refused_and_is_encoded_whole(loaded):
    context = 64
    text = ("-" * 600 + " ") * 2  # 1,202 characters, in about 22 tokens
    assert len(text) > COUNT_FROM * context
    encoder = PromptEncoder(loaded.tokenizer, context_length=context, name="m")
    assert encoder.encode(text, raw=True) == loaded.tokenizer(text)["input_ids"]
    assert len(encoder.encode(text, raw=True)) < context


def test_tokenize_counts_no_words_a_document_may_be_longer_than_the_context(loaded):
    encoder = PromptEncoder(loaded.tokenizer, context_length=64, name="m")
    assert len(encoder.tokenize("word " * 100)) == len(loaded.tokenizer("word " * 100)["input_ids"])


def test_a_refused_text_never_fits(loaded):
    """Random texts of words, whitespace of every kind, runs, digits, CJK and
    emoji, over several contexts: whatever the words or the slices refuse has
    at least the context's tokens; texts of long runs (many characters a
    token) that fit are let through."""
    rnd = random.Random(20261126)
    guard = {c: SizeGuard(loaded.tokenizer, c) for c in (32, 64, 128)}
    by_words = by_slices = fitting_long = 0
    for k in range(400):
        pieces, n = (PIECES, 800) if k % 2 == 0 else (RUNS + ["word", "\n"], 200)
        text = "".join(rnd.choice(pieces) for _ in range(rnd.randint(50, n)))
        context = rnd.choice([32, 64, 128])
        tokens = len(loaded.tokenizer(text)["input_ids"])
        try:
            guard[context].check(text)
        except PromptTooLong:
            by_words += 1
            assert tokens >= context, (text, context)
            continue
        try:
            guard[context].count_slices(loaded.tokenizer, text)
        except PromptTooLong:
            by_slices += 1
            assert tokens >= context, (text, context)
        else:
            fitting_long += tokens < context and len(text) > COUNT_FROM * context
    assert by_words > 60 and by_slices > 5 and fitting_long > 10, (by_words, by_slices, fitting_long)  # every path was tried


def test_the_word_bound_refuses_at_the_context_and_not_one_word_before(loaded):
    guard = SizeGuard(loaded.tokenizer, 512)
    fits = "a" + " a" * 510  # 511 words, 511 tokens: one left to generate
    assert len(loaded.tokenizer(fits)["input_ids"]) == 511
    guard.check(fits)
    with pytest.raises(PromptTooLong, match="512 words"):
        guard.check(fits + " a")

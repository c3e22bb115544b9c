"""A prompt too long for the context, refused for a fraction of what
tokenizing it would cost (a megabyte of text takes SmolLM2's tokenizer about
a third of a second, taken from the cores the batch steps on).

Three bounds, cheapest first:

1. **Characters.** No token decodes to more than the vocabulary's longest
   piece (plus one: a leading space a decoder drops from a token alone), so
   a text of more than ``context x that`` characters cannot fit, whatever it
   says.
2. **Words** (of a text; chat messages, which a template may leave out, have
   only the first bound). If no token of the vocabulary spans more than ``R``
   runs of non-whitespace characters (1 for SmolLM2), a text of
   ``context x R`` such runs cannot fit. ``R`` is read from the vocabulary,
   and which characters the tokenizer drops (they neither separate runs nor
   make one), once per tokenizer; the bound is used only for a tokenizer
   that changes nothing before it tokenizes (no normalizer): not Gemma 3's,
   whose normalizer rewrites spaces. The runs are counted with numpy (300 kB
   in about two milliseconds).
3. **Slices** (of a text too). A text of more than :data:`COUNT_FROM` characters a token of
   context is tokenized in slices cut at whitespace, and refused as soon as
   the slices hold the context's tokens (less :data:`CUT_MARGIN` a cut): a
   refusal costs at most about a context's worth of tokenization.

A prompt none of them refuses may still be too long: its encoding says so.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from livepp.core.params import PromptTooLong
from livepp.engines.protocol import Prompt

__all__ = ["SizeGuard", "prompt_chars", "count_words", "COUNT_FROM", "CUT_MARGIN"]

COUNT_FROM = 8
"""Texts of more characters than this many per token of context are counted
slice by slice before they are encoded (few texts average 8 characters a
token, so one that fits is rarely tokenized twice)."""

CUT_MARGIN = 16
"""Tokens a cut between two slices may add to their count (a cut is made at
whitespace, where it adds none for the tokenizers livepp knows)."""

_TABLE = 0x3001
"""Code points below this are looked up one by one (every character
``str.isspace`` takes lies below it); the entry at ``_TABLE`` stands for all
those above."""
_WHITESPACE = [c for c in range(_TABLE) if chr(c).isspace()]
_SPLIT_SEP = np.zeros(_TABLE + 1, dtype=bool)
_SPLIT_SEP[_WHITESPACE] = True
_SPLIT_KEEP = ~_SPLIT_SEP


_ALIVE: dict[tuple[Any, ...], np.ndarray] = {}


def _alive(tokenizer: Any) -> np.ndarray:
    """Which code points below the table the tokenizer keeps (gives a token
    to, alone); the entry for those above is False. Once per vocabulary:
    12,289 characters take it a third of a second."""
    key = (type(tokenizer).__name__, getattr(tokenizer, "name_or_path", None), len(tokenizer))
    if key not in _ALIVE:
        ids = tokenizer([chr(c) for c in range(_TABLE)], add_special_tokens=False)["input_ids"]
        _ALIVE[key] = np.array([bool(i) for i in ids] + [False])
    return _ALIVE[key]


def prompt_chars(prompt: Prompt) -> int:
    """Characters of a prompt: its text, or its messages' contents."""
    if isinstance(prompt, str):
        return len(prompt)
    return sum(len(m.get("content") or "") for m in prompt if isinstance(m, dict) and isinstance(m.get("content"), str))


def count_words(text: str, sep: np.ndarray = _SPLIT_SEP, keep: np.ndarray = _SPLIT_KEEP) -> int:
    """Runs of characters between separators (``sep``) that hold a kept
    character (``keep``); with the default tables, ``len(text.split())``
    without making the strings."""
    if not text:
        return 0
    codes = np.minimum(np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4"), _TABLE)
    is_sep = sep[codes]
    starts = np.flatnonzero(~is_sep & np.concatenate(([True], is_sep[:-1])))
    return int(np.count_nonzero(np.logical_or.reduceat(keep[codes], starts))) if len(starts) else 0


class SizeGuard:
    """The bounds above for one tokenizer and context."""

    def __init__(self, tokenizer: Any, context_length: int) -> None:
        pieces = [tokenizer.convert_tokens_to_string([t]) for t in tokenizer.get_vocab()]
        self.context_length = context_length
        self.chars_per_token = max([1, *(len(p) for p in pieces)]) + 1
        """The most characters one token decodes to, plus one (a decoder may
        drop the leading space of a token alone): 82 for SmolLM2's vocabulary."""
        self.words_per_token: int | None = None
        """The most runs of non-whitespace characters one token spans (1 for
        SmolLM2); None for a tokenizer that changes its text before it
        tokenizes (a normalizer), whose runs may not be the model's."""
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None and backend.normalizer is None:
            # What the tokenizer drops (SmolLM2's drops 6 control characters)
            # neither separates runs nor makes one; what it keeps above the
            # table is not counted (fewer runs: still a bound).
            alive = _alive(tokenizer)
            self._sep, self._keep = _SPLIT_SEP & alive, _SPLIT_KEEP & alive
            self.words_per_token = max([1, *(len(p.split()) for p in pieces)])

    def check_chars(self, prompt: Prompt) -> None:
        """Raise :class:`PromptTooLong` for a prompt of more characters than
        the context can hold."""
        limit = self.context_length * self.chars_per_token
        chars = prompt_chars(prompt)
        if chars > limit:
            raise PromptTooLong(f"the prompt has {chars} characters; this model's context of {self.context_length} tokens holds at "
                                f"most {limit} ({self.chars_per_token} characters per token at most)")

    def check(self, prompt: Prompt) -> None:
        """Raise :class:`PromptTooLong` for a prompt that cannot fit, untokenized:
        its characters, and a text's words. (Chat messages are bounded by
        their characters only: a chat template may leave some text out.)"""
        self.check_chars(prompt)
        per = self.words_per_token
        if isinstance(prompt, str) and per is not None and len(prompt) >= self.context_length:
            words = count_words(prompt, self._sep, self._keep)
            if words >= self.context_length * per:
                raise PromptTooLong(f"the prompt has {words} words, and no token spans more than {per}; this model's context is "
                                    f"{self.context_length} tokens (at least one must be left to generate)")

    def count_slices(self, tokenizer: Any, prompt: Prompt) -> None:
        """Raise :class:`PromptTooLong` for a long text that holds the
        context's tokens, counted in slices of ``2 x context`` characters cut
        at whitespace, stopping as soon as the count, less :data:`CUT_MARGIN`
        per cut, reaches the context (``tokenizer`` is the caller's to lock;
        chat messages are not counted)."""
        context = self.context_length
        if not isinstance(prompt, str) or len(prompt) <= COUNT_FROM * context:
            return
        text, size, count, cuts, pos = prompt, 2 * context, 0, 0, 0
        while pos < len(text):
            end = min(pos + size, len(text))
            if end < len(text):
                space = max(text.rfind(" ", pos + size // 2, end), text.rfind("\n", pos + size // 2, end))
                end = space if space > pos else end
                cuts += 1
            count += len(tokenizer(text[pos:end], add_special_tokens=False)["input_ids"])
            if count - CUT_MARGIN * cuts >= context:
                raise PromptTooLong(f"the prompt has more than {context - 1} tokens (counted in its first {end} characters of "
                                    f"{len(text)}); this model's context is {context} tokens (at least one must be left to generate)")
            pos = end

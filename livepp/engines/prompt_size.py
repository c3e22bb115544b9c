"""Refusing a prompt too long for the context before tokenizing it.

No token of a vocabulary decodes to more than its longest piece, so a text of
more than ``context_length x longest_piece`` characters cannot fit in the
context whatever it says: it is refused without spending the tokenizer's time
(a megabyte of text takes the tokenizer about a second).
"""

from __future__ import annotations

from typing import Any

from livepp.core.params import PromptTooLong
from livepp.engines.protocol import Prompt

__all__ = ["longest_piece", "prompt_chars", "refuse_oversized"]


def longest_piece(tokenizer: Any) -> int:
    """The most characters one token of ``tokenizer`` decodes to (81 for
    SmolLM2's vocabulary); at least 1."""
    vocab = tokenizer.get_vocab()
    return max([1, *(len(tokenizer.convert_tokens_to_string([t])) for t in vocab)])


def prompt_chars(prompt: Prompt) -> int:
    """Characters of a prompt: its text, or its messages' contents."""
    if isinstance(prompt, str):
        return len(prompt)
    return sum(len(m.get("content") or "") for m in prompt if isinstance(m, dict))


def refuse_oversized(prompt: Prompt, *, context_length: int, chars_per_token: int) -> None:
    """Raise :class:`PromptTooLong` for a prompt that cannot fit, untokenized."""
    limit = context_length * chars_per_token
    chars = prompt_chars(prompt)
    if chars > limit:
        raise PromptTooLong(f"the prompt has {chars} characters; this model's context of {context_length} tokens holds at most "
                            f"{limit} ({chars_per_token} characters per token at most)")

"""Incremental detokenization that is right for multi-byte UTF-8.

A token can end in the middle of a UTF-8 character (byte-level BPE splits a
Chinese character or an emoji over several tokens), and some tokenizers strip
a leading space when a sequence starts with a word piece. So each new token's
text is the difference between decoding a short window of recent ids with and
without the new ones, and text is held back while the window decodes to a
trailing U+FFFD (an incomplete character). A character is at most 4 bytes, so
at most 4 ids are ever held for that reason: beyond that the U+FFFD is real
(a token that decodes to it) and is released. ``finish()`` releases whatever
is held, so that the concatenated pieces equal ``tokenizer.decode(all_ids)``.
"""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["IncrementalDetokenizer"]

# How many ids before the unreleased ones are re-decoded as context; enough for
# tokenizers whose decoding of a piece depends on its left neighbour.
_CONTEXT = 6
# The most ids an unfinished UTF-8 character can span (one byte each).
_MAX_HELD = 4


def _plain_decode(tokenizer: Any) -> Any:
    """The ``tokenizers`` decoder a transformers fast tokenizer calls, when
    its ``decode`` adds nothing to it (its own ``_decode``, no clean-up of
    spaces): called directly, a token's decode skips transformers' argument
    handling, most of its cost (two decodes a token, every row of a batch).
    None when anything could differ."""
    module = sys.modules.get("transformers.tokenization_utils_tokenizers")  # imported if the tokenizer is one of its
    TokenizersBackend = getattr(module, "TokenizersBackend", None)
    if TokenizersBackend is None or not isinstance(tokenizer, TokenizersBackend) or type(tokenizer)._decode is not TokenizersBackend._decode:
        return None
    if type(tokenizer).decode is not TokenizersBackend.decode or getattr(tokenizer, "clean_up_tokenization_spaces", True):
        return None
    backend = getattr(tokenizer, "_tokenizer", None)
    return getattr(backend, "decode", None)


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, *, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._fast = _plain_decode(tokenizer)
        self._ids: list[int] = []
        self._prefix_offset = 0  # start of the context window
        self._read_offset = 0  # ids before this are already released as text
        self._released_chars = 0  # length of all text released so far

    def _decode(self, ids: list[int]) -> str:
        if self._fast is not None:
            return self._fast(ids, skip_special_tokens=self._skip)
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip)

    def add(self, token_id: int) -> str:
        """Append one id; return the text it completes (possibly empty)."""
        self._ids.append(token_id)
        prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full = self._decode(self._ids[self._prefix_offset :])
        held = len(self._ids) - self._read_offset
        unfinished = full.endswith("\ufffd") and held <= _MAX_HELD
        if unfinished or len(full) <= len(prefix) or not full.startswith(prefix):
            # An unfinished character (or a decode that rewrote its prefix):
            # wait for more ids before releasing anything.
            return ""
        self._prefix_offset = max(self._read_offset, len(self._ids) - _CONTEXT)
        self._read_offset = len(self._ids)
        piece = full[len(prefix) :]
        self._released_chars += len(piece)
        return piece

    def finish(self) -> str:
        """Release held-back text: what ``decode(all ids)`` has beyond what
        was released (once per generation, so decoding everything is cheap)."""
        self._read_offset = len(self._ids)
        # Everything the full decode has beyond the length already released;
        # never empty for want of a matching window, as a window diff could be.
        rest = self._decode(self._ids)[self._released_chars :]
        self._released_chars += len(rest)
        return rest

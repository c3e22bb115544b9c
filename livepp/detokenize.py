"""Incremental detokenization that is right for multi-byte UTF-8.

A token can end in the middle of a UTF-8 character (byte-level BPE splits a
Chinese character or an emoji over several tokens), and some tokenizers strip
a leading space when a sequence starts with a word piece. So each new token's
text is the difference between decoding a short window of recent ids with and
without the new ones, and text is held back while the window decodes to a
trailing U+FFFD (an incomplete character). ``finish()`` releases whatever is
held, so that the concatenated pieces equal ``tokenizer.decode(all_ids)``.
"""

from __future__ import annotations

from typing import Any

__all__ = ["IncrementalDetokenizer"]

# How many ids before the unreleased ones are re-decoded as context; enough for
# tokenizers whose decoding of a piece depends on its left neighbour.
_CONTEXT = 6


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, *, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix_offset = 0  # start of the context window
        self._read_offset = 0  # ids before this are already released as text

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip)

    def add(self, token_id: int) -> str:
        """Append one id; return the text it completes (possibly empty)."""
        self._ids.append(token_id)
        prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full = self._decode(self._ids[self._prefix_offset :])
        if full.endswith("\ufffd") or len(full) <= len(prefix) or not full.startswith(prefix):
            # An unfinished character (or a decode that rewrote its prefix):
            # wait for more ids before releasing anything.
            return ""
        self._prefix_offset = max(self._read_offset, len(self._ids) - _CONTEXT)
        self._read_offset = len(self._ids)
        return full[len(prefix) :]

    def finish(self) -> str:
        """Release held-back text, decoded as the full decode would show it."""
        prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full = self._decode(self._ids[self._prefix_offset :])
        self._read_offset = len(self._ids)
        return full[len(prefix) :] if full.startswith(prefix) else ""

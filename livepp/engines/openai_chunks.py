"""What an OpenAI-compatible stream's chunks say, as token records: the
parsing the remote engine (a thread per stream) and the gateway (one event
loop for every stream) share.

One :class:`ChunkParser` per stream, fed each chunk's parsed JSON: chat
chunks (``logprobs.content[{token, logprob, bytes, top_logprobs}]``) or
completions chunks (``logprobs`` {tokens, token_logprobs, top_logprobs}).
Per token it computes what livepp reports and nothing more: the raw logprob,
DeepConf confidence (−mean of the top logprobs), the entropy's bounds and the
tail mass (:mod:`livepp.core.entropy_bounds`), and the top alternatives only
when they are asked for. Token bytes split across chunks are decoded
incrementally, so a character is whole in the record that completes it.
"""

from __future__ import annotations

import codecs
import math
from typing import Any

from livepp.core.entropy_bounds import entropy_bounds
from livepp.core.events import TokenRecord, TopLogprob

__all__ = ["ChunkParser", "map_finish_reason"]

_FINISH = {"stop": "eos", "eos": "eos", "tool_calls": "eos", "function_call": "eos", "length": "length"}


def map_finish_reason(reason: str | None) -> str | None:
    """An engine's finish reason in livepp's contract: eos, length, else error."""
    if not reason:
        return None
    return _FINISH.get(str(reason), "error")


class ChunkParser:
    """``api``: "chat" or "completions"; ``top_k``: alternatives each record
    keeps (0: none built); ``text_only``: the text alone (no logprobs asked);
    ``vocab_size``: for the entropy's upper bound (None: no upper bound)."""

    def __init__(self, api: str, *, top_k: int = 0, text_only: bool = False, vocab_size: int | None = None) -> None:
        self.chat = api == "chat"
        self.top_k, self.text_only, self.vocab_size = top_k, text_only, vocab_size
        self.finish_reason: str | None = None
        self.engine_finish_reason: str | None = None
        self.received = 0
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def flush(self) -> str:
        """Bytes of a character the engine never finished, as U+FFFD."""
        return self._utf8.decode(b"", final=True)

    def count(self, chunk: dict[str, Any]) -> int:
        """Tokens a chunk carries, without parsing them."""
        choices = chunk.get("choices") or []
        if not choices:
            return 0
        choice = choices[0]
        if self.text_only:
            return 1 if ((choice.get("delta") or {}).get("content") if self.chat else choice.get("text")) else 0
        logprobs = choice.get("logprobs") or {}
        return len(logprobs.get("content") or []) if self.chat else len(logprobs.get("tokens") or [])

    def records(self, chunk: dict[str, Any]) -> list[TokenRecord]:
        choices = chunk.get("choices") or []
        if not choices:
            return []  # e.g. a usage-only chunk
        choice = choices[0]
        finish = choice.get("finish_reason")
        if finish:
            # Often on a last chunk that carries no token; the monitor reads it here.
            self.finish_reason = map_finish_reason(finish)
            self.engine_finish_reason = str(finish)
        if self.text_only:
            content = (choice.get("delta") or {}).get("content") if self.chat else choice.get("text")
            if not content:
                return []
            self.received += 1
            return [TokenRecord(token_id=-1, text=content, logprob=math.nan)]
        logprobs = choice.get("logprobs") or {}
        items = self._chat_items(logprobs) if self.chat else self._completion_items(logprobs)
        self.received += len(items)
        last = len(items) - 1
        return [self._record(token, text, lp, top, map_finish_reason(finish) if i == last else None)
                for i, (token, text, lp, top) in enumerate(items)]

    def _chat_items(self, logprobs: dict[str, Any]) -> list[tuple[str, str, float, list[tuple[str, float]]]]:
        out = []
        for e in logprobs.get("content") or []:
            raw = e.get("bytes")
            token = e.get("token", "")
            text = self._utf8.decode(bytes(raw)) if raw is not None else token
            out.append((token, text, e["logprob"], [(t.get("token", ""), t["logprob"]) for t in e.get("top_logprobs") or []]))
        return out

    @staticmethod
    def _completion_items(logprobs: dict[str, Any]) -> list[tuple[str, str, float, list[tuple[str, float]]]]:
        tops = logprobs.get("top_logprobs") or []
        return [(token, token, lp, list((tops[i] or {}).items()) if i < len(tops) else [])
                for i, (token, lp) in enumerate(zip(logprobs.get("tokens") or [], logprobs.get("token_logprobs") or []))]

    def _record(self, token: str, text: str, logprob: float, top: list[tuple[str, float]], finish: str | None) -> TokenRecord:
        values = [v for _, v in top]
        confidence = -sum(values) / len(values) if values else None
        bounds = tail = None
        if values:
            # The chosen token counts as known mass when the top-k does not hold it.
            outside = None if any(t == token for t, _ in top) else float(logprob)
            low, high, tail = entropy_bounds(values, vocab_size=self.vocab_size, chosen=outside)
            bounds = (low, high)
        alternatives: tuple[TopLogprob, ...] = ()
        if self.top_k:
            ranked = sorted(top, key=lambda x: -x[1])[: self.top_k]
            alternatives = tuple(TopLogprob(-1, t, float(v)) for t, v in ranked)
        return TokenRecord(token_id=-1, text=text, logprob=float(logprob), entropy=None, top_logprobs=alternatives,
                           confidence=confidence, finish_reason=finish, entropy_bounds=bounds, tail_mass=tail)

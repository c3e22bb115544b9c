"""A prompt's scores in the shapes clients read: OpenAI's ``echo`` with
``logprobs`` (what lm-evaluation-harness's ``local-completions`` slices) and
vLLM's ``prompt_logprobs``.

The worker that runs a request fills a :class:`ScoredPrompt` as the engine
scores the prompt chunk by chunk (token texts decoded there, off the event
loop) and hands it over once every position is in; the event loop only
formats it.

* echo: ``tokens`` (each token's text, concatenating to the prompt's),
  ``token_logprobs`` (null for the first token: nothing predicts it),
  ``top_logprobs`` (null first, then the top K and the given token itself:
  up to K + 1 entries, keyed by text), ``text_offset`` from 0;
* ``prompt_logprobs``: null first, then ``{token_id: {logprob, rank,
  decoded_token}}`` with the given token and the top N (ranks are 1-based
  over the whole vocabulary).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from livepp.core.events import PositionScore

__all__ = ["ScoredPrompt", "echo_logprobs", "vllm_prompt_logprobs"]


@dataclass
class ScoredPrompt:
    ids: list[int]
    pieces: list[str]  # each token's text; they concatenate to the decoded prompt
    text: str  # the prompt as echoed: as given, or decoded from token ids
    first: int = 1  # the first scored position
    scores: dict[int, PositionScore] = field(default_factory=dict)
    names: dict[int, str] = field(default_factory=dict)  # token id -> its own text, for scored tokens and alternatives
    path: str | None = None  # which path scored it, where an engine has several (llama.cpp: batched or --exact)

    @property
    def complete(self) -> bool:
        return len(self.scores) >= max(0, len(self.ids) - self.first)

    def add(self, scores: list[PositionScore], token_texts: Callable[[list[int]], list[str]]) -> None:
        """A chunk of scores, with the texts of the tokens it names (decoded on the worker's thread)."""
        wanted = sorted({i for s in scores for i in (s.token_id, *(t for t, _ in s.top))} - set(self.names))
        self.names.update(zip(wanted, token_texts(wanted)))
        self.scores.update((s.position, s) for s in scores)


def echo_logprobs(prompt: ScoredPrompt, top: int) -> dict[str, list[Any]]:
    """The prompt's entries of a completion's ``logprobs``."""
    out: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    offset = 0
    for position, piece in enumerate(prompt.pieces):
        score = prompt.scores.get(position)
        out["tokens"].append(piece)
        out["text_offset"].append(offset)
        offset += len(piece)
        if score is None:
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
            continue
        alternatives: dict[str, float] = {}
        for token_id, logprob in score.top[:top]:
            alternatives.setdefault(prompt.names.get(token_id, ""), logprob)
        alternatives.setdefault(prompt.names.get(score.token_id, piece), score.logprob)
        out["token_logprobs"].append(score.logprob)
        out["top_logprobs"].append(alternatives)
    return out


def vllm_prompt_logprobs(prompt: ScoredPrompt, top: int) -> list[dict[str, dict[str, Any]] | None]:
    out: list[dict[str, dict[str, Any]] | None] = []
    for position in range(len(prompt.ids)):
        score = prompt.scores.get(position)
        if score is None:
            out.append(None)
            continue
        entry = {str(score.token_id): {"logprob": score.logprob, "rank": score.rank, "decoded_token": prompt.names.get(score.token_id, "")}}
        for rank, (token_id, logprob) in enumerate(score.top[:top], start=1):
            entry.setdefault(str(token_id), {"logprob": logprob, "rank": rank, "decoded_token": prompt.names.get(token_id, "")})
        out.append(entry)
    return out

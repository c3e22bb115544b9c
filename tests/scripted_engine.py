"""A scripted engine: the engine protocol with no model behind it.

Each prompt maps to a script of (text, logprob) tokens; a sampled request
(temperature > 0) picks its script by seed from a list. It counts what it
produced and whether each stream was closed, so tests can prove that a stop
ends production. Nothing here imports torch.
"""

from __future__ import annotations

import functools
import time
from typing import Iterator, Sequence

from livepp.core.events import TokenRecord, TopLogprob
from livepp.core.params import GenerationParams, LiveppError
from livepp.core.stream import RecordStream, SequentialBatch
from livepp.engines.protocol import Prompt, chat_messages, check_prompt

Script = list[tuple[str, float]]


class ScriptedStream(RecordStream):
    def __init__(self, engine: "ScriptedEngine", script: Script, params: GenerationParams, prompt_ids: tuple[int, ...],
                 delay: float = 0.0) -> None:
        self.delay = delay
        self.engine = engine
        self.closed = False
        cut = script[: params.max_new_tokens]
        super().__init__(self._records(cut, ended_by_eos=len(script) <= params.max_new_tokens), prompt_token_ids=prompt_ids,
                         on_close=self._mark_closed)

    def _mark_closed(self) -> None:
        self.closed = True

    def _records(self, script: Script, *, ended_by_eos: bool) -> Iterator[TokenRecord]:
        for i, (text, lp) in enumerate(script):
            if self.delay:
                time.sleep(self.delay)  # a model's pace
            self.engine.produced += 1
            last = i == len(script) - 1
            finish = ("eos" if ended_by_eos else "length") if last else None
            # The record's confidence is -logprob, or none at all (a remote engine asked for no top logprobs).
            yield TokenRecord(token_id=1000 + i, text=text, logprob=lp, entropy=0.5, confidence=-lp if self.engine.confidences else None,
                              top_logprobs=(TopLogprob(1000 + i, text, lp),) if self.engine.confidences else (), finish_reason=finish)


class ScriptedEngine:
    """``scripts``: prompt text (the last message's content for chat
    messages) → a script, or a list of scripts chosen by ``seed % len``;
    ``delays``: prompt text → seconds per token (a model's pace)."""

    def __init__(self, scripts: dict[str, Script | list[Script]], *, name: str = "scripted", serial: bool = True,
                 default: Script | None = None, delays: dict[str, float] | None = None, confidences: bool = True) -> None:
        self.scripts, self.name, self.serial, self.default, self.delays = scripts, name, serial, default, delays or {}
        self.confidences = confidences
        self.kind = "scripted"
        self.produced = 0
        self.opened: list[tuple[Prompt, GenerationParams]] = []
        self.streams: list[ScriptedStream] = []

    def script_for(self, prompt: Prompt, params: GenerationParams) -> Script:
        key = prompt if isinstance(prompt, str) else chat_messages(prompt)[-1]["content"]
        found = self.scripts.get(key, self.default)
        if found is None:
            raise LiveppError(f"no script for prompt {key!r}")
        if found and isinstance(found[0], list):
            return found[(params.seed or 0) % len(found)]  # type: ignore[return-value]
        return found  # type: ignore[return-value]

    def open(self, prompt: Prompt, params: GenerationParams) -> ScriptedStream:
        check_prompt(prompt)
        self.opened.append((prompt, params))
        text = prompt if isinstance(prompt, str) else chat_messages(prompt)[-1]["content"]
        stream = ScriptedStream(self, self.script_for(prompt, params), params, tuple(ord(c) for c in text[:8]), self.delays.get(text, 0.0))
        self.streams.append(stream)
        return stream

    def open_batch(self, prompts: Sequence[Prompt], params: Sequence[GenerationParams]) -> SequentialBatch:
        return SequentialBatch([functools.partial(self.open, pr, p) for pr, p in zip(prompts, params)])

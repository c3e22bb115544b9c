"""The submitting side's tokenizer: prompts encoded by the threads that
submit them, never by the thread that samples.

:class:`PromptEncoder` holds its own copy of a model's tokenizer under a lock
of its own, so a long prompt's tokenization (or a prompt's texts for an echo)
never holds up a batch's sampling and detokenization, which use the original.

A prompt that cannot fit in the context is refused before it is encoded,
by :class:`~livepp.engines.prompt_size.SizeGuard`'s bounds.
"""

from __future__ import annotations

import copy
import threading
from typing import Any, Sequence

from livepp.engines.prompt_size import SizeGuard
from livepp.engines.protocol import Prompt

__all__ = ["PromptEncoder", "LockedTokenizer"]


class PromptEncoder:
    """A copy of ``tokenizer`` for the threads that submit prompts; thread-safe."""

    def __init__(self, tokenizer: Any, *, context_length: int, name: str) -> None:
        self._tokenizer = copy.deepcopy(tokenizer)
        self._lock = threading.Lock()
        self.context_length, self.name = context_length, name
        self.size = SizeGuard(self._tokenizer, context_length)

    def check_size(self, prompt: Prompt) -> None:
        self.size.check(prompt)

    def encode(self, prompt: Prompt, *, raw: bool = False) -> list[int]:
        """Token ids as a row gets them (the chat template unless ``raw``);
        a text that cannot fit is refused untokenized, or as soon as its
        slices are counted past the context."""
        from livepp.engines.torch.decoder import encode_prompt

        self.check_size(prompt)
        with self._lock:
            self.size.count_slices(self._tokenizer, prompt)
            return encode_prompt(self._tokenizer, prompt, raw=raw, name=self.name)

    def pieces(self, ids: Sequence[int]) -> list[str]:
        """Each token's text as a stream releases it (special tokens kept):
        they concatenate to the decoded ids."""
        from livepp.engines.detokenize import IncrementalDetokenizer

        with self._lock:
            detok = IncrementalDetokenizer(self._tokenizer, skip_special_tokens=False)
            out = [detok.add(i) for i in ids]
            if out:
                out[-1] += detok.finish()
            return out

    def token_texts(self, ids: Sequence[int]) -> list[str]:
        """Each id's own text (``decode([id])``)."""
        with self._lock:
            return [self._tokenizer.decode([i]) for i in ids]

    def tokenize(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """``tokenizer(text)``: the tokenizer's own special tokens, or none (a
        text may be longer than the context: a document scored in windows)."""
        self.size.check_chars(text)
        with self._lock:
            return [int(i) for i in self._tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]]

    def chat_ids(self, messages: list[dict[str, str]], *, add_generation_prompt: bool = True) -> list[int]:
        self.size.check_chars(messages)
        with self._lock:
            ids = self._tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
            return [int(i) for i in (ids if isinstance(ids, list) else ids["input_ids"])]

    def decode(self, ids: Sequence[int]) -> str:
        with self._lock:
            return self._tokenizer.decode(list(ids))

    def info(self) -> dict[str, Any]:
        """What vLLM's ``/tokenizer_info`` says of a tokenizer."""
        tok = self._tokenizer
        return {"tokenizer_class": type(tok).__name__, "eos_token": tok.eos_token, "bos_token": tok.bos_token,
                "pad_token": tok.pad_token, "unk_token": tok.unk_token, "chat_template": getattr(tok, "chat_template", None),
                "model_max_length": self.context_length, "vocab_size": len(tok),
                "adds_bos_token": bool(tok("a")["input_ids"][:1] == [tok.bos_token_id]) if tok.bos_token_id is not None else False}

    def locked(self) -> "LockedTokenizer":
        """This copy of the tokenizer for a submitting thread's own use (a
        watched text's incremental tokenization): every call under its lock."""
        return LockedTokenizer(self._tokenizer, self._lock)

    def plan(self, planner: Any, *args: Any, **kwargs: Any) -> Any:
        """``planner(tokenizer, context_length, *args, **kwargs)`` with this
        copy of the tokenizer (a :mod:`livepp.scoring.plans` function)."""
        with self._lock:
            return planner(self._tokenizer, self.context_length, *args, **kwargs)


class LockedTokenizer:
    """A tokenizer whose calls hold a lock (a fast tokenizer used by two
    threads at once can fail with "Already borrowed"); attributes pass through."""

    def __init__(self, tokenizer: Any, lock: Any) -> None:
        self._tokenizer, self._lock = tokenizer, lock

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            return self._tokenizer(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._tokenizer, name)
        if not callable(value):
            return value

        def call(*args: Any, **kwargs: Any) -> Any:
            with self._lock:
                return value(*args, **kwargs)

        return call

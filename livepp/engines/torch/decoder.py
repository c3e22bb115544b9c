"""KV-cached streaming decoder: prefill once, then one forward pass per token.

The ladder, from the bottom: ``_forward`` runs the model on new ids against
the KV cache and returns next-token logits; ``next_token_stats`` (sampling.py)
turns logits into a packed tensor; ``stream`` is a generator that yields one
:class:`TokenRecord` per token and runs the next forward pass only when the
consumer asks for the next token. So when a policy stops a generation and
closes the generator, no further forward pass runs.

``torch.compile`` is applied from outside with :meth:`Decoder.compile`, which
swaps in a static KV cache and a compiled one-token step; the code of the step
does not know it is compiled.
"""

from __future__ import annotations

import contextlib
import dataclasses
import weakref
from collections import deque
from typing import Any, Iterator, Sequence

import torch

from livepp.engines.detokenize import IncrementalDetokenizer
from livepp.core.events import TokenRecord, TopLogprob
from livepp.engines.torch.models import LoadedModel
from livepp.core.params import GenerationParams, LiveppError, PromptTooLong
from livepp.core.stream import RecordStream
from livepp.engines.protocol import Prompt, chat_messages, check_prompt
from livepp.engines.torch.sampling import forced_token_stats, next_token_stats, unpack_stats

__all__ = ["Decoder", "PromptTooLong", "TextTracker", "encode_prompt", "token_record", "eos_ids_of"]


def eos_ids_of(loaded: LoadedModel) -> frozenset[int]:
    ids: set[int] = set()
    gen_cfg = getattr(loaded.model, "generation_config", None)
    for value in (getattr(gen_cfg, "eos_token_id", None), loaded.tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return frozenset(ids)


class TextTracker:
    """One sequence's text side: detokenizes each new id and says whether it
    ends the sequence (EOS, a stop string, the length cap). Shared by the
    single-sequence and the batched decoder, so both end the same way."""

    def __init__(self, tokenizer: Any, eos_ids: frozenset[int], params: GenerationParams, max_new: int) -> None:
        self.detok = IncrementalDetokenizer(tokenizer)
        self.eos_ids = eos_ids
        self.params = params
        self.max_new = max_new
        self.stop_tail = max((len(s) for s in params.stop), default=0)
        self.text_tail = ""
        self.count = 0

    def add(self, token_id: int) -> tuple[str, str | None]:
        """(text this token releases, finish reason or None)."""
        text = self.detok.add(token_id)
        self.count += 1
        finish = None
        if token_id in self.eos_ids and not self.params.ignore_eos:
            finish = "eos"
        elif self.stop_tail:
            # Look only at the tail where a stop string could newly appear.
            self.text_tail = (self.text_tail + text)[-(self.stop_tail + len(text)) :]
            if any(s in self.text_tail for s in self.params.stop):
                finish = "stop_string"
        if finish is None and self.count == self.max_new:
            finish = "length"
        if finish is not None:
            text += self.detok.finish()
        return text, finish

    def add_injected(self, token_id: int) -> str:
        """The text of a token an intervention put in: detokenized with the
        rest, but not counted and never an end."""
        return self.detok.add(token_id)


def encode_prompt(tok: Any, prompt: Prompt, *, raw: bool = False, name: str = "this model") -> list[int]:
    """Token ids for a prompt: text gets the chat template (as one user
    message) unless ``raw`` or the tokenizer has none; chat messages get the
    chat template with the generation prompt."""
    check_prompt(prompt)
    has_template = bool(getattr(tok, "chat_template", None))
    if not isinstance(prompt, str) and not has_template:
        raise LiveppError(f"{name} has no chat template; give text, not chat messages")
    if not isinstance(prompt, str) or (not raw and has_template):
        ids = tok.apply_chat_template(chat_messages(prompt), add_generation_prompt=True, tokenize=True)
        if not isinstance(ids, list):  # some versions return a BatchEncoding
            ids = ids["input_ids"]
        return [int(i) for i in ids]
    return [int(i) for i in tok(prompt, add_special_tokens=True)["input_ids"]]


_PIECES: "weakref.WeakKeyDictionary[Any, dict[int, str]]" = weakref.WeakKeyDictionary()


def alternatives(tokenizer: Any, top: tuple[tuple[int, float], ...]) -> tuple[TopLogprob, ...]:
    """(token id, logprob) pairs as alternatives, each with its text. A
    token's own text never changes, so each is decoded once per tokenizer
    (a batch of 8 rows with top-5 would otherwise decode 40 pieces a step)."""
    try:
        pieces = _PIECES.setdefault(tokenizer, {})
    except TypeError:  # a tokenizer that cannot be weakly referenced
        pieces = {}
    out = []
    for i, lp in top:
        text = pieces.get(i)
        if text is None:
            text = pieces[i] = tokenizer.decode([i])
        out.append(TopLogprob(i, text, lp))
    return tuple(out)


def token_record(stats: Any, text: str, finish: str | None, alternatives: tuple[TopLogprob, ...]) -> TokenRecord:
    return TokenRecord(
        token_id=stats.token_id,
        text=text,
        logprob=stats.logprob,
        entropy=stats.entropy,
        top_logprobs=alternatives,
        confidence=stats.confidence,
        sampling_logprob=stats.sampling_logprob,
        finish_reason=finish,
        varentropy=stats.varentropy,
    )


class Decoder:
    """Streams tokens from a local model with per-token raw-distribution stats."""

    def __init__(self, loaded: LoadedModel) -> None:
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.context_length = loaded.context_length
        self.eos_ids = eos_ids_of(loaded)
        # Every tensor the decoding path makes goes where the model is.
        self.device = loaded.model.device
        self._static_cache: Any = None
        self._cache_len = 0
        self._cache_len_fixed = False
        self._static_owner: object | None = None
        self._compiled = False
        self._grad_mode = torch.inference_mode
        self._decode_step = self._forward

    # ---- prompt -----------------------------------------------------------
    def encode(self, prompt: Prompt, *, raw: bool = False) -> list[int]:
        return encode_prompt(self.tokenizer, prompt, raw=raw, name=self.loaded.name)

    def check(self, prompt_ids: Sequence[int], params: GenerationParams) -> None:
        """Reject what cannot run, before any compute."""
        if not prompt_ids:
            raise LiveppError("the prompt has no tokens")
        if len(prompt_ids) >= self.context_length:
            raise PromptTooLong(
                f"the prompt has {len(prompt_ids)} tokens but the model's context is "
                f"{self.context_length} tokens (at least one must be left to generate)"
            )
        if self._cache_len_fixed:
            need = min(len(prompt_ids) + params.max_new_tokens, self.context_length)
            if need > self._cache_len:
                raise PromptTooLong(
                    f"the prompt ({len(prompt_ids)} tokens) plus max_new_tokens ({params.max_new_tokens}) need a KV cache of "
                    f"{need} tokens, but the compiled decoder's cache holds {self._cache_len} (compile(max_cache_len=...))"
                )

    # ---- model steps ------------------------------------------------------
    def _new_cache(self, need: int) -> Any:
        if self._compiled:
            if self._static_cache is None or need > self._cache_len:
                # Sized from prompt + max_new_tokens, in powers of two so that
                # a new size (and a recompile) is rare.
                from transformers import StaticCache

                size = min(max(256, 1 << max(need - 1, 1).bit_length()), self.context_length)
                self._cache_len = size
                self._static_cache = StaticCache(config=self.model.config, max_cache_len=size)
            else:
                self._static_cache.reset()
            return self._static_cache
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config)

    def _forward(self, input_ids: torch.Tensor, cache_position: torch.Tensor, cache: Any) -> torch.Tensor:
        # input_ids: [1, T]; cache_position: [T] -> next-token logits [V]
        out = self.model(
            input_ids=input_ids,
            past_key_values=cache,
            cache_position=cache_position,
            use_cache=True,
            logits_to_keep=1,  # only the last position's logits are needed
        )
        return out.logits[0, -1]

    def compile(self, *, max_cache_len: int | None = None, **compile_kwargs: Any) -> "Decoder":
        """Opt in to torch.compile: a static KV cache and a compiled decode step.

        The first generation pays the compile time (minutes on a CPU). Greedy
        results are the same token ids as the eager path. The static cache is
        sized from each generation's prompt + max_new_tokens (a power of two,
        grown and recompiled when a longer one comes); ``max_cache_len`` fixes
        it instead, and a generation that does not fit is refused up front.
        A compiled decoder has one cache, so it runs one stream at a time: a
        second stream started while another is open is refused.
        The model's linear layers go back to plain ``nn.Linear`` (inductor
        packs their weights itself; dynamo cannot trace oneDNN's packed ones).
        """
        from livepp.engines.torch.packed import unpack_linears

        unpack_linears(self.model)
        if max_cache_len is not None:
            from transformers import StaticCache

            if max_cache_len < 2:
                raise LiveppError(f"max_cache_len must be >= 2, got {max_cache_len}")
            self._cache_len = min(max_cache_len, self.context_length)
            self._cache_len_fixed = True
            self._static_cache = StaticCache(config=self.model.config, max_cache_len=self._cache_len)
        # Compiled graphs cannot capture inference tensors; no_grad is enough.
        self._grad_mode = torch.no_grad
        self._decode_step = torch.compile(self._forward, dynamic=False, **compile_kwargs)
        self._compiled = True
        return self

    # ---- the generator ----------------------------------------------------
    def stream(self, prompt_ids: Sequence[int], params: GenerationParams) -> RecordStream:
        """A token stream with one record per generated token; the last has
        ``finish_reason``. Validates before any compute; each forward pass
        runs only when the consumer asks for the next token."""
        self.check(prompt_ids, params)
        injections: deque[str] = deque()

        def inject(text: str) -> None:
            if self._compiled:
                raise LiveppError("a compiled decoder cannot take injected text (its cache is static); run it uncompiled")
            if not isinstance(text, str) or not text:
                raise LiveppError("injected text must be a non-empty string")
            injections.append(text)

        return RecordStream(self._stream(list(prompt_ids), params, injections), prompt_token_ids=prompt_ids, on_inject=inject)

    def _stream(self, prompt_ids: list[int], params: GenerationParams, injections: deque[str] | None = None) -> Iterator[TokenRecord]:
        if not self._compiled:
            yield from self._decode(prompt_ids, params, injections)
            return
        if self._static_owner is not None:
            raise LiveppError("a compiled decoder has one KV cache and runs one stream at a time; "
                              "close the other stream first (or use an uncompiled Decoder for concurrent streams)")
        owner = self._static_owner = object()
        try:
            yield from self._decode(prompt_ids, params)
        finally:
            if self._static_owner is owner:
                self._static_owner = None

    def _decode(self, prompt_ids: list[int], params: GenerationParams, injections: deque[str] | None = None) -> Iterator[TokenRecord]:
        generator = None
        if not params.greedy and params.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(params.seed)
        # Never run past the context: the last token must fit in it.
        max_new = min(params.max_new_tokens, self.context_length - len(prompt_ids))
        text_side = TextTracker(self.tokenizer, self.eos_ids, params, max_new)
        cache = self._new_cache(len(prompt_ids) + max_new)

        with self._grad_mode():
            n = len(prompt_ids)
            logits = self._forward(torch.tensor([prompt_ids], device=self.device), torch.arange(n, device=self.device), cache)
            stats_tensor = next_token_stats(logits, params, generator)
        position = n
        while True:
            stats = unpack_stats(stats_tensor.tolist())  # the one host sync per token
            text, finish = text_side.add(stats.token_id)
            yield token_record(stats, text, finish, self._alternatives(stats.top))
            if finish is not None:
                return
            if injections:
                # An intervention: the text goes into the sequence after this
                # token, in the same forward pass; its tokens come out marked
                # and decoding goes on from the end of it.
                feed = [stats.token_id] + self._injected_ids(injections.popleft(), position)
                with self._grad_mode():
                    out = self.model(input_ids=torch.tensor([feed], device=self.device), past_key_values=cache, use_cache=True,
                                     cache_position=torch.arange(position, position + len(feed), device=self.device))
                    logits = out.logits[0]
                    stats_tensor = next_token_stats(logits[-1], params, generator)
                for injected in forced_token_stats(logits[:-1], feed[1:], params):
                    text = text_side.add_injected(injected.token_id)
                    yield dataclasses.replace(token_record(injected, text, None, self._alternatives(injected.top)), injected=True)
                position += len(feed)
                continue
            # Only now, after the consumer asked for more, pay for the next token.
            with self._grad_mode():
                logits = self._decode_step(
                    torch.tensor([[stats.token_id]], device=self.device), torch.tensor([position], device=self.device), cache
                )
                stats_tensor = next_token_stats(logits, params, generator)
            position += 1

    def _injected_ids(self, text: str, position: int) -> list[int]:
        ids = [int(i) for i in self.tokenizer(text, add_special_tokens=False)["input_ids"]]
        room = self.context_length - position - 2  # the token before it and one more must still fit
        if room < len(ids):
            raise LiveppError(f"no room in the context for the injected text ({len(ids)} tokens)")
        return ids

    def _alternatives(self, top: tuple[tuple[int, float], ...]) -> tuple[TopLogprob, ...]:
        return alternatives(self.tokenizer, top)

    # ---- convenience ------------------------------------------------------
    @contextlib.contextmanager
    def count_forward_passes(self) -> Iterator[list[int]]:
        """Count model forward calls inside the block (for tests and benchmarks)."""
        counter = [0]

        def hook(*_: Any) -> None:
            counter[0] += 1

        handle = self.model.base_model.register_forward_pre_hook(hook)  # every path runs the base model
        try:
            yield counter
        finally:
            handle.remove()

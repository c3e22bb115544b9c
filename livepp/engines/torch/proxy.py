"""Proxy-model PPL: score a text stream with a local model as it arrives.

Closed APIs and many deployments return no logprobs; the answer is a proxy:
a local model scores the text that arrives, teacher-forced, so the numbers
are the *proxy's* PPL of that text, not the generator's.

Two parts, both incremental:

* :class:`GrowingText` tokenizes a text that grows at its end. A token is
  released only once later text cannot change it: the last two pre-tokens of
  the text so far (a word that may go on, whitespace whose split depends on
  what follows) are held back, and a cut is taken only where tokenizing the
  two sides apart gives the same ids as tokenizing them together. So every
  token is released exactly once, and the released ids equal tokenizing the
  whole text at once.
* :class:`IncrementalScorer` feeds released ids through the model with a KV
  cache and scores each from the logits before it. Windows follow
  :func:`livepp.scoring.teacher_forced.plan_windows` (``max_length``,
  ``stride``; by default the model's context with half-context stride, as
  ``livepp score`` does for a text longer than the context), so the cache,
  the memory and the time per token stay bounded however long the stream,
  and the final numbers equal ``livepp score --prompt P --target TEXT``.

:class:`ProxyStream` joins them into a :class:`~livepp.core.stream.TokenStream`
over any iterable of text chunks (a file being written, standard input, a
remote engine's text), so the monitor, its policies and every sink apply.
"""

from __future__ import annotations

import codecs
import dataclasses
import queue
import threading
from collections import deque
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch

from livepp.core.events import TokenRecord
from livepp.core.params import GenerationParams, LiveppError, watch_windows
from livepp.engines.detokenize import IncrementalDetokenizer
from livepp.engines.torch.models import LoadedModel
from livepp.engines.torch.decoder import alternatives, token_record
from livepp.engines.torch.sampling import forced_token_stats
from livepp.scoring.teacher_forced import carries_target, target_prefix

__all__ = ["GrowingText", "IncrementalScorer", "ProxyStream", "BufferedText", "proxy_prefix", "decode_chunks"]

# Tokens per forward pass (a [T, vocabulary] logits block must stay small).
_FORWARD_CHUNK = 256


def proxy_prefix(tokenizer: Any, prompt: str | None, *, chat: bool) -> tuple[str, bool]:
    """(the text before the scored text, whether the tokenizer adds its special
    tokens): the same rule as ``livepp score`` (``--prompt``, ``--chat``)."""
    if prompt is None:
        if chat:
            raise LiveppError("--chat needs --prompt: the scored text is the reply to it")
        return "", True
    if not prompt.strip():
        raise LiveppError("the prompt is empty")
    return target_prefix(tokenizer, prompt, chat=chat)


class GrowingText:
    """Tokens of ``prefix + text`` as the text arrives; see the module docstring.
    :meth:`feed` and :meth:`finish` return ``(token_id, in_target)`` pairs:
    ``in_target`` marks tokens that carry text after the prefix (the first
    may straddle the boundary, as ``score_target`` counts it)."""

    def __init__(self, tokenizer: Any, prefix: str, *, add_special_tokens: bool) -> None:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None or backend.pre_tokenizer is None:
            raise LiveppError("live proxy scoring needs a fast (Rust) tokenizer with a pre-tokenizer")
        self.tokenizer = tokenizer
        self.pre_tokenizer = backend.pre_tokenizer
        self.tail = prefix  # text not yet released as tokens
        self.boundary = len(prefix)  # where the target starts, in tail coordinates
        self.specials = add_special_tokens
        self.started = False
        self.in_target = False
        self.special_ids = set(getattr(tokenizer, "all_special_ids", ()))

    def _encode(self, text: str, specials: bool) -> tuple[list[int], list[tuple[int, int]]]:
        enc = self.tokenizer(text, add_special_tokens=specials, return_offsets_mapping=True)
        return [int(i) for i in enc["input_ids"]], [tuple(o) for o in enc["offset_mapping"]]

    def feed(self, text: str) -> list[tuple[int, bool]]:
        self.tail += text
        return self._release(final=False)

    def finish(self) -> list[tuple[int, bool]]:
        return self._release(final=True)

    def _release(self, *, final: bool) -> list[tuple[int, bool]]:
        if not self.tail:
            return []
        specials = self.specials and not self.started
        if final:
            cut = len(self.tail)
        else:
            pieces = self.pre_tokenizer.pre_tokenize_str(self.tail)
            if len(pieces) < 3:
                return []
            cut = pieces[-2][1][0]
            if cut <= 0:
                return []
            head = self._encode(self.tail[:cut], specials)[0]
            rest = self._encode(self.tail[cut:], False)[0]
            if self._encode(self.tail, specials)[0] != head + rest:
                return []  # not a clean cut yet: wait for more text
        ids, offsets = self._encode(self.tail[:cut], specials)
        out = []
        for token_id, span in zip(ids, offsets):
            if not self.in_target and carries_target(token_id, span, self.boundary, self.special_ids):
                self.in_target = True
            out.append((token_id, self.in_target))
        self.tail = self.tail[cut:]
        self.boundary = max(0, self.boundary - cut)
        self.started = True
        return out


class IncrementalScorer:
    """Teacher-forced statistics of ids as they are appended; see the module docstring."""

    def __init__(self, loaded: LoadedModel, params: GenerationParams, *, max_length: int | None = None,
                 stride: int | None = None) -> None:
        context = loaded.context_length
        self.max_length, self.stride = watch_windows(context, max_length, stride)
        self.loaded, self.model, self.params = loaded, loaded.model, params
        self.device = self.model.device
        self.n = 0  # positions appended so far
        self.begin = 0  # the current window's first position
        self.recent: deque[int] = deque(maxlen=self.max_length)  # ids a new window re-reads
        self.cache: Any = None
        self.last: torch.Tensor | None = None  # logits at position n-1
        self.forward_tokens = 0  # tokens fed, re-read window context included

    def _new_cache(self) -> Any:
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config)

    @torch.inference_mode()
    def _feed(self, ids: Sequence[int], start: int, *, all_logits: bool) -> torch.Tensor:
        """Feed ids at window positions ``start..``; logits of every position
        ([T, V]) or only of the last ([1, V])."""
        kept = []
        for i in range(0, len(ids), _FORWARD_CHUNK):
            piece = list(ids[i : i + _FORWARD_CHUNK])
            last_piece = i + _FORWARD_CHUNK >= len(ids)
            pos = start + i
            out = self.model(input_ids=torch.tensor([piece], device=self.device), past_key_values=self.cache,
                             cache_position=torch.arange(pos, pos + len(piece), device=self.device), use_cache=True,
                             logits_to_keep=0 if all_logits else 1)
            self.forward_tokens += len(piece)
            if all_logits or last_piece:
                kept.append(out.logits[0].float())
        return torch.cat(kept) if len(kept) > 1 else kept[0]

    def push(self, items: Sequence[tuple[int, bool]]) -> list[tuple[int, Any]]:
        """Append ``(token_id, scored)`` items; returns ``(position, stats)``
        for every scored one (position 0 has no context and is never scored)."""
        out: list[tuple[int, Any]] = []
        ids = [i for i, _ in items]
        scored = [s for _, s in items]
        first, end = self.n, self.n + len(ids)
        pos = first
        while pos < end:
            if pos > self.begin + self.max_length - 1:  # past this window: the next one starts
                while pos > self.begin + self.max_length - 1:
                    self.begin += self.stride
                context = list(self.recent)[len(self.recent) - (pos - self.begin):] if pos > self.begin else []
                self.cache = self._new_cache()
                self.last = self._feed(context, 0, all_logits=False)[-1] if context else None
            if self.cache is None:
                self.cache = self._new_cache()
            stop = min(end, self.begin + self.max_length)
            chunk = ids[pos - first : stop - first]
            logits = self._feed(chunk, pos - self.begin, all_logits=True)
            rows = ([self.last] if self.last is not None else []) + list(logits[:-1])
            predicted = range(pos if self.last is not None else pos + 1, stop)
            want = [p for p in predicted if scored[p - first] and p > 0]
            if want:
                index = {p: r for r, p in enumerate(predicted)}
                block = torch.stack([rows[index[p]] for p in want])
                stats = forced_token_stats(block, [ids[p - first] for p in want], self.params)
                out.extend(zip(want, stats))
            self.last = logits[-1]
            self.recent.extend(chunk)
            pos = stop
        self.n = end
        return out


class ProxyStream:
    """A :class:`~livepp.core.stream.TokenStream` of the proxy's tokens of a
    text that arrives in ``chunks``. Only tokens after the prompt are
    yielded, as they become final; the source ending ends the stream with
    reason ``eos``. Closing the stream closes the source (``on_close``)."""

    def __init__(self, loaded: LoadedModel, chunks: Iterable[str], params: GenerationParams, *, prompt: str | None = None,
                 chat: bool = False, max_length: int | None = None, stride: int | None = None,
                 on_close: Callable[[], None] | None = None, scorer: Any = None, tokenizer: Any = None) -> None:
        """``scorer``: what scores the released ids (default: an
        :class:`IncrementalScorer` on ``loaded``; a fed row of a continuous
        batch, :class:`livepp.engines.feeding.ScheduledScorer`, shares the
        batch's forward passes); ``tokenizer``: this thread's (default ``loaded``'s)."""
        self.loaded = loaded
        tokenizer = tokenizer if tokenizer is not None else loaded.tokenizer
        self.tokenizer = tokenizer
        prefix, specials = proxy_prefix(tokenizer, prompt, chat=chat)
        self.text = GrowingText(tokenizer, prefix, add_special_tokens=specials)
        self.scorer = scorer if scorer is not None else IncrementalScorer(loaded, params, max_length=max_length, stride=stride)
        self.params = params
        self.prompt_token_ids: tuple[int, ...] = tuple(
            int(i) for i in tokenizer(prefix, add_special_tokens=specials)["input_ids"]) if prefix else ()
        self.finish_reason: str | None = None
        self.engine_finish_reason: str | None = None
        self.tokens_after_stop: int | None = None
        self._chunks = iter(chunks)
        self._on_close = on_close
        self._pending: deque[TokenRecord] = deque()
        self._detok = IncrementalDetokenizer(tokenizer)
        self._done = False
        self.received_chars = 0

    def __iter__(self) -> "ProxyStream":
        return self

    def __next__(self) -> TokenRecord:
        while not self._pending:
            if self._done:
                raise StopIteration
            try:
                chunk = next(self._chunks)
            except StopIteration:
                self._done = True
                self._emit(self.text.finish(), final=True)
                self.finish_reason = self.finish_reason or "eos"
                continue
            self.received_chars += len(chunk)
            self._emit(self.text.feed(chunk), final=False)
        return self._pending.popleft()

    def _emit(self, items: list[tuple[int, bool]], *, final: bool) -> None:
        first = self.scorer.n
        scored = self.scorer.push(items)
        by_position = dict(scored)
        tokenizer = self.tokenizer
        for offset, (token_id, in_target) in enumerate(items):
            if not in_target:
                continue
            text = self._detok.add(token_id)
            stats = by_position.get(first + offset)
            if stats is None:
                continue  # the very first position: nothing predicts it
            self._pending.append(token_record(stats, text, None, alternatives(tokenizer, stats.top)))
        if final and self._pending:
            rest = self._detok.finish()
            if rest:
                last = self._pending.pop()
                self._pending.append(dataclasses.replace(last, text=last.text + rest))

    def close(self) -> None:
        """Stop reading (a policy stop): the source is closed at once."""
        if not self._done:
            self._done = True
            self.tokens_after_stop = len(self._pending)
            self._pending.clear()
        if self._on_close is not None:
            self._on_close()
        close_scorer = getattr(self.scorer, "close", None)
        if close_scorer is not None:
            close_scorer()  # a fed row leaves the batch
        close = getattr(self._chunks, "close", None)
        if close is not None:
            close()

    def abort(self) -> None:
        self.close()


class BufferedText:
    """Text chunks read ahead by a thread. Each read returns everything that
    has arrived since the last (waiting only when nothing has), so a proxy
    that falls behind its source scores the backlog in one forward pass
    instead of one pass per chunk. An error of the source is raised here."""

    _END = object()

    def __init__(self, chunks: Iterable[str]) -> None:
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._ended = False
        self._failure: _Failure | None = None
        self._thread = threading.Thread(target=self._pump, args=(iter(chunks),), daemon=True, name="livepp-text-reader")
        self._thread.start()

    def _pump(self, chunks: Iterator[str]) -> None:
        try:
            for chunk in chunks:
                self._queue.put(chunk)
        except BaseException as exc:  # noqa: BLE001 - handed to the reader
            self._queue.put(_Failure(exc))
        finally:
            self._queue.put(self._END)

    def __iter__(self) -> "BufferedText":
        return self

    def __next__(self) -> str:
        if self._failure is not None:
            failure, self._failure = self._failure, None
            self._ended = True
            raise failure.exc
        if self._ended:
            raise StopIteration
        parts: list[str] = []
        item = self._queue.get()
        while True:
            if item is self._END:
                self._ended = True
                break
            if isinstance(item, _Failure):
                if not parts:
                    self._ended = True
                    raise item.exc
                self._failure = item  # the text before it goes out first
                break
            parts.append(item)
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
        if not parts:
            raise StopIteration
        return "".join(parts)


class _Failure:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


def decode_chunks(raw: Iterable[bytes]) -> Iterator[str]:
    """Text from byte chunks, a multi-byte character split between chunks kept whole."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for block in raw:
        text = decoder.decode(block)
        if text:
            yield text
    rest = decoder.decode(b"", final=True)
    if rest:
        yield rest


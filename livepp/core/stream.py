"""Token streams: what every engine hands to the monitor.

A :class:`TokenStream` is the one protocol between a token source and the
monitor. Iterating it yields :class:`TokenRecord` s; it says how it ended
(``finish_reason``), how many tokens the engine produced after a stop it
could not prevent (``tokens_after_stop``, remote engines) and the engine's own
finish reason; ``close()`` stops its compute at once (a local row leaves the
batch, a remote request's connection is closed) and ``abort()`` may be called
from another thread to wake a blocked read. The monitor reads these
attributes directly: a source that is not a TokenStream is wrapped in a
:class:`RecordStream` first.

A :class:`BatchTokenStream` is its many-row form: it yields ``(row, record)``
as each step completes, ``stop(row)`` takes one row out before the next
step, and ``finish_reasons[row]`` says how each row ended.
:class:`SequentialBatch` gives that form to engines that decode one stream at
a time (a remote endpoint, a scripted engine), so everything that needs
several samples runs on every engine.
"""

from __future__ import annotations

from types import GeneratorType
from typing import Any, Callable, Iterable, Iterator, Protocol, Sequence

from livepp.core.events import TokenRecord

__all__ = ["TokenStream", "RecordStream", "WrappedStream", "BatchTokenStream", "RowBatch", "SequentialBatch"]


class TokenStream(Protocol):
    """One generation's records; see the module docstring."""

    prompt_token_ids: tuple[int, ...]
    finish_reason: str | None
    tokens_after_stop: int | None
    engine_finish_reason: str | None

    def __iter__(self) -> Iterator[TokenRecord]: ...

    def __next__(self) -> TokenRecord: ...

    def close(self) -> None: ...

    def abort(self) -> None: ...


class RecordStream:
    """A :class:`TokenStream` over any iterable of records: a local engine's
    generator, a list in a test, a replayed trace. Its ``finish_reason`` is
    the last record's; closing it closes a generator (no further compute)."""

    def __init__(self, records: Iterable[TokenRecord], *, prompt_token_ids: Sequence[int] = (),
                 finish_reason: str | None = None, on_close: Callable[[], None] | None = None,
                 on_inject: Callable[[str], None] | None = None) -> None:
        self._records = records
        if on_inject is not None:
            self.inject = on_inject  # the engine appends this text to the sequence before its next token
        self._it = iter(records)
        self.prompt_token_ids = tuple(prompt_token_ids)
        self.finish_reason: str | None = None
        self._default_finish = finish_reason
        self.tokens_after_stop: int | None = None
        self.engine_finish_reason: str | None = None
        self._on_close = on_close
        self._closed = False

    def __iter__(self) -> "RecordStream":
        return self

    def __next__(self) -> TokenRecord:
        try:
            record = next(self._it)
        except StopIteration:
            if self.finish_reason is None:
                self.finish_reason = self._default_finish
            raise
        if record.finish_reason is not None:
            self.finish_reason = record.finish_reason
        return record

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if isinstance(self._it, GeneratorType):
            self._it.close()
        if self._on_close is not None:
            self._on_close()

    def abort(self) -> None:
        """Nothing to wake: a local stream is pulled, never blocked on a read."""


class WrappedStream:
    """A stream around another (``inner``) that passes its protocol through;
    subclasses change how records are pulled."""

    def __init__(self, inner: TokenStream) -> None:
        self.inner = inner
        self.prompt_token_ids = inner.prompt_token_ids

    @property
    def finish_reason(self) -> str | None:
        return self.inner.finish_reason

    @property
    def tokens_after_stop(self) -> int | None:
        return self.inner.tokens_after_stop

    @property
    def engine_finish_reason(self) -> str | None:
        return self.inner.engine_finish_reason

    def __iter__(self) -> "WrappedStream":
        return self

    def __next__(self) -> TokenRecord:
        return next(self.inner)

    def __getattr__(self, name: str) -> Any:
        if name == "inject":  # only when the inner stream can take text
            return getattr(self.inner, "inject")
        raise AttributeError(name)

    def close(self) -> None:
        self.inner.close()

    def abort(self) -> None:
        self.inner.abort()


class BatchTokenStream(Protocol):
    """Many rows decoded together; see the module docstring."""

    prompt_token_ids: list[tuple[int, ...]]
    finish_reasons: list[str | None]

    def __iter__(self) -> Iterator[tuple[int, TokenRecord]]: ...

    def stop(self, index: int, reason: str = "policy") -> None: ...

    def close(self) -> None: ...

    def abort(self) -> None: ...


class RowBatch:
    """What every batch stream shares: per-row prompts and finish reasons,
    ``stop(row)`` recorded for the loop to act on before its next step, and
    iteration over the ``_run`` generator a subclass provides."""

    def __init__(self, prompt_token_ids: Sequence[Sequence[int]]) -> None:
        self.prompt_token_ids = [tuple(p) for p in prompt_token_ids]
        self.finish_reasons: list[str | None] = [None] * len(self.prompt_token_ids)
        self._stopped: dict[int, str] = {}
        self._gen = self._run()

    def _run(self) -> Iterator[tuple[int, TokenRecord]]:
        raise NotImplementedError

    def stop(self, index: int, reason: str = "policy") -> None:
        if self.finish_reasons[index] is None:
            self._stopped[index] = reason

    def __iter__(self) -> "RowBatch":
        return self

    def __next__(self) -> tuple[int, TokenRecord]:
        return next(self._gen)

    def close(self) -> None:
        self._gen.close()

    def abort(self) -> None:
        """Wake a blocked read from another thread (nothing to wake here)."""


class SequentialBatch(RowBatch):
    """A :class:`BatchTokenStream` that runs its rows' streams one after
    another, for engines that decode one stream at a time. A row is opened
    only when its turn comes, so a remote engine holds one request at a time."""

    def __init__(self, openers: Sequence[Callable[[], TokenStream]], *, prompt_token_ids: Sequence[Sequence[int]] | None = None) -> None:
        self._openers = list(openers)
        super().__init__(prompt_token_ids if prompt_token_ids is not None else [()] * len(self._openers))

    def abort(self) -> None:
        current = self._current
        if current is not None:
            current.abort()

    def _run(self) -> Iterator[tuple[int, TokenRecord]]:
        for i, opener in enumerate(self._openers):
            if i in self._stopped:
                self.finish_reasons[i] = self._stopped[i]
                continue
            stream = self._current = opener()
            try:
                for record in stream:
                    yield i, record
                    if i in self._stopped:
                        self.finish_reasons[i] = self._stopped[i]
                        break
                else:
                    self.finish_reasons[i] = stream.finish_reason or "length"
            finally:
                stream.close()
                self._current = None

"""The consumer's side of the continuous batch: a row as a
:class:`~livepp.core.stream.TokenStream`, rows read together as a
:class:`~livepp.core.stream.BatchTokenStream`, and a fed row (a watched
text's tokens, :mod:`livepp.engines.feeding`), each over a
:class:`~livepp.engines.scheduler.Scheduler`'s channel."""

from __future__ import annotations

from typing import Any, Sequence

from livepp.core.events import TokenRecord

__all__ = ["ScheduledStream", "ScheduledBatch", "FedStream"]


class ScheduledStream:
    """One row of the continuous batch as a :class:`~livepp.core.stream.TokenStream`."""

    def __init__(self, scheduler: Any, channel: Any) -> None:
        self.scheduler, self.channel = scheduler, channel
        self.prompt_token_ids = channel.rows[0].row.request.prompt_ids
        self.queue_position = channel.queue_position
        self.finish_reason: str | None = None
        self.tokens_after_stop: int | None = None
        self.engine_finish_reason: str | None = None

    def __iter__(self) -> "ScheduledStream":
        return self

    def __next__(self) -> TokenRecord:
        _, record = self.scheduler._get(self.channel)
        if record.finish_reason is not None:
            self.finish_reason = record.finish_reason
        return record

    def inject(self, text: str) -> None:
        """Append ``text`` to this row, fed at its next step."""
        self.scheduler._inject(self.channel.rows[0], text)

    def close(self) -> None:
        self.scheduler._abort(self.channel, "cancelled")

    def abort(self) -> None:
        self.scheduler._abort(self.channel, "cancelled")


class ScheduledBatch:
    """Rows of the continuous batch read together, as a
    :class:`~livepp.core.stream.BatchTokenStream`."""

    def __init__(self, scheduler: Any, channel: Any) -> None:
        self.scheduler, self.channel = scheduler, channel
        self.prompt_token_ids = [s.row.request.prompt_ids for s in channel.rows]
        self.finish_reasons: list[str | None] = [None] * len(channel.rows)
        self.queue_position = channel.queue_position

    def __iter__(self) -> "ScheduledBatch":
        return self

    def __next__(self) -> tuple[int, TokenRecord]:
        index, record = self.scheduler._get(self.channel)
        if record.finish_reason is not None:
            self.finish_reasons[index] = record.finish_reason
        return index, record

    def stop(self, index: int, reason: str = "policy") -> None:
        if self.finish_reasons[index] is None:
            self.finish_reasons[index] = reason
            self.scheduler._cancel(self.channel.rows[index], reason)

    def inject(self, index: int, text: str) -> None:
        """Append ``text`` to row ``index`` only, fed at its next step."""
        self.scheduler._inject(self.channel.rows[index], text)

    def close(self) -> None:
        for i, reason in enumerate(self.finish_reasons):
            if reason is None:
                self.finish_reasons[i] = "cancelled"
        self.scheduler._abort(self.channel, "cancelled")

    def abort(self) -> None:
        self.scheduler._abort(self.channel, "cancelled")


class FedStream:
    """A fed row: ``feed(items)`` hands it ``(token id, position, tag)``
    items (``None`` where it starts over) and returns ``(tag, stats)`` of the
    scored ones once the batch has fed them all; ``close()`` leaves the batch."""

    def __init__(self, scheduler: Any, channel: Any) -> None:
        self.scheduler, self.channel = scheduler, channel
        self.slot = channel.rows[0]

    def feed(self, items: Sequence[Any]) -> list[tuple[Any, Any]]:
        waiting = self.scheduler._feed(self.slot, items)
        out: list[tuple[Any, Any]] = []
        while waiting:
            _, (scores, consumed) = self.scheduler._get(self.channel)
            out += scores
            waiting -= consumed
        return out

    def close(self) -> None:
        self.scheduler._abort(self.channel, "cancelled")

    abort = close

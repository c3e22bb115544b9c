"""Sinks that write events somewhere: JSON lines, or a Python callback."""

from __future__ import annotations

from typing import IO, Callable

from livepp.core.events import Event, dumps, to_json_dict

__all__ = ["JsonlSink", "CallbackSink", "event_json"]


def event_json(event: Event) -> str:
    """One event as one line of JSON (no trailing newline)."""
    return dumps(to_json_dict(event))


class JsonlSink:
    """Writes one JSON object per line and flushes after each, so readers see
    every token as soon as it exists."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream

    def emit(self, event: Event) -> None:
        self.stream.write(event_json(event) + "\n")
        self.stream.flush()


class CallbackSink:
    def __init__(self, callback: Callable[[Event], None]) -> None:
        self.callback = callback

    def emit(self, event: Event) -> None:
        self.callback(event)

"""A per-client outbox that never blocks the decoder and never loses `end`.

Events are put from any thread (through the event loop) and sent by one task
per connection. When a client reads slower than tokens arrive and the outbox
holds ``limit`` items, a new token event is *merged* into the token event
already waiting for the same request: texts are concatenated, the running
statistics are the newer ones, and ``coalesced`` counts the tokens folded in.
So a slow reader gets fewer, bigger token events, the full text, and every
start, policy, end and error event.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any

__all__ = ["Outbox"]


class Outbox:
    def __init__(self, limit: int = 256) -> None:
        self.limit = limit
        self._items: deque[dict[str, Any]] = deque()
        self._ready = asyncio.Event()
        self.coalesced = 0
        self.dropped = 0

    def put(self, event: dict[str, Any], *, droppable: bool = False) -> None:
        """Queue an event; call on the event loop's thread.

        ``droppable`` events (errors answering a refused message, which belong
        to no running request) are dropped, and counted, while the outbox is
        full: a client that floods bad messages and never reads cannot grow
        the server's memory."""
        if droppable and len(self._items) >= self.limit:
            self.dropped += 1
            return
        if event.get("type") == "token" and len(self._items) >= self.limit:
            for waiting in reversed(self._items):
                if waiting.get("type") == "token" and waiting.get("id") == event.get("id"):
                    merged_text = waiting["text"] + event["text"]
                    count = waiting.get("coalesced", 1) + 1
                    waiting.clear()
                    waiting.update(event, text=merged_text, coalesced=count)
                    self.coalesced += 1
                    return
                if waiting.get("id") == event.get("id"):
                    break  # a non-token event of this request is in between; keep order
        self._items.append(event)
        self._ready.set()

    async def get(self) -> dict[str, Any]:
        while not self._items:
            self._ready.clear()
            await self._ready.wait()
        return self._items.popleft()

    def __len__(self) -> int:
        return len(self._items)

"""Fed rows: a text's tokens scored as rows of the continuous batch.

Proxy scoring of a text stream (the service's ``watch``) needs no sampling:
the tokens are given as the text arrives, and each is scored by the logits
before it. A fed row of the :class:`~livepp.engines.scheduler.Scheduler`
takes those tokens from its consumer and feeds them (up to a chunk per step)
into its cache in the same forward passes as the other rows' decode steps,
so watching and generating share the model. A fed row with nothing to feed
waits without holding up the batch.

:class:`ScheduledScorer` is the consumer's side, with the interface of
:class:`~livepp.engines.torch.proxy.IncrementalScorer` (``push`` ids, get the
scores of the scored ones back), so :class:`~livepp.engines.torch.proxy.ProxyStream`
runs on either: windows (``max_length``, ``stride``) follow
:func:`livepp.scoring.teacher_forced.plan_windows` as there, a new window
starting the row over (``forget``) with the ids it re-reads.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any, Sequence

from livepp.core.params import GenerationParams, watch_windows

__all__ = ["Feed", "FedState", "ScheduledScorer", "plan_feed"]


@dataclass
class Feed:
    """What one row feeds in one forward pass: ``ids`` at positions
    ``start``, ``start + 1``, ...; the logits of the ``wanted`` slots come
    back; ``forget``: the row starts over before it (a new window)."""

    ids: list[int]
    start: int
    wanted: list[int]
    forget: bool = False


@dataclass
class FedState:
    """A fed row's queue: ``(token id, position, tag)`` items (``tag``: what
    the item's score is reported under, or None for an unscored item), a
    ``None`` item where the row starts over, and the last logits it left
    (they score the next item)."""

    queue: deque = field(default_factory=deque)
    last: Any = None


def plan_feed(state: FedState, chunk: int) -> tuple[Feed, list[tuple[int, int, Any]]]:
    """The next at most ``chunk`` items of a fed row (never across a
    start-over), as a feed, and the items."""
    forget = False
    while state.queue and state.queue[0] is None:
        state.queue.popleft()
        state.last, forget = None, True
    items = []
    while state.queue and state.queue[0] is not None and len(items) < chunk:
        items.append(state.queue.popleft())
    if not items:
        return Feed([], 0, [], forget), items
    # Slot j's logits score item j + 1; the last slot's score the next feed's first.
    wanted = [j for j in range(len(items) - 1) if items[j + 1][2] is not None] + [len(items) - 1]
    return Feed([i for i, _, _ in items], items[0][1], wanted, forget), items


def score_feed(state: FedState, items: Sequence[tuple[int, int, Any]], wanted: list[int], logits: Any,
               params: GenerationParams) -> list[tuple[Any, Any]]:
    """``(tag, StepStats)`` of every scored item of a feed, from its wanted
    slots' logits (``logits[k]`` for ``wanted[k]``) and the logits the row's
    previous feed left (an item with nothing before it is not scored)."""
    import torch

    from livepp.engines.torch.sampling import forced_token_stats

    rows_of = {slot: k for k, slot in enumerate(wanted)}
    block, ids, tags = [], [], []
    for j, (token, _, tag) in enumerate(items):
        before = state.last if j == 0 else (logits[rows_of[j - 1]] if j - 1 in rows_of else None)
        if tag is not None and before is not None:
            block.append(before)
            ids.append(token)
            tags.append(tag)
    state.last = logits[rows_of[len(items) - 1]].clone()
    if not block:
        return []
    return list(zip(tags, forced_token_stats(torch.stack(block), ids, params)))


class ScheduledScorer:
    """The consumer's side of a fed row (see the module docstring)."""

    def __init__(self, scheduler: Any, params: GenerationParams, *, max_length: int | None = None, stride: int | None = None) -> None:
        context = scheduler.text.context_length
        self.max_length, self.stride = watch_windows(context, max_length, stride)
        self.stream = scheduler.open_fed(params)
        self.n = 0  # positions appended so far
        self.begin = 0  # the current window's first position
        self.recent: deque[int] = deque(maxlen=self.max_length)
        self.forward_tokens = 0  # tokens fed, re-read window context included

    def push(self, items: Sequence[tuple[int, bool]]) -> list[tuple[int, Any]]:
        """Append ``(token_id, scored)`` items; ``(position, stats)`` of every
        scored one, once the batch has fed them (position 0 is never scored)."""
        fed: list[Any] = []
        for token, scored in items:
            pos = self.n
            if pos > self.begin + self.max_length - 1:  # past this window: the next one starts
                while pos > self.begin + self.max_length - 1:
                    self.begin += self.stride
                context = list(self.recent)[len(self.recent) - (pos - self.begin):] if pos > self.begin else []
                fed.append(None)
                fed += [(t, k, None) for k, t in enumerate(context)]
            fed.append((token, pos - self.begin, pos if scored and pos > 0 else None))
            self.recent.append(token)
            self.n += 1
        self.forward_tokens += sum(1 for f in fed if f is not None)
        return self.stream.feed(fed) if fed else []

    def close(self) -> None:
        self.stream.close()

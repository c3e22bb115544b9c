"""The live terminal view: tokens coloured by surprisal and a status line.

Each token's colour goes from green (the model was sure, −log p near 0)
through yellow to red (−log p of 6 nats or more, p < 0.25%). The status line
under the text shows the running PPL, window PPL, entropy and confidence,
and policy decisions appear as they happen.
"""

from __future__ import annotations

import math
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.text import Text

from livepp.core.events import EndEvent, ErrorEvent, Event, PolicyEvent, StartEvent, TokenEvent

__all__ = ["TerminalView", "SamplesView", "surprisal_colour"]

_RED_AT_NATS = 6.0


def surprisal_colour(nll: float) -> str:
    """An RGB colour for a token's surprisal: green, yellow, then red."""
    x = 1.0 if not math.isfinite(nll) else min(max(nll / _RED_AT_NATS, 0.0), 1.0)
    if x < 0.5:  # green -> yellow
        r, g = int(80 + 350 * x), 220
    else:  # yellow -> red
        r, g = 255, int(220 - 400 * (x - 0.5))
    return f"rgb({min(r, 255)},{max(g, 40)},80)"


def _fmt(x: Any, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    return f"{x:.{digits}f}"


class TerminalView:
    """A sink that renders the generation live with rich."""

    def __init__(self, console: Console | None = None, *, stop_threshold: str = "") -> None:
        self.console = console or Console(stderr=False)
        self.stop_threshold = stop_threshold
        self._text = Text()
        self._notes: list[Text] = []
        self._status = Text("")
        self._live: Live | None = None
        self._last: TokenEvent | None = None

    def _renderable(self) -> Group:
        return Group(self._text, *self._notes, self._status)

    def emit(self, event: Event) -> None:
        if isinstance(event, StartEvent):
            header = Text(f"{event.model} · {len(event.prompt_token_ids)} prompt tokens", style="dim")
            if self.stop_threshold:
                header.append(f" · stop when {self.stop_threshold}", style="dim")
            self.console.print(header)
            self.console.print(
                Text("colour = surprisal −log p: ", style="dim")
                + Text("sure ", style=surprisal_colour(0.2))
                + Text("unsure ", style=surprisal_colour(3.0))
                + Text("surprised", style=surprisal_colour(6.0))
            )
            self._live = Live(self._renderable(), console=self.console, refresh_per_second=12, transient=False)
            self._live.start()
        elif isinstance(event, TokenEvent):
            self._text.append(event.text, style=surprisal_colour(-event.logprob))
            self._last = event
            self._status = Text(
                f"tokens {event.index + 1} · PPL {_fmt(event.ppl)} · window PPL {_fmt(event.window_ppl)}"
                f" · entropy {_fmt(event.entropy)} nats · confidence {_fmt(event.group_confidence)}",
                style="bold cyan",
            )
            self._refresh()
        elif isinstance(event, PolicyEvent):
            self._notes.append(Text(f"[{event.policy}] {event.action} at token {event.index}: {event.reason}", style="bold magenta"))
            self._refresh()
        elif isinstance(event, EndEvent):
            self._status = Text(
                f"end: {event.reason} · {event.n_tokens} tokens · PPL {_fmt(event.ppl)}"
                f" · mean NLL {_fmt(event.mean_nll, 3)} nats · prefill {event.prefill_s:.2f} s"
                f" · {event.tokens_per_s:.1f} tokens/s",
                style="bold cyan",
            )
            self._refresh()
            self.close()
        elif isinstance(event, ErrorEvent):
            self.close()

    def _refresh(self) -> None:
        if self._live is not None:
            self._live.update(self._renderable())

    def close(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None


class SamplesView:
    """Several samples decoding at once: one live status line per sample
    (tokens, PPL, window PPL, how it ended, the tail of its text)."""

    def __init__(self, labels: list[str], *, console: Console | None = None) -> None:
        self.console = console or Console(stderr=False)
        self.labels = labels
        self.state: list[dict[str, Any]] = [{"n": 0, "ppl": None, "wppl": None, "text": "", "end": None} for _ in labels]
        self._live: Live | None = None

    def _render(self) -> Group:
        lines = []
        for label, s in zip(self.labels, self.state):
            tail = " ".join(s["text"].split())[-48:]
            status = s["end"] or "…"
            lines.append(Text.assemble((f"{label:<10}", "bold"), f" {s['n']:>4} tokens · PPL {_fmt(s['ppl'])} · "
                                       f"window {_fmt(s['wppl'])} · {status:<12} ", (tail, "dim")))
        return Group(*lines)

    def emit_sample(self, sample: int, event: Event) -> None:
        s = self.state[sample]
        if isinstance(event, TokenEvent):
            s.update(n=event.index + 1, ppl=event.ppl, wppl=event.window_ppl, text=s["text"] + event.text)
        elif isinstance(event, EndEvent):
            s["end"] = event.reason
        elif isinstance(event, PolicyEvent) and event.action != "note":
            s["end"] = f"{event.action}: {event.policy}"
        live = self.console.is_terminal  # redraws only make sense on a terminal
        if live and self._live is None:
            self._live = Live(self._render(), console=self.console, auto_refresh=False)
            self._live.start()
        if self._live is not None:
            self._live.update(self._render(), refresh=True)
        if all(x["end"] is not None for x in self.state):
            if self._live is not None:
                self._live.stop()
                self._live = None
            else:
                self.console.print(self._render())
            for label, x in zip(self.labels, self.state):
                self.console.print(Text.assemble((f"{label}: ", "bold"), x["text"].strip()))

    def emit(self, event: Event) -> None:  # a single stream: sample 0
        self.emit_sample(0, event)

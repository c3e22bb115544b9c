"""What the commands share: how they fail, read a prompt and run one monitored stream."""

from __future__ import annotations

import sys
from typing import Any

import click

from livepp.core.events import ErrorEvent
from livepp.core.params import LiveppError
from livepp.core.sinks import JsonlSink, event_json

__all__ = ["fail", "command_failed", "read_prompt", "monitor_one"]


def read_prompt(prompt: str | None) -> str:
    if prompt is None or prompt == "-":
        if prompt is None and sys.stdin.isatty():
            raise LiveppError("give a PROMPT argument, or '-' to read the prompt from standard input")
        return sys.stdin.read()
    return prompt


def fail(message: str, *, as_json: bool, code: int) -> None:
    click.echo(f"livepp: error: {message}", err=True)
    if as_json:
        click.echo(event_json(ErrorEvent(message)))
    sys.exit(code)


def command_failed(exc: BaseException, *, as_json: bool) -> None:
    """How a streaming command ends on a failure: a usage error (2), Ctrl-C
    (130), a reader gone away (quietly), anything else (1): one line each,
    not a traceback."""
    if isinstance(exc, LiveppError):
        fail(str(exc), as_json=as_json, code=2)
    elif isinstance(exc, KeyboardInterrupt):
        fail("interrupted", as_json=as_json, code=130)
    elif isinstance(exc, BrokenPipeError):
        # The reader went away (e.g. `| head`); nothing left to tell anyone.
        sys.stderr.close()
        sys.exit(0)
    elif isinstance(exc, Exception):
        fail(f"{type(exc).__name__}: {exc}", as_json=as_json, code=1)
    else:
        raise exc  # SystemExit and the like go on


def monitor_one(stream: Any, *, name: str, kind: str, params: dict[str, Any], policies: list[Any], window: int,
                steps: str | None, as_json: bool) -> Any:
    """Run one token stream through the monitor to the terminal view or JSON lines."""
    if as_json:
        sinks: list[Any] = [JsonlSink(sys.stdout)]
    else:
        from livepp.cli.terminal import TerminalView

        sinks = [TerminalView(stop_threshold=" or ".join(p.name for p in policies))]
    from livepp.core.monitor import Monitor
    from livepp.core.tracker import Tracker

    tracker = Tracker(window=window)
    settings = {"window": window, "ema_alpha": tracker.ema_alpha, "confidence_window": tracker.confidence_window}
    monitor = Monitor(policies=policies, sinks=sinks, tracker_factory=lambda: Tracker(window=window), steps=steps)
    return monitor.run(stream, model=name, params=params | settings, engine=kind)

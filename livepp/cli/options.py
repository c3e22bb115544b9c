"""Options shared by the commands, and how a command gets its engine."""

from __future__ import annotations

from typing import Any, Callable

import click

__all__ = ["device_options", "local_engine"]


def device_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Add ``--device`` and ``--dtype`` (passed on as ``device``, ``dtype``)."""
    command = click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto", show_default=True,
                           help="Weights' dtype; auto: float32 on the CPU, bfloat16/float16 on a GPU. Statistics are float32 always.")(command)
    return click.option("--device", default="auto", show_default=True, metavar="auto|cpu|cuda[:N]|mps",
                        help="Where the model runs; auto picks CUDA, then MPS, then the CPU.")(command)


def local_engine(model_path: str | None, *, device: str, dtype: str) -> Any:
    """The engine a command runs on: the one an embedding application put in
    the click context (``main(args, obj={"engine": engine})``: a test's
    scripted engine, an application's own), else the local torch engine for
    ``--model`` (default: the embedded model)."""
    obj = click.get_current_context().find_root().obj
    if isinstance(obj, dict) and obj.get("engine") is not None:
        return obj["engine"]
    from livepp.api import as_engine

    return as_engine(model_path, device=device, dtype=dtype)

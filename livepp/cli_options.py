"""Options shared by every command that loads a local model."""

from __future__ import annotations

from typing import Any, Callable

import click

__all__ = ["device_options"]


def device_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Add ``--device`` and ``--dtype`` (passed on as ``device``, ``dtype``)."""
    command = click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto", show_default=True,
                           help="Weights' dtype; auto: float32 on the CPU, bfloat16/float16 on a GPU. Statistics are float32 always.")(command)
    return click.option("--device", default="auto", show_default=True, metavar="auto|cpu|cuda[:N]|mps",
                        help="Where the model runs; auto picks CUDA, then MPS, then the CPU.")(command)

"""Options shared by the commands, and how a command gets its engine."""

from __future__ import annotations

from typing import Any, Callable

import click

__all__ = ["device_options", "engine_kind_for", "local_engine"]


def device_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Add ``--engine``, ``--device``, ``--dtype`` and ``--exact`` (passed on as
    ``engine_kind``, ``device``, ``dtype``, ``exact``)."""
    command = click.option("--exact", is_flag=True,
                           help="--engine llama.cpp: evaluate every prompt token in its own decode (slower to start), so the numbers "
                                "equal llama.cpp's token-by-token evaluation; by default prompts (and score's windows) go through "
                                "llama.cpp's batched kernels, which round differently (the README gives the measured difference).")(command)
    command = click.option("--engine", "engine_kind", type=click.Choice(["torch", "llama.cpp", "auto"]), default="torch", show_default=True,
                           help="What runs the model: torch (Hugging Face, any device), llama.cpp (a .gguf at native speed on the CPU; "
                                "pip install 'livepp[llama]'), or auto (llama.cpp for a .gguf when it is installed).")(command)
    command = click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto", show_default=True,
                           help="Weights' dtype; auto: float32 on the CPU, bfloat16/float16 on a GPU. Statistics are float32 always.")(command)
    return click.option("--device", default="auto", show_default=True, metavar="auto|cpu|cuda[:N]|mps",
                        help="Where the model runs; auto picks CUDA, then MPS, then the CPU.")(command)


def engine_kind_for(model_path: str | None, engine: str) -> str:
    """``--engine auto`` resolved: llama.cpp for a .gguf (or the embedded model) when it is installed, else torch."""
    if engine != "auto":
        return engine
    from livepp.engines.llamacpp import llama_cpp_available

    gguf = model_path is None or str(model_path).lower().endswith(".gguf")
    return "llama.cpp" if gguf and llama_cpp_available() else "torch"


def local_engine(model_path: str | None, *, device: str, dtype: str, engine: str = "torch", exact: bool = False) -> Any:
    """The engine a command runs on: the one an embedding application put in
    the click context (``main(args, obj={"engine": engine})``: a test's
    scripted engine, an application's own), else ``--engine`` for ``--model``
    (default: the embedded model). ``exact``: llama.cpp's token-by-token path."""
    from livepp.core.params import LiveppError

    obj = click.get_current_context().find_root().obj
    if isinstance(obj, dict) and obj.get("engine") is not None:
        return obj["engine"]
    engine = engine_kind_for(model_path, engine)
    if exact and engine != "llama.cpp":
        raise LiveppError("--exact is for --engine llama.cpp (the torch engine has one path)")
    if engine == "llama.cpp":
        from livepp.engines.llamacpp import LlamaCppEngine

        if device not in ("auto", "cpu") or dtype not in ("auto", "float32"):
            raise LiveppError("--engine llama.cpp runs the .gguf's own weights on the CPU: no --device or --dtype")
        return LlamaCppEngine(model_path, exact=exact)
    from livepp.api import as_engine

    return as_engine(model_path, device=device, dtype=dtype)

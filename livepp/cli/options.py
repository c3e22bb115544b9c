"""Options shared by the commands, and how a command gets its engine."""

from __future__ import annotations

from typing import Any, Callable

import click

__all__ = ["device_options", "local_engine"]


def device_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Add ``--engine``, ``--device`` and ``--dtype`` (passed on as ``engine_kind``, ``device``, ``dtype``)."""
    command = click.option("--engine", "engine_kind", type=click.Choice(["torch", "llama.cpp", "auto"]), default="torch", show_default=True,
                           help="What runs the model: torch (Hugging Face, any device), llama.cpp (a .gguf at native speed on the CPU; "
                                "pip install 'livepp[llama]'), or auto (llama.cpp for a .gguf when it is installed).")(command)
    command = click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto", show_default=True,
                           help="Weights' dtype; auto: float32 on the CPU, bfloat16/float16 on a GPU. Statistics are float32 always.")(command)
    return click.option("--device", default="auto", show_default=True, metavar="auto|cpu|cuda[:N]|mps",
                        help="Where the model runs; auto picks CUDA, then MPS, then the CPU.")(command)


def local_engine(model_path: str | None, *, device: str, dtype: str, engine: str = "torch") -> Any:
    """The engine a command runs on: the one an embedding application put in
    the click context (``main(args, obj={"engine": engine})``: a test's
    scripted engine, an application's own), else ``--engine`` for ``--model``
    (default: the embedded model)."""
    obj = click.get_current_context().find_root().obj
    if isinstance(obj, dict) and obj.get("engine") is not None:
        return obj["engine"]
    if engine == "auto":
        from livepp.engines.llamacpp import llama_cpp_available

        gguf = model_path is None or str(model_path).lower().endswith(".gguf")
        engine = "llama.cpp" if gguf and llama_cpp_available() else "torch"
    if engine == "llama.cpp":
        from livepp.core.params import LiveppError
        from livepp.engines.llamacpp import LlamaCppEngine

        if device not in ("auto", "cpu") or dtype not in ("auto", "float32"):
            raise LiveppError("--engine llama.cpp runs the .gguf's own weights on the CPU: no --device or --dtype")
        return LlamaCppEngine(model_path)
    from livepp.api import as_engine

    return as_engine(model_path, device=device, dtype=dtype)

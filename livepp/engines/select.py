"""Which engine a model-like value is: an engine as it is, or the local torch
engine for a path, a loaded model or nothing (the embedded default); and
which local engines continuous batching can run."""

from __future__ import annotations

import os
import sys
from typing import Any, Union

from livepp.engines.protocol import Engine

__all__ = ["ModelLike", "as_engine", "local_kind", "supports_continuous_batching"]


# What the API accepts as a model: an engine, or what the torch engine loads.
ModelLike = Union[Engine, Any, str, "os.PathLike[str]", None]


def as_engine(model: ModelLike, *, device: str = "cpu", dtype: str = "float32") -> Engine:
    """An engine from ``model``: an engine as it is; a ``Decoder``, a loaded
    model, a path or cached Hub id, or None (the embedded default model) as
    the local torch engine, loading a path on ``device`` in ``dtype``."""
    if model is None or isinstance(model, (str, os.PathLike)):
        return _torch_engine(model, device=device, dtype=dtype)
    # A decoder or loaded model can only exist once its module is imported,
    # so looking there never imports torch for a remote or scripted engine.
    local = [getattr(sys.modules.get(m), n, None) for m, n in _LOCAL_TYPES]
    if any(t is not None and isinstance(model, t) for t in local):
        return _torch_engine(model, device=device, dtype=dtype)
    return model  # an engine


_LOCAL_TYPES = (("livepp.engines.torch.engine", "TorchEngine"), ("livepp.engines.torch.decoder", "Decoder"),
                ("livepp.engines.torch.models", "LoadedModel"))


def _torch_engine(model: Any, *, device: str, dtype: str) -> Engine:
    from livepp.engines.torch.engine import torch_engine

    return torch_engine(model, device=device, dtype=dtype)


def local_kind(engine: Any) -> str | None:
    """"torch" or "llama.cpp" for a local engine that continuous batching can
    run, else None. A module not yet imported cannot have made ``engine``, so
    this never imports torch for a remote or scripted engine."""
    torch_mod, llama_mod = sys.modules.get("livepp.engines.torch.engine"), sys.modules.get("livepp.engines.llamacpp")
    if torch_mod is not None and isinstance(engine, torch_mod.TorchEngine):
        return "torch"
    if llama_mod is not None and isinstance(engine, llama_mod.LlamaCppEngine):
        return "llama.cpp"
    return None


def supports_continuous_batching(engine: Any) -> bool:
    return local_kind(engine) is not None


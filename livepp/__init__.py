"""livepp: watch a language model's perplexity live while it generates, and act on it.

Public names are imported lazily on first use, so ``import livepp.tracker``
(or a remote-only user) never pays for importing torch and transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "generate": "api",
    "generate_many": "api",
    "stream_many": "api",
    "astream": "api",
    "greedy_token_scores": "api",
    "score_text": "scoring",
    "score_target": "scoring",
    "score_ids": "scoring",
    "ScoreResult": "scoring",
    "Decoder": "decoder",
    "load_model": "models",
    "LoadedModel": "models",
    "GenerationParams": "params",
    "LiveppError": "params",
    "Monitor": "monitor",
    "Result": "monitor",
    "Tracker": "tracker",
    "Policy": "policies",
    "Decision": "policies",
    "CONTINUE": "policies",
    "EarlyStop": "policies",
    "run_policies": "policies",
    "TokenRecord": "events",
    "TopLogprob": "events",
    "StartEvent": "events",
    "TokenEvent": "events",
    "PolicyEvent": "events",
    "EndEvent": "events",
    "ErrorEvent": "events",
    "to_json_dict": "events",
    "JsonlSink": "sinks",
    "CallbackSink": "sinks",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'livepp' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from .api import astream, generate, generate_many, greedy_token_scores, stream_many
    from .scoring import ScoreResult, score_ids, score_target, score_text
    from .decoder import Decoder
    from .events import (EndEvent, ErrorEvent, PolicyEvent, StartEvent, TokenEvent,
                         TokenRecord, TopLogprob, to_json_dict)
    from .models import LoadedModel, load_model
    from .monitor import Monitor, Result
    from .params import GenerationParams, LiveppError
    from .policies import CONTINUE, Decision, EarlyStop, Policy, run_policies
    from .sinks import CallbackSink, JsonlSink
    from .tracker import Tracker

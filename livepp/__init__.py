"""livepp: watch a language model's perplexity live while it generates, and act on it.

Public names are imported lazily on first use, so ``import livepp.core.tracker``
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
    "score_text": "scoring.teacher_forced",
    "score_target": "scoring.teacher_forced",
    "score_ids": "scoring.teacher_forced",
    "ScoreResult": "scoring.teacher_forced",
    "Decoder": "engines.torch.decoder",
    "load_model": "engines.torch.models",
    "LoadedModel": "engines.torch.models",
    "GenerationParams": "core.params",
    "LiveppError": "core.params",
    "Monitor": "core.monitor",
    "Result": "core.monitor",
    "Tracker": "core.tracker",
    "Policy": "core.policies",
    "Decision": "core.policies",
    "CONTINUE": "core.policies",
    "EarlyStop": "core.policies",
    "run_policies": "core.policies",
    "TokenRecord": "core.events",
    "TopLogprob": "core.events",
    "StartEvent": "core.events",
    "TokenEvent": "core.events",
    "PolicyEvent": "core.events",
    "EndEvent": "core.events",
    "ErrorEvent": "core.events",
    "to_json_dict": "core.events",
    "JsonlSink": "core.sinks",
    "CallbackSink": "core.sinks",
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
    from livepp.api import astream, generate, generate_many, greedy_token_scores, stream_many
    from livepp.scoring.teacher_forced import ScoreResult, score_ids, score_target, score_text
    from livepp.engines.torch.decoder import Decoder
    from livepp.core.events import (EndEvent, ErrorEvent, PolicyEvent, StartEvent, TokenEvent,
                         TokenRecord, TopLogprob, to_json_dict)
    from livepp.engines.torch.models import LoadedModel, load_model
    from livepp.core.monitor import Monitor, Result
    from livepp.core.params import GenerationParams, LiveppError
    from livepp.core.policies import CONTINUE, Decision, EarlyStop, Policy, run_policies
    from livepp.core.sinks import CallbackSink, JsonlSink
    from livepp.core.tracker import Tracker

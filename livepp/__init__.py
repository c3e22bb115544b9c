"""livepp: watch a language model's perplexity live while it generates, and act on it."""

from .api import generate
from .decoder import Decoder
from .events import (
    EndEvent,
    ErrorEvent,
    PolicyEvent,
    StartEvent,
    TokenEvent,
    TokenRecord,
    TopLogprob,
    to_json_dict,
)
from .models import LoadedModel, load_model
from .monitor import Monitor, Result
from .params import GenerationParams, LiveppError
from .policies import CONTINUE, Decision, EarlyStop, Policy, run_policies
from .sinks import CallbackSink, JsonlSink
from .tracker import Tracker

__all__ = [
    "generate",
    "Decoder",
    "load_model",
    "LoadedModel",
    "GenerationParams",
    "LiveppError",
    "Monitor",
    "Result",
    "Tracker",
    "Policy",
    "Decision",
    "CONTINUE",
    "EarlyStop",
    "run_policies",
    "TokenRecord",
    "TopLogprob",
    "StartEvent",
    "TokenEvent",
    "PolicyEvent",
    "EndEvent",
    "ErrorEvent",
    "to_json_dict",
    "JsonlSink",
    "CallbackSink",
]

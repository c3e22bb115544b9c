"""Typed records that flow from a token source through the monitor to sinks.

A *token source* yields :class:`TokenRecord` (what the model said and how sure it
was). The monitor turns each into a :class:`TokenEvent` by adding the tracker's
running statistics, and frames the stream with a :class:`StartEvent` and an
:class:`EndEvent`. Every sink sees the same objects and serialises them with
:func:`to_json_dict`, so the terminal, JSONL and websocket forms never drift.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, Literal, Union

import orjson

__all__ = [
    "TopLogprob",
    "TokenRecord",
    "PositionScore",
    "StartEvent",
    "TokenEvent",
    "StepEvent",
    "PolicyEvent",
    "EndEvent",
    "ErrorEvent",
    "Event",
    "FinishReason",
    "to_json_dict",
    "json_safe",
    "dumps",
]

FinishReason = Literal["eos", "length", "stop_string", "policy", "error", "shutdown", "cancelled"]


@dataclass(frozen=True, slots=True)
class TopLogprob:
    """One alternative from the raw next-token distribution."""

    token_id: int
    text: str
    logprob: float


@dataclass(frozen=True, slots=True)
class PositionScore:
    """A given token's score at its position (teacher forcing: a prompt's
    token, a scored text's): its raw logprob, its 1-based rank in the whole
    vocabulary, the entropy of the distribution it was drawn from, and that
    distribution's most likely tokens as (id, logprob), most likely first."""

    position: int
    token_id: int
    logprob: float
    rank: int
    entropy: float | None
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True, slots=True)
class TokenRecord:
    """What a token source knows about one generated token.

    ``logprob`` is always under the *raw* distribution (softmax of the
    unprocessed logits at temperature 1). ``sampling_logprob`` is the log-prob
    under the processed distribution the sampler drew from (None for greedy).
    ``confidence`` is DeepConf's token confidence, −mean of the top-k raw
    logprobs, when the source could compute it. ``finish_reason`` is set on the
    last record a source produces by itself.
    """

    token_id: int
    text: str
    logprob: float
    entropy: float | None = None
    top_logprobs: tuple[TopLogprob, ...] = ()
    confidence: float | None = None
    sampling_logprob: float | None = None
    finish_reason: FinishReason | None = None
    varentropy: float | None = None  # variance of −log p under the raw distribution
    # Text an intervention appended (an ``inject`` policy), not generated:
    # shown, but counted in no statistic.
    injected: bool = False
    # A stream that sends only the top-k (a remote engine): the entropy lies
    # in [low, high] (high None without the vocabulary's size), and the mass
    # outside the top-k (livepp.core.entropy_bounds).
    entropy_bounds: tuple[float, float | None] | None = None
    tail_mass: float | None = None


@dataclass(frozen=True, slots=True)
class StartEvent:
    model: str
    prompt_token_ids: tuple[int, ...]
    params: dict[str, Any]
    type: Literal["start"] = "start"
    engine: str | None = None  # "torch", "llama.cpp", "openai", ...


@dataclass(frozen=True, slots=True)
class TokenEvent:
    """A token together with the tracker's statistics *after* counting it."""

    index: int
    token_id: int
    text: str
    logprob: float
    entropy: float | None
    top_logprobs: tuple[TopLogprob, ...]
    mean_nll: float
    ppl: float
    window_ppl: float
    ema_nll: float
    confidence: float | None
    group_confidence: float | None
    surprise_z: float | None
    type: Literal["token"] = "token"
    varentropy: float | None = None
    injected: bool = False  # appended by an inject policy; not in any statistic
    entropy_bounds: tuple[float, float | None] | None = None  # a remote stream's: see TokenRecord
    tail_mass: float | None = None


@dataclass(frozen=True, slots=True)
class PolicyEvent:
    policy: str
    action: Literal["stop", "route", "note"]
    index: int
    reason: str
    type: Literal["policy"] = "policy"


@dataclass(frozen=True, slots=True)
class StepEvent:
    """A reasoning step that has ended: tokens ``start_token..end_token``
    (inclusive), their text, PPL, mean entropy and lowest token confidence."""

    index: int
    start_token: int
    end_token: int
    text: str
    ppl: float
    mean_entropy: float | None
    min_confidence: float | None
    type: Literal["step"] = "step"


@dataclass(frozen=True, slots=True)
class EndEvent:
    reason: FinishReason
    n_tokens: int
    text: str
    mean_nll: float
    ppl: float
    prefill_s: float
    decode_s: float
    tokens_per_s: float
    # Remote streams: tokens that had already arrived when a policy stopped
    # the stream and were not consumed (None for the local decoder).
    tokens_after_stop: int | None = None
    # Remote streams: the engine's own finish reason when it said one
    # (e.g. "abort" or "content_filter", which end as "error").
    engine_finish_reason: str | None = None
    type: Literal["end"] = "end"


@dataclass(frozen=True, slots=True)
class ErrorEvent:
    message: str
    type: Literal["error"] = "error"
    extra: dict[str, Any] = field(default_factory=dict)


Event = Union[StartEvent, TokenEvent, PolicyEvent, StepEvent, EndEvent, ErrorEvent]


def _json_float(x: float | None) -> float | None:
    # JSON has no inf/nan; a PPL can legitimately overflow to inf (a token of
    # probability 0 under fp32), so those become null rather than invalid JSON.
    if x is None or math.isfinite(x):
        return x
    return None


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float (anywhere inside) replaced by None.

    JSON has no NaN or Infinity; Python's json module writes them anyway and
    browsers' ``JSON.parse`` then rejects the whole message."""
    if isinstance(value, float):
        return _json_float(value)
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def dumps(value: Any) -> str:
    """The one way livepp writes JSON: strict (NaN and infinity as null),
    UTF-8 kept, compact. orjson writes it (a token's event in a few
    microseconds); what orjson refuses (a lone surrogate from a command line
    read with surrogateescape, an integer past 64 bits) goes through the json
    module, non-finite floats replaced first."""
    try:
        return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS).decode()
    except TypeError:  # orjson.JSONEncodeError is a TypeError
        return json.dumps(json_safe(value), ensure_ascii=False, allow_nan=False, separators=(",", ":"))


_FIELD_NAMES: dict[type, tuple[str, ...]] = {}


def to_json_dict(event: Event) -> dict[str, Any]:
    """The one JSON form of an event, with ``type`` first."""
    out: dict[str, Any] = {"type": event.type}
    names = _FIELD_NAMES.get(type(event))
    if names is None:  # an event class's fields, looked up once
        names = _FIELD_NAMES[type(event)] = tuple(f.name for f in dataclasses.fields(event) if f.name not in ("type", "extra"))
    for name in names:
        value = getattr(event, name)
        if (name == "injected" and not value) or (name in ("entropy_bounds", "tail_mass") and value is None):
            continue  # only injected tokens say so; only streams with a top-k only carry bounds
        if name == "top_logprobs":
            value = [
                {"token_id": t.token_id, "text": t.text, "logprob": _json_float(t.logprob)}
                for t in value
            ]
        elif name in ("prompt_token_ids", "entropy_bounds"):
            value = [_json_float(v) if isinstance(v, float) else v for v in value]
        elif isinstance(value, float):
            value = _json_float(value)
        out[name] = value
    if isinstance(event, ErrorEvent):
        out.update(event.extra)
    return out

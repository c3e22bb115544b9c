"""Generation parameters, checked once before any compute."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

__all__ = ["LiveppError", "PromptTooLong", "EngineBusy", "GenerationParams", "DEFAULT_MAX_NEW_TOKENS", "GREEDY_BELOW", "watch_windows"]

DEFAULT_MAX_NEW_TOKENS = 256
# A temperature below this is greedy (vLLM's rule): dividing fp32 logits by a
# smaller one overflows to inf, and softmax of inf - inf is NaN.
GREEDY_BELOW = 1e-5


class LiveppError(ValueError):
    """A problem the user can fix: bad input, a missing model, a bad option.

    The CLI prints these as one line without a traceback.
    """


class PromptTooLong(LiveppError):
    """The prompt leaves no room in the model's context (or a fixed KV cache)."""


class EngineBusy(LiveppError):
    """The engine's batch and its queue are full; try again later."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise LiveppError(message)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return (isinstance(x, (int, float)) and not isinstance(x, bool)) and math.isfinite(x)


@dataclass(frozen=True, slots=True)
class GenerationParams:
    """How to generate. ``temperature=0`` means greedy (argmax of the raw
    logits), and so does any temperature below ``GREEDY_BELOW`` (1e-5).

    Sampling filters apply in this order to the logits divided by the
    temperature: top-k, then top-p (nucleus), then min-p. None of them changes
    the reported ``logprob``, which is always under the raw distribution.
    """

    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    top_logprobs: int = 5
    confidence_k: int = 20
    entropy: bool = True
    raw: bool = False

    def __post_init__(self) -> None:
        _require(_is_int(self.max_new_tokens) and self.max_new_tokens >= 1,
                 f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        _require(_is_number(self.temperature) and self.temperature >= 0,
                 f"temperature must be a number >= 0 (0 = greedy), got {self.temperature!r}")
        _require(_is_int(self.top_k) and self.top_k >= 0,
                 f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        _require(_is_number(self.top_p) and 0 < self.top_p <= 1,
                 f"top_p must be in (0, 1], got {self.top_p!r}")
        _require(_is_number(self.min_p) and 0 <= self.min_p < 1,
                 f"min_p must be in [0, 1), got {self.min_p!r}")
        _require(self.seed is None or (_is_int(self.seed) and 0 <= self.seed < 2**63),
                 f"seed must be a non-negative integer, got {self.seed!r}")
        _require(isinstance(self.stop, tuple) and all(isinstance(s, str) and s for s in self.stop),
                 f"stop must be a list of non-empty strings, got {self.stop!r}")
        _require(_is_int(self.top_logprobs) and 0 <= self.top_logprobs <= 100,
                 f"top_logprobs must be an integer in [0, 100] (0 = off), got {self.top_logprobs!r}")
        _require(_is_int(self.confidence_k) and 0 <= self.confidence_k <= 100,
                 f"confidence_k must be an integer in [0, 100] (0 = off), got {self.confidence_k!r}")
        for name in ("ignore_eos", "entropy", "raw"):
            _require(isinstance(getattr(self, name), bool), f"{name} must be true or false")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "GenerationParams":
        """Build from JSON-like input, rejecting unknown names and wrong types."""
        _require(isinstance(data, dict), "params must be a JSON object")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        _require(not unknown, f"unknown parameter(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        values = dict(data)
        if "stop" in values:
            stop = values["stop"]
            if isinstance(stop, str):
                stop = [stop]
            _require(isinstance(stop, (list, tuple)), f"stop must be a list of strings, got {stop!r}")
            values["stop"] = tuple(stop)
        for name in ("temperature", "top_p", "min_p"):
            if _is_int(values.get(name)):
                try:
                    values[name] = float(values[name])
                except OverflowError:
                    raise LiveppError(f"{name} is out of range: {values[name]:.6g}") from None
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["stop"] = list(self.stop)
        return out


def watch_windows(context: int, max_length: int | None, stride: int | None) -> tuple[int, int]:
    """A watched text's window length and stride, checked: the window at most
    the model's context (default: all of it), the stride at most the window
    (default: the window given, else half the context)."""
    if max_length is not None and not 2 <= max_length <= context:
        raise LiveppError(f"max_length must be between 2 and the model's context of {context}, got {max_length}")
    length = max_length or context
    step = stride or (max_length if max_length is not None else context // 2)
    if not 1 <= step <= length:
        raise LiveppError(f"stride must be between 1 and max_length ({length}), got {step}")
    return length, step

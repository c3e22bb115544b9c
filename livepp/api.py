"""The one-call Python API: generate with live monitoring."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Sequence

from .decoder import Decoder
from .models import LoadedModel, load_model
from .monitor import Monitor, Result, Sink
from .params import GenerationParams
from .policies import Policy
from .tracker import Tracker

if TYPE_CHECKING:
    from .scoring import ScoreResult

__all__ = ["generate", "as_decoder", "greedy_token_scores"]


def as_decoder(model: Decoder | LoadedModel | str | os.PathLike[str] | None) -> Decoder:
    """Accept a decoder, a loaded model, a path, or None for the embedded default."""
    if isinstance(model, Decoder):
        return model
    if isinstance(model, LoadedModel):
        return Decoder(model)
    return Decoder(load_model(model))


def generate(
    prompt: str,
    *,
    model: Decoder | LoadedModel | str | os.PathLike[str] | None = None,
    params: GenerationParams | None = None,
    policies: Sequence[Policy] = (),
    sinks: Sequence[Sink] = (),
    window: int = 32,
    ema_alpha: float = 0.1,
    confidence_window: int = 32,
) -> Result:
    """Generate a reply to ``prompt`` while tracking its perplexity live.

    Returns a :class:`Result` with every event; pass ``sinks`` to see events as
    they happen and ``policies`` (for example ``EarlyStop``) to act on them.

    >>> from livepp import generate, GenerationParams, EarlyStop
    >>> r = generate("What is 2+2?", params=GenerationParams(max_new_tokens=16))  # doctest: +SKIP
    >>> r.end.ppl  # doctest: +SKIP
    """
    params = params or GenerationParams()
    decoder = as_decoder(model)
    prompt_ids = decoder.encode(prompt, raw=params.raw)
    source = decoder.stream(prompt_ids, params)  # validates before any compute
    monitor = Monitor(
        policies=policies,
        sinks=sinks,
        tracker_factory=lambda: Tracker(window=window, ema_alpha=ema_alpha, confidence_window=confidence_window),
    )
    run_params: dict[str, Any] = params.to_dict() | {
        "window": window,
        "ema_alpha": ema_alpha,
        "confidence_window": confidence_window,
    }
    return monitor.run(source, model=decoder.loaded.name, prompt_token_ids=prompt_ids, params=run_params)


def greedy_token_scores(
    prompt: str,
    *,
    model: Decoder | LoadedModel | str | os.PathLike[str] | None = None,
    max_new_tokens: int = 256,
    raw: bool = False,
) -> "ScoreResult":
    """Generate greedily and return every generated token with its logprob.

    The LMDeploy recipe does this in two passes (generate, then score
    prompt+answer teacher-forced); the decoder already has the raw
    logprob of each token it picks, so one pass gives the same numbers.
    """
    from .scoring import ScoredToken, ScoreResult

    decoder = as_decoder(model)
    params = GenerationParams(max_new_tokens=max_new_tokens, raw=raw, top_logprobs=0, confidence_k=0)
    prompt_ids = decoder.encode(prompt, raw=raw)
    tokens = [
        ScoredToken(r.token_id, r.text, r.logprob, r.entropy if r.entropy is not None else float("nan"))
        for r in decoder.stream(prompt_ids, params)
    ]
    return ScoreResult(tokens=tokens, first_token_rule="generated tokens only, each conditioned on the prompt and the tokens before it")

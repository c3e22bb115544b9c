"""Teacher-forced scoring of given text on a local model: PPL of a text, of
a target given a prompt, and of long documents with sliding windows. Which
tokens are scored, and in which windows, is planned by
:mod:`livepp.scoring.plans` (its docstring gives the rules); here the plan's
numbers are computed. Unlike the Hugging Face guide's loop, only the logits
of the scored positions are computed (``logits_to_keep``), and several
windows can share one forward pass.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from livepp.core.params import LiveppError
from livepp.engines.torch.models import LoadedModel
from livepp.scoring.plans import (ScoredToken, ScorePlan, ScoreResult, Window, carries_target, lm_eval_windows, plan_ids, plan_lm_eval,
                                  plan_target, plan_text, plan_windows, prefix_token_id, target_prefix)

__all__ = ["lm_eval_windows", "ScoredToken", "ScoreResult", "Window", "plan_windows", "score_ids", "score_text", "score_target",
           "score_text_lm_eval", "score_plan", "text_ids", "target_prefix", "carries_target", "prefix_token_id"]


@torch.inference_mode()
def _score_windows(
    loaded: LoadedModel,
    ids: list[int],
    windows: Sequence[Window],
    *,
    batch_size: int,
    progress: Callable[[int], None] | None,
) -> dict[int, tuple[float, float]]:
    """{position: (logprob, entropy)} for every scored position of every window."""
    model = getattr(loaded, "model", None)
    out: dict[int, tuple[float, float]] = {}
    for start in range(0, len(windows), batch_size):
        batch = windows[start : start + batch_size]
        # A window's last token is predicted, never fed: nothing reads its logits.
        length = max(w.end - 1 - w.begin for w in batch)
        # Window-relative position p's logits predict token p+1, so a window
        # needs logits from score_from-1 to end-2. Keeping the last `keep`
        # positions of the padded batch covers every row's need.
        first_needed = min(w.score_from - 1 - w.begin for w in batch)
        keep = length - first_needed
        # Right padding needs no attention mask: under causal attention real
        # positions never see the pad tokens that come after them.
        rows = [ids[w.begin : w.end - 1] + [0] * (length - (w.end - 1 - w.begin)) for w in batch]
        if isinstance(loaded, LoadedModel):
            logits = model(input_ids=torch.tensor(rows, device=model.device), use_cache=False, logits_to_keep=keep).logits
        else:  # another engine's teacher-forced logits (llama.cpp): [rows, keep, V]
            logits = loaded.window_logits(rows, keep)
        for row, w in enumerate(batch):
            lo = (w.score_from - 1 - w.begin) - first_needed
            hi = (w.end - 1 - w.begin) - first_needed
            logprobs = torch.log_softmax(logits[row, lo:hi].float(), dim=-1)
            target = torch.tensor(ids[w.score_from : w.end], device=logprobs.device)
            chosen = logprobs.gather(1, target[:, None])[:, 0]
            p = logprobs.exp()
            entropy = -torch.where(p > 0, p * logprobs, 0.0).sum(-1)
            for pos, lp, ent in zip(range(w.score_from, w.end), chosen.tolist(), entropy.tolist()):
                out[pos] = (lp, ent)
        if progress is not None:
            progress(len(batch))
    return out


def score_plan(loaded: Any, plan: ScorePlan, *, batch_size: int = 1, progress: Callable[[int], None] | None = None,
               on_plan: Callable[[int], None] | None = None) -> ScoreResult:
    """The numbers of a plan, computed on ``loaded`` (a local model, or an engine with ``window_logits``)."""
    if batch_size < 1:
        raise LiveppError(f"batch_size must be >= 1, got {batch_size}")
    if on_plan is not None:
        on_plan(len(plan.windows))
    scored = _score_windows(loaded, plan.ids, plan.windows, batch_size=batch_size, progress=progress)
    return plan.result(scored, loaded.tokenizer.decode)


def _split(options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    run = {k: options.pop(k) for k in ("batch_size", "progress", "on_plan") if k in options}
    return options, run


def score_ids(loaded: Any, ids: list[int], *, score_from: int = 1, first_token_rule: str = "", **options: Any) -> ScoreResult:
    """Score positions ``score_from..len(ids)-1`` of ``ids`` teacher-forced (see :func:`livepp.scoring.plans.plan_ids`)."""
    planning, run = _split(options)
    if run.get("batch_size", 1) < 1:
        raise LiveppError(f"batch_size must be >= 1, got {run['batch_size']}")
    return score_plan(loaded, plan_ids(ids, loaded.context_length, score_from=score_from, first_token_rule=first_token_rule, **planning), **run)


def text_ids(loaded: Any, text: str) -> tuple[list[int], int, str]:
    """Ids to score a text by the default (hf) rule: (ids, first scored position, rule)."""
    plan = plan_text(loaded.tokenizer, loaded.context_length, text)
    return plan.ids, plan.score_from, plan.first_token_rule


def score_text(loaded: Any, text: str, **options: Any) -> ScoreResult:
    """PPL of a text (see :mod:`livepp.scoring.plans` for the first-token rule)."""
    planning, run = _split(options)
    return score_plan(loaded, plan_text(loaded.tokenizer, loaded.context_length, text, **planning), **run)


def score_target(loaded: Any, prompt: str, target: str, *, chat: bool = False, **options: Any) -> ScoreResult:
    """PPL of ``target`` given ``prompt``, the LightLLM recipe (:func:`livepp.scoring.plans.plan_target`)."""
    planning, run = _split(options)
    return score_plan(loaded, plan_target(loaded.tokenizer, loaded.context_length, prompt, target, chat=chat, **planning), **run)


def score_text_lm_eval(loaded: Any, text: str, *, max_length: int | None = None, prefix_token: str | int | None = None,
                       batch_size: int = 1, progress: Callable[[int], None] | None = None,
                       on_plan: Callable[[int], None] | None = None) -> ScoreResult:
    """PPL of a text by lm-evaluation-harness's ``loglikelihood_rolling``
    convention; ``max_length`` defaults to the context."""
    plan = plan_lm_eval(loaded.tokenizer, loaded.context_length, text, max_length=max_length, prefix_token=prefix_token)
    return score_plan(loaded, plan, batch_size=batch_size, progress=progress, on_plan=on_plan)

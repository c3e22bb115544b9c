"""For people who keep ``model.generate``: livepp policies as a StoppingCriteria.

Hugging Face hands stopping criteria the processed scores (after temperature,
top-k, ...), not the raw distribution that PPL is defined on. So the adapter
puts a forward hook on the model's output layer and reads the raw logits of
the position that produced the newest token; the token itself is the last
column of ``input_ids``. Each row of the batch has its own tracker and
policies::

    with LiveppStoppingCriteria(model, policies=lambda: [EarlyStop(20.0)]) as stop:
        model.generate(ids, stopping_criteria=StoppingCriteriaList([stop]), ...)
    stop.decisions  # [(row, token index, Decision)]
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
from transformers import StoppingCriteria

from .events import TokenEvent
from .policies import Decision, Policy, run_policies
from .tracker import Tracker

__all__ = ["LiveppStoppingCriteria"]


class LiveppStoppingCriteria(StoppingCriteria):
    def __init__(
        self,
        model: Any,
        *,
        policies: Callable[[], Sequence[Policy]],
        tracker_factory: Callable[[], Tracker] = Tracker,
        confidence_k: int = 20,
    ) -> None:
        self.model = model
        self.make_policies = policies
        self.tracker_factory = tracker_factory
        self.confidence_k = confidence_k
        self.decisions: list[tuple[int, int, Decision]] = []
        self.trackers: list[Tracker] = []
        self._policies: list[Sequence[Policy]] = []
        self._done: list[bool] = []
        self._logits: torch.Tensor | None = None
        self._handle: Any = None

    # The hook sees every forward pass: prefill and each decode step.
    def _capture(self, module: Any, args: Any, output: torch.Tensor) -> None:
        self._logits = output[:, -1].detach()  # [B, V] raw logits of the last position

    def __enter__(self) -> "LiveppStoppingCriteria":
        self._handle = self.model.get_output_embeddings().register_forward_hook(self._capture)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def __call__(self, input_ids: torch.LongTensor, scores: Any = None, **kwargs: Any) -> torch.BoolTensor:
        if self._logits is None:
            raise RuntimeError("LiveppStoppingCriteria must be used as a context manager around generate()")
        batch = input_ids.shape[0]
        if not self.trackers:
            self.trackers = [self.tracker_factory() for _ in range(batch)]
            self._policies = [list(self.make_policies()) for _ in range(batch)]
            self._done = [False] * batch
        logprobs = torch.log_softmax(self._logits.float(), dim=-1)
        chosen = input_ids[:, -1]
        lp = logprobs.gather(1, chosen[:, None])[:, 0]
        entropy = -torch.where(logprobs.exp() > 0, logprobs.exp() * logprobs, 0.0).sum(-1)
        conf = -torch.topk(logprobs, self.confidence_k, dim=-1).values.mean(-1)
        # One host sync for the whole batch.
        rows = torch.stack([chosen.to(lp.dtype), lp, entropy, conf], dim=1).tolist()
        stop = [False] * batch
        for row, (token_id, logprob, ent, c) in enumerate(rows):
            if self._done[row]:
                stop[row] = True
                continue
            tracker = self.trackers[row]
            tracker.update(logprob, entropy=ent, confidence=c)
            event = TokenEvent(
                index=tracker.n - 1, token_id=int(token_id), text="", logprob=logprob, entropy=ent, top_logprobs=(),
                mean_nll=tracker.mean_nll, ppl=tracker.ppl, window_ppl=tracker.window_ppl, ema_nll=tracker.ema_nll,
                confidence=c, group_confidence=tracker.group_confidence, surprise_z=tracker.surprise_z,
            )
            for decision in run_policies(self._policies[row], event, tracker):
                self.decisions.append((row, event.index, decision))
                if decision.action != "note":
                    stop[row] = self._done[row] = True
        return torch.tensor(stop, dtype=torch.bool, device=input_ids.device)

    @property
    def ppl(self) -> list[float]:
        return [t.ppl if t.n else math.nan for t in self.trackers]

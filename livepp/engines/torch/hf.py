"""For people who keep ``model.generate``: livepp policies as a StoppingCriteria.

Hugging Face hands stopping criteria the processed scores (after temperature,
top-k, ...), not the raw distribution that PPL is defined on. So the adapter
puts a forward hook on the model itself and reads the logits it returns for
the position that produced the newest token: the model's *final* logits, after
any model-level post-processing (Gemma-2's final logit softcapping, Cohere's
``logit_scale``, Granite's ``logits_scaling``), which a hook on the output
embedding layer would miss. The token itself is the last column of
``input_ids``. Each row of the batch has its own tracker and policies.

A new ``generate()`` call (the model sees a prefill at cache position 0)
starts fresh trackers and policies, so one adapter serves several calls. A
row stops being counted once it has produced an end-of-sequence token (the
model's ``generation_config.eos_token_id`` unless given) or a policy stopped
it: generate pads finished rows, and pads are not the model's tokens::

    with LiveppStoppingCriteria(model, policies=lambda: [EarlyStop(20.0)]) as stop:
        model.generate(ids, stopping_criteria=StoppingCriteriaList([stop]), ...)
    stop.decisions  # [(row, token index, Decision)] of the latest call
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Sequence

import torch
from transformers import StoppingCriteria

from livepp.core.events import TokenEvent
from livepp.core.policies import Decision, Policy, run_policies
from livepp.core.tracker import Tracker

__all__ = ["LiveppStoppingCriteria"]


def _eos_ids(model: Any, given: int | Iterable[int] | None) -> frozenset[int]:
    value = given if given is not None else getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if value is None:
        return frozenset()
    return frozenset([int(value)] if isinstance(value, int) else (int(v) for v in value))


class LiveppStoppingCriteria(StoppingCriteria):
    def __init__(
        self,
        model: Any,
        *,
        policies: Callable[[], Sequence[Policy]],
        tracker_factory: Callable[[], Tracker] = Tracker,
        confidence_k: int = 20,
        eos_token_id: int | Iterable[int] | None = None,
    ) -> None:
        self.model = model
        self.make_policies = policies
        self.tracker_factory = tracker_factory
        self.confidence_k = confidence_k
        self.eos_ids = _eos_ids(model, eos_token_id)
        self.decisions: list[tuple[int, int, Decision]] = []
        self.trackers: list[Tracker] = []
        self._policies: list[Sequence[Policy]] = []
        self._done: list[bool] = []
        self._logits: torch.Tensor | None = None
        self._new_call = True
        self._handle: Any = None

    # The hook sees every forward pass: prefill and each decode step.
    def _capture(self, module: Any, args: Any, kwargs: dict[str, Any], output: Any) -> None:
        logits = output.logits if hasattr(output, "logits") else output[0]
        self._logits = logits[:, -1].detach()  # [B, V] final logits of the last position
        position = kwargs.get("cache_position")
        if position is not None and position.numel() and int(position[0]) == 0:
            self._new_call = True  # a prefill: a new generate() call begins

    def __enter__(self) -> "LiveppStoppingCriteria":
        self._handle = self.model.register_forward_hook(self._capture, with_kwargs=True)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _start(self, batch: int) -> None:
        self.trackers = [self.tracker_factory() for _ in range(batch)]
        self._policies = [list(self.make_policies()) for _ in range(batch)]
        self._done = [False] * batch
        self.decisions = []
        self._new_call = False

    def __call__(self, input_ids: torch.LongTensor, scores: Any = None, **kwargs: Any) -> torch.BoolTensor:
        if self._logits is None:
            raise RuntimeError("LiveppStoppingCriteria must be used as a context manager around generate()")
        batch = input_ids.shape[0]
        if self._new_call or len(self.trackers) != batch:
            self._start(batch)
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
                stop[row] = True  # ended earlier: what generate appends now is padding
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
            if int(token_id) in self.eos_ids:
                self._done[row] = True  # counted, like the decoder counts its EOS; nothing after it is
        return torch.tensor(stop, dtype=torch.bool, device=input_ids.device)

    @property
    def ppl(self) -> list[float]:
        return [t.ppl if t.n else math.nan for t in self.trackers]

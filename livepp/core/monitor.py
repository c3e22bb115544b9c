"""The monitor joins a token source to the tracker, the policies and the sinks.

It is the only place where the pieces meet, and data moves one way: each
record from the source updates the tracker, becomes a :class:`TokenEvent`,
goes to every sink, and is then shown to the policies. A stop closes the
source at once (for the local decoder: no further forward pass; for a remote
stream: the upstream request is closed). The ``end`` event is always emitted,
also when the source raises, so a consumer never waits for it in vain.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Protocol, Sequence

from livepp.core.events import EndEvent, Event, PolicyEvent, StartEvent, TokenEvent, TokenRecord
from livepp.core.params import LiveppError
from livepp.core.policies import Policy, injects, run_policies
from livepp.core.steps import DEFAULT_STEP_REGEX, StepSegmenter
from livepp.core.stream import TokenStream
from livepp.core.tracker import Tracker

__all__ = ["Sink", "Monitor", "Session", "Result", "NO_INJECTION"]


# Why an inject policy cannot run on a stream without ``inject``.
NO_INJECTION = ("an inject policy needs an engine that can append text to a running generation: a local engine (torch or "
                "llama.cpp, any path); a remote engine's API cannot (a continuation request would close the generation and "
                "resend the whole text so far, prefilled again upstream at every injection, and needs a raw completions "
                "prompt with the chat template applied, which livepp does not have for a remote model)")


class Sink(Protocol):
    def emit(self, event: Event) -> None: ...


class Result:
    """What a monitored generation produced, for API users."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.token_ids: list[int] = []
        self.end: EndEvent | None = None

    @property
    def text(self) -> str:
        return self.end.text if self.end else ""

    @property
    def tokens(self) -> list[TokenEvent]:
        return [e for e in self.events if isinstance(e, TokenEvent)]


class Session:
    """One monitored generation, fed a record at a time.

    :meth:`Monitor.run` drives one from an iterator; a batched decoder drives
    one per row, pushing each row's record as its step completes. ``push``
    counts the token, emits its event and the policies' decisions, and returns
    True when a policy asks to stop (or route); ``end`` emits the end event
    once, and is safe to call again.
    """

    def __init__(self, monitor: "Monitor", *, model: str, prompt_token_ids: Sequence[int], params: dict[str, Any] | None,
                 policies: Sequence[Policy] | None = None, engine: str | None = None) -> None:
        self.monitor = monitor
        self.policies = list(monitor.policies if policies is None else policies)
        self.result = Result()
        self.tracker = monitor.tracker_factory()
        for policy in self.policies:
            policy.reset()
        self._pieces: list[str] = []
        # Reasoning steps, when asked for or when a policy judges steps.
        regex = monitor.steps
        if regex is None and any(callable(getattr(pol, "check_step", None)) for pol in self.policies):
            regex = DEFAULT_STEP_REGEX
        self.segmenter = StepSegmenter(regex) if regex is not None else None
        self._started = time.perf_counter()
        self._first_token_at: float | None = None
        self.stopped_by_policy = False
        self.injections: list[str] = []  # texts inject policies asked for, not yet handed to the engine
        self._emit(StartEvent(model, tuple(prompt_token_ids), dict(params or {}), engine=engine))

    def _emit(self, event: Event) -> None:
        self.monitor._emit(event, self.result)

    def push(self, record: TokenRecord) -> bool:
        if self._first_token_at is None:
            self._first_token_at = time.perf_counter()
        tracker = self.tracker
        if record.injected:
            # Shown where it stands in the text, counted nowhere: it carries the
            # index the next generated token will have, and no policy sees it.
            self._pieces.append(record.text)
            self._emit(dataclasses.replace(Monitor._token_event(tracker.n, record, tracker), injected=True))
            return False
        index = tracker.n
        tracker.update(record.logprob, entropy=record.entropy, confidence=record.confidence)
        self._pieces.append(record.text)
        self.result.token_ids.append(record.token_id)
        event = Monitor._token_event(index, record, tracker)
        self._emit(event)
        for decision in run_policies(self.policies, event, tracker):
            self._emit(PolicyEvent(decision.policy, decision.action, index, decision.reason))
            if decision.action == "inject":
                self.injections.append(decision.text or "")
            elif decision.action != "note":
                self.stopped_by_policy = True
        if self.segmenter is not None:
            for step in self.segmenter.add(index, record.text, record.logprob, record.entropy, record.confidence):
                self._emit(step)
                for policy in self.policies:
                    check_step = getattr(policy, "check_step", None)
                    decision = check_step(step, tracker) if check_step is not None else None
                    if decision is not None and decision.action != "continue":
                        self._emit(PolicyEvent(decision.policy, decision.action, index, decision.reason))
                        if decision.action != "note":
                            self.stopped_by_policy = True
        return self.stopped_by_policy

    def end(self, reason: str, *, tokens_after_stop: int | None = None, engine_finish_reason: str | None = None) -> Result:
        if self.result.end is not None:
            return self.result
        if self.segmenter is not None:
            last = self.segmenter.finish()  # the last step ends with the generation
            if last is not None:
                self._emit(last)
        ended = time.perf_counter()
        first = self._first_token_at if self._first_token_at is not None else ended
        decode_s = ended - first
        n = self.tracker.n
        end = EndEvent(
            reason=reason,  # type: ignore[arg-type]
            n_tokens=n,
            text="".join(self._pieces),
            mean_nll=self.tracker.mean_nll if n else float("nan"),
            ppl=self.tracker.ppl if n else float("nan"),
            prefill_s=first - self._started,
            decode_s=decode_s,
            # Decode-phase rate: tokens after the first over the time after it.
            tokens_per_s=(n - 1) / decode_s if n > 1 and decode_s > 0 else 0.0,
            tokens_after_stop=tokens_after_stop,
            engine_finish_reason=engine_finish_reason,
        )
        self.result.end = end
        self._emit(end)
        return self.result


class Monitor:
    """Runs one generation through the tracker and policies, emitting events.

    ``tracker_factory`` builds a fresh tracker per run (window sizes etc.);
    policies are reset at the start of each run.
    """

    def __init__(
        self,
        *,
        policies: Sequence[Policy] = (),
        sinks: Sequence[Sink] = (),
        tracker_factory: Callable[[], Tracker] = Tracker,
        keep_events: bool = True,
        steps: str | None = None,
    ) -> None:
        """``steps``: a step regex (``DEFAULT_STEP_REGEX`` for the default
        rule) to emit a ``step`` event as each reasoning step ends; steps are
        also cut, by the default rule, whenever a policy judges steps."""
        self.policies = list(policies)
        self.steps = steps
        self.sinks = list(sinks)
        self.tracker_factory = tracker_factory
        self.keep_events = keep_events

    def _emit(self, event: Event, result: Result) -> None:
        if self.keep_events:
            result.events.append(event)
        for sink in self.sinks:
            sink.emit(event)

    def session(self, *, model: str = "", prompt_token_ids: Sequence[int] = (), params: dict[str, Any] | None = None,
                policies: Sequence[Policy] | None = None, engine: str | None = None) -> Session:
        """Start a push-style run (see :class:`Session`); ``policies``
        overrides the monitor's own, e.g. one fresh set per batch row."""
        return Session(self, model=model, prompt_token_ids=prompt_token_ids, params=params, policies=policies, engine=engine)

    def run(
        self,
        stream: TokenStream,
        *,
        model: str = "",
        prompt_token_ids: Sequence[int] | None = None,
        params: dict[str, Any] | None = None,
        engine: str | None = None,
    ) -> Result:
        """Run ``stream`` (a :class:`~livepp.core.stream.TokenStream`; wrap a
        plain iterable of records in a ``RecordStream``) to its end or a
        policy stop. The end reason is the policy's stop, else the stream's
        ``finish_reason`` (a record's, a remote stream's last chunk, a
        cancelled server job), else "length". ``prompt_token_ids`` defaults
        to the stream's own."""
        ids = stream.prompt_token_ids if prompt_token_ids is None else prompt_token_ids
        inject = getattr(stream, "inject", None)
        if injects(self.policies) and inject is None:
            raise LiveppError(NO_INJECTION)
        session = self.session(model=model, prompt_token_ids=ids, params=params, engine=engine)
        reason = "length"
        try:
            for record in stream:
                if session.push(record):
                    reason = "policy"
                    break
                if record.finish_reason is not None:
                    reason = record.finish_reason
                    break
                while session.injections:
                    inject(session.injections.pop(0))  # type: ignore[misc]
            else:
                reason = stream.finish_reason or reason
        except KeyboardInterrupt:
            reason = "shutdown"
            raise
        except BaseException:
            reason = "error"
            raise
        finally:
            # Closing the stream tells the engine to stop computing now.
            stream.close()
            session.end(reason, tokens_after_stop=stream.tokens_after_stop, engine_finish_reason=stream.engine_finish_reason)
        return session.result

    @staticmethod
    def _token_event(index: int, record: TokenRecord, tracker: Tracker) -> TokenEvent:
        return TokenEvent(
            index=index,
            token_id=record.token_id,
            text=record.text,
            logprob=record.logprob,
            entropy=record.entropy,
            top_logprobs=record.top_logprobs,
            mean_nll=tracker.mean_nll,
            ppl=tracker.ppl,
            window_ppl=tracker.window_ppl,
            ema_nll=tracker.ema_nll,
            confidence=record.confidence,
            group_confidence=tracker.group_confidence,
            surprise_z=tracker.surprise_z,
            varentropy=record.varentropy,
            entropy_bounds=record.entropy_bounds,
            tail_mass=record.tail_mass,
        )

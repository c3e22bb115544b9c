"""Monitoring a batch: every row of a :class:`BatchTokenStream` runs through
its own monitor session (its own tracker and policies), exactly as a single
stream would, whatever engine decodes the batch."""

from __future__ import annotations

from typing import Any, Callable, Iterator, Sequence

from livepp.core.monitor import NO_INJECTION, Monitor, Session
from livepp.core.params import GenerationParams, LiveppError
from livepp.core.policies import Policy, injects
from livepp.core.stream import BatchTokenStream
from livepp.core.tracker import Tracker

__all__ = ["MonitoredBatch", "sample_emitter"]


class MonitoredBatch:
    """A batch whose every row runs through its own monitor session: its own
    tracker and policies, exactly as a single stream would. Iterate it for
    ``(sample, event)`` as they happen; a policy stop takes that row out of
    the batch at once; closing the iterator cancels the rows still running.
    ``sessions[i].tracker`` stays readable afterwards (e.g. DeepConf scores).
    """

    def __init__(self, stream: BatchTokenStream, params: Sequence[GenerationParams], *, model: str, engine: str | None = None,
                 policies: Callable[[int], Sequence[Policy]], tracker_factory: Callable[[], Tracker] = Tracker,
                 run_params: dict[str, Any] | None = None, sample_offset: int = 0, steps: str | None = None) -> None:
        self._events: list[tuple[int, Any]] = []
        self.stream = stream
        self.sessions: list[Session] = []
        for i, (p, ids) in enumerate(zip(params, stream.prompt_token_ids)):
            monitor = Monitor(sinks=[_Collect(self._events, i)], keep_events=False, tracker_factory=tracker_factory, steps=steps)
            row_params = p.to_dict() | dict(run_params or {}) | {"sample": sample_offset + i}
            row_policies = list(policies(i))
            if injects(row_policies) and getattr(stream, "inject", None) is None:
                raise LiveppError(NO_INJECTION)
            self.sessions.append(monitor.session(model=model, prompt_token_ids=ids, params=row_params, policies=row_policies,
                                                 engine=engine))

    def __iter__(self) -> Iterator[tuple[int, Any]]:
        sessions, stream = self.sessions, self.stream
        unfinished = "cancelled"  # how rows still running end if we leave early
        try:
            yield from self._drain()
            running = set(range(len(sessions)))
            for i, record in stream:
                if sessions[i].push(record):
                    stream.stop(i)
                    sessions[i].end("policy")
                    running.discard(i)
                elif record.finish_reason is not None:
                    sessions[i].end(record.finish_reason)
                    running.discard(i)
                else:
                    while sessions[i].injections:  # appended to this row only, fed at its next step
                        stream.inject(i, sessions[i].injections.pop(0))  # type: ignore[attr-defined]
                # A row can end without a last record that says so (a remote
                # stream's finish arrives after its last token): the batch
                # stream's finish_reasons tell.
                for k in [k for k in running if k != i and stream.finish_reasons[k] is not None]:
                    sessions[k].end(stream.finish_reasons[k] or "length")
                    running.discard(k)
                yield from self._drain()
            for k in sorted(running):
                sessions[k].end(stream.finish_reasons[k] or "length")
            yield from self._drain()
        except GeneratorExit:
            raise  # closed by the consumer: the running rows are cancelled
        except BaseException:
            unfinished = "error"
            raise
        finally:
            stream.close()
            for s in sessions:
                s.end(unfinished)  # no-op for rows that already ended

    def _drain(self) -> Iterator[tuple[int, Any]]:
        for item in self._events:
            yield item
        self._events.clear()


class _Collect:
    def __init__(self, events: list[tuple[int, Any]], sample: int) -> None:
        self.events, self.sample = events, sample

    def emit(self, event: Any) -> None:
        self.events.append((self.sample, event))


def sample_emitter(sink: Any) -> Callable[[int, Any], None]:
    """How to hand a sample's event to ``sink``: its ``emit_sample(sample,
    event)`` when it has one (it wants to know which sample), else ``emit``."""
    emit_sample = getattr(sink, "emit_sample", None)
    return emit_sample if emit_sample is not None else (lambda _sample, event: sink.emit(event))

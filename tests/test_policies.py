"""EarlyStop and the monitor, on a scripted source (fast, no model)."""

from __future__ import annotations

import math

import pytest

from livepp.core.stream import RecordStream
from livepp import EarlyStop, Monitor, Tracker
from livepp.core.events import EndEvent, PolicyEvent, StartEvent, TokenEvent
from livepp.core.policies import Decision, run_policies


def first_index_where(logprobs, window, threshold, min_tokens, patience):
    """Oracle: recompute window PPL from scratch at every index."""
    streak = 0
    for i in range(len(logprobs)):
        if i + 1 < min_tokens:
            continue
        last = [-x for x in logprobs[max(0, i + 1 - window) : i + 1]]
        if math.exp(sum(last) / len(last)) > threshold:
            streak += 1
        else:
            streak = 0
        if streak >= patience:
            return i
    return None


@pytest.mark.parametrize("min_tokens,patience", [(1, 1), (5, 1), (3, 3), (12, 2)])
def test_early_stop_fires_at_first_qualifying_token_and_source_stops(fake_source, min_tokens, patience):
    logprobs = [-0.1] * 6 + [-4.0] * 3 + [-0.2] * 2 + [-5.0] * 10
    expected = first_index_where(logprobs, 4, 8.0, min_tokens, patience)
    assert expected is not None
    src = fake_source(logprobs)
    monitor = Monitor(
        policies=[EarlyStop(8.0, metric="window_ppl", min_tokens=min_tokens, patience=patience)],
        tracker_factory=lambda: Tracker(window=4),
    )
    result = monitor.run(src)
    tokens = result.tokens
    assert tokens[-1].index == expected
    policy_events = [e for e in result.events if isinstance(e, PolicyEvent)]
    assert [(p.action, p.index) for p in policy_events] == [("stop", expected)]
    assert result.end.reason == "policy"
    assert result.end.n_tokens == expected + 1
    # The source produced exactly the tokens the monitor consumed, then was closed.
    assert src.produced == expected + 1
    assert src.closed


def test_cumulative_ppl_metric_and_no_stop(fake_source):
    src = fake_source([-0.5] * 20, finish_reason="eos")
    result = Monitor(policies=[EarlyStop(2.0, metric="ppl")]).run(src)
    assert result.end.reason == "eos"
    assert result.end.n_tokens == 20
    assert result.end.ppl == pytest.approx(math.exp(0.5))
    assert result.end.text == "".join(f"t{i} " for i in range(20))


def test_event_order_is_start_tokens_end(fake_source):
    result = Monitor().run(fake_source([-1.0, -2.0]), model="m", prompt_token_ids=[1, 2], params={"a": 1})
    kinds = [type(e) for e in result.events]
    assert kinds == [StartEvent, TokenEvent, TokenEvent, EndEvent]
    assert result.events[0].prompt_token_ids == (1, 2)


def test_end_event_is_emitted_when_source_fails():
    def broken():
        from livepp.core.events import TokenRecord

        yield TokenRecord(token_id=1, text="a", logprob=-1.0)
        raise RuntimeError("upstream died")

    seen = []

    class Sink:
        def emit(self, e):
            seen.append(e)

    with pytest.raises(RuntimeError):
        Monitor(sinks=[Sink()]).run(RecordStream(broken()))
    assert isinstance(seen[-1], EndEvent)
    assert seen[-1].reason == "error"
    assert seen[-1].n_tokens == 1 and seen[-1].text == "a"


class Note:
    name = "Note"

    def reset(self):
        pass

    def check(self, event, tracker):
        return Decision("note", self.name, "noted")


def test_notes_do_not_block_a_later_stop(fake_source):
    decisions = run_policies([Note(), EarlyStop(1.5, metric="ppl"), Note()], None, _tracker_with(-2.0))
    assert [d.action for d in decisions] == ["note", "stop"]


def _tracker_with(lp):
    t = Tracker()
    t.update(lp)
    return t


@pytest.mark.parametrize(
    "kwargs",
    [dict(threshold=0.5), dict(threshold=math.inf), dict(threshold=5, metric="nope"),
     dict(threshold=5, min_tokens=0), dict(threshold=5, patience=0)],
)
def test_early_stop_rejects_bad_settings(kwargs):
    with pytest.raises(ValueError):
        EarlyStop(**kwargs)

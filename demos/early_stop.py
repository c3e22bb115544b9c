"""Early-stop threshold sweep on recorded, labelled traces: tokens saved
against answers lost. No regeneration: every row is a replay.

    python demos/early_stop.py [TRACES.jsonl]

Default traces: demos/out/long_traces.jsonl, the labelled step-by-step answers
that demos/car_routing.py records. Any `livepp generate --json` output with
"correct" labels works. A stopped trace gives no answer, so a correct trace
that is stopped is an answer lost; a wrong trace that is stopped is tokens
saved at no cost.
"""

from __future__ import annotations

import sys
from pathlib import Path

from livepp.core.policies import ConfidenceStop, EarlyStop
from livepp.core.replay import read_traces, replay
from livepp.core.tracker import Tracker

DEFAULT = Path(__file__).parent / "out" / "long_traces.jsonl"


def main() -> None:
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT
    if not path.is_file():
        sys.exit(f"{path} not found: run demos/car_routing.py first, or pass a traces file")
    traces = read_traces(path)
    labelled = [t for t in traces if t.correct is not None]
    n_ok = sum(bool(t.correct) for t in labelled)
    print(f"{len(traces)} traces, {sum(len(t.records) for t in traces)} tokens, {len(labelled)} labelled ({n_ok} correct)\n")
    # DeepConf thresholds come from warm-up traces: here the first half of
    # the traces is the warm-up set and every row is scored on all of them.
    lows = [lowest_group_confidence(t) for t in traces[: len(traces) // 2]]
    sweeps = [(f"EarlyStop(window_ppl > {x:g}, min 16, patience 2)", lambda x=x: EarlyStop(x, metric="window_ppl", min_tokens=16, patience=2))
              for x in (1.6, 1.8, 2.0, 2.2, 2.5, 3.0)]
    sweeps += [(f"EarlyStop(ppl > {x:g}, min 16)", lambda x=x: EarlyStop(x, metric="ppl", min_tokens=16)) for x in (1.6, 1.8, 2.0, 2.5)]
    for keep in (95, 90, 75, 50):
        stop = ConfidenceStop.from_warmup(lows, keep_percent=keep)
        sweeps.append((f"ConfidenceStop(keep {keep}%: conf < {stop.threshold:.3f})", lambda t=stop.threshold: ConfidenceStop(t)))
    print(f"{'policy':<52} {'fired':>7} {'tokens saved':>14} {'correct lost':>13} {'wrong stopped':>14}")
    for name, make in sweeps:
        r = replay(traces, name, make)
        lost = r.correct_total - r.correct_kept
        print(f"{name:<52} {r.fired:>3}/{r.traces:<3} {r.tokens_saved:>6} ({100 * r.tokens_saved / r.tokens_total:4.1f}%) "
              f"{lost:>6}/{r.correct_total:<6} {r.incorrect_stopped:>7}/{r.incorrect_total:<6}")


def lowest_group_confidence(trace) -> float:
    tracker = Tracker()
    for r in trace.records:
        tracker.update(r.logprob, entropy=r.entropy, confidence=r.confidence)
    return tracker.lowest_group_confidence


if __name__ == "__main__":
    main()

"""CAR routing on the embedded model: calibrate on one split, evaluate on another.

    python demos/car_routing.py [--tasks sums,capitals] [--limit 40] [--long-tokens 96] [--vote] [--engine torch|llama.cpp]

For each task: calibrate on its ``calib`` half (5-fold held-out figures with
everything fitted inside the folds: PPL or log PPL, the Gaussians, the
temperature (nested), and the shortest prefix worth routing early on, chosen
out of fold and judged nested), then on the disjoint ``eval`` half compare
short answers only, long (step-by-step) answers only, CAR (short, routed to
long when P(correct | PPL) < 0.5) and CAR --early (routed during the short
answer by the prefix calibrations, from the calibration's early_min_tokens;
off when the calibration found no safe start). Prints accuracy, generated
tokens, short-stage tokens and the fraction routed for each, the AUROC and
ECE (before and after temperature scaling) on the eval half, and whether
routing early lost more than 2 points of accuracy to routing at the end.
With --vote, also CAR with a 5-sample majority vote as the long route.

Work is shared where the result is the same by construction: greedy long
answers are deterministic, so CAR reuses the long-only answer of each routed
question, and CAR --early replays each recorded short trace through the
live router (replay stops at the same token as live decoding; tested).
Long traces are saved, labelled, to demos/out/long_traces.jsonl for
demos/early_stop.py.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from livepp.core.stream import RecordStream
from livepp.car.calibrate import calibrate, label_short_answers
from livepp.car.calibration import auroc, expected_calibration_error
from livepp.core.events import TokenRecord, to_json_dict
from livepp.core.monitor import Monitor
from livepp.core.policies import CARRouter
from livepp.car.routing import SHORT_PROMPT, StepByStep, Vote, short_answer
from livepp.car.tasks import answer_matches, builtin_split

OUT = Path(__file__).parent / "out"


class Recorder:
    def __init__(self) -> None:
        self.events = []

    def emit(self, event) -> None:
        self.events.append(event)


def early_route_tokens(short_result, router: CARRouter) -> int | None:
    """Replay a short answer through the early router: tokens spent before it routes, or None."""
    records = [TokenRecord(e.token_id, e.text, e.logprob, e.entropy, e.top_logprobs, e.confidence) for e in short_result.tokens]
    result = Monitor(policies=[router]).run(RecordStream(records))
    return result.end.n_tokens if result.end.reason == "policy" else None


def describe(cal) -> str:
    """The calibration's held-out figures, every one of them fitted inside the folds."""
    if not cal.cv_folds:
        return "too few of a class for 5-fold cross-validation: no held-out figures, no temperature, no early routing"
    temps = ", ".join(f"{t:.2f}" for t in cal.cv_fold_temperatures)
    lines = [f"held-out (5-fold, nested): AUROC {cal.cv_auroc:.3f} · ECE {cal.cv_ece:.3f} → {cal.cv_ece_scaled:.3f} · "
             f"Brier {cal.cv_brier:.3f} → {cal.cv_brier_scaled:.3f} · NLL {cal.cv_nll:.3f} → {cal.cv_nll_scaled:.3f} scaled "
             f"(T per fold {temps}; spaces {', '.join(cal.cv_fold_spaces)}); shipped T = {cal.temperature:.2f}"]
    e = cal.cv_early
    if e is None:
        lines.append("early routing: off (too few of a class to choose its start)")
    else:
        start = f"from token {cal.early_min_tokens}" if cal.early_min_tokens is not None else "off (no start keeps correct answers)"
        lines.append(f"early routing {start}; nested held-out: starts per fold {e['fold_min_tokens']}, adds routes of correct answers "
                     f"{100 * e['extra_correct_routed']:.1f}%, of wrong ones {100 * e['extra_wrong_routed']:.1f}%, "
                     f"saves {100 * e['short_tokens_saved']:.1f}% of short-answer tokens")
    return "\n  ".join(lines)


def run_task(engine, task: str, limit: int, long_tokens: int, vote: bool, traces_out) -> None:
    calib_qs = builtin_split(task, "calib")[:limit]
    eval_qs = builtin_split(task, "eval")[:limit]
    print(f"\n=== {task}: calibrate on {len(calib_qs)} questions, evaluate on {len(eval_qs)} others ===", flush=True)
    cal = calibrate(label_short_answers(engine, calib_qs), model=engine.name)
    print(f"calibration: {cal.n_correct} correct / {cal.n_incorrect} incorrect, fitted on {cal.space}\n  {describe(cal)}", flush=True)
    unscaled = replace(cal, temperature=1.0)

    long_route = StepByStep(engine, max_new_tokens=long_tokens)
    # accuracy, tokens, short-stage tokens, routed
    rows = {name: [0, 0, 0, 0] for name in ("short only", "long only", "CAR", "CAR --early")}
    if vote:
        rows["CAR, vote long route"] = [0, 0, 0, 0]
        voter = Vote(engine, n=5)
    short_ppl, short_wrong, routed = [], [], 0
    for i, q in enumerate(eval_qs):
        short = short_answer(engine, q.question)
        s_ok = answer_matches(short.text, q.answers)
        s_tok = short.end.n_tokens
        rec = Recorder()
        long = long_route.run(q.question, [rec])
        l_ok = answer_matches(long.text, q.answers)
        for e in rec.events:
            row = to_json_dict(e) | ({"correct": l_ok} if e.type in ("start", "end") else {})
            traces_out.write(json.dumps(row, ensure_ascii=False) + "\n")
        route = cal.should_route(short.end.ppl)
        routed += route
        early_at = early_route_tokens(short, CARRouter(cal, early=True))
        short_ppl.append(short.end.ppl)
        short_wrong.append(not s_ok)
        early_routed = bool(early_at or route)
        for name, ok, tokens, short_tokens, went_long in (
            ("short only", s_ok, s_tok, s_tok, False),
            ("long only", l_ok, long.n_tokens, 0, True),
            ("CAR", l_ok if route else s_ok, s_tok + (long.n_tokens if route else 0), s_tok, route),
            ("CAR --early", l_ok if early_routed else s_ok,
             (early_at or s_tok) + (long.n_tokens if early_routed else 0), early_at or s_tok, early_routed),
        ):
            for j, v in enumerate((ok, tokens, short_tokens, went_long)):
                rows[name][j] += v
        if vote:
            v = voter.run(q.question, []) if route else None
            for j, x in enumerate((answer_matches(v.text, q.answers) if v else s_ok, s_tok + (v.n_tokens if v else 0), s_tok, route)):
                rows["CAR, vote long route"][j] += x
        print(f"  [{i + 1}/{len(eval_qs)}] short {'✓' if s_ok else '✗'} PPL {short.end.ppl:.3f} "
              f"P(correct) {cal.posterior_correct(short.end.ppl):.2f} → {'long' if route else 'short'}; long {'✓' if l_ok else '✗'}", flush=True)

    n = len(eval_qs)
    print(f"\n{task}: {n} eval questions, CAR routed {routed} ({100 * routed / n:.0f}%)")
    print(f"  {'strategy':<22} {'accuracy':>9} {'tokens':>8} {'short-stage tokens':>19} {'routed':>7}")
    for name, (ok, tokens, short_tokens, went_long) in rows.items():
        print(f"  {name:<22} {ok:>4}/{n:<4} {tokens:>8} {short_tokens:>19} {100 * went_long / n:>6.0f}%")
    right = [not w for w in short_wrong]
    ece_raw = expected_calibration_error([unscaled.posterior_correct(p) for p in short_ppl], right)
    ece_scaled = expected_calibration_error([cal.posterior_correct(p) for p in short_ppl], right)
    print(f"  eval half: AUROC of short-answer PPL as a predictor of error {auroc(short_ppl, short_wrong):.3f}; "
          f"ECE {ece_raw:.3f} before temperature scaling, {ece_scaled:.3f} after (T = {cal.temperature:.2f})", flush=True)
    lost = 100 * (rows["CAR"][0] - rows["CAR --early"][0]) / n
    verdict = "within" if lost <= 2 else "MORE than"
    print(f"  routing early against routing at the end: {lost:+.1f} points of accuracy lost ({verdict} the 2-point bound)"
          + ("; early routing is off for this task" if cal.early_min_tokens is None else ""), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", default="sums,capitals")
    ap.add_argument("--limit", type=int, default=40)
    ap.add_argument("--long-tokens", type=int, default=96)
    ap.add_argument("--vote", action="store_true")
    ap.add_argument("--engine", choices=["torch", "llama.cpp"], default="torch")
    args = ap.parse_args()
    if args.engine == "llama.cpp":
        from livepp.engines.llamacpp import LlamaCppEngine

        engine = LlamaCppEngine()
    else:
        from livepp import Decoder, load_model
        from livepp.engines.select import as_engine

        engine = as_engine(Decoder(load_model()))
    OUT.mkdir(exist_ok=True)
    print(f"short prompt: {SHORT_PROMPT!r}; long route: step-by-step, at most {args.long_tokens} tokens; greedy; engine {args.engine}")
    with (OUT / "long_traces.jsonl").open("w", encoding="utf-8") as traces_out:
        for task in args.tasks.split(","):
            run_task(engine, task.strip(), args.limit, args.long_tokens, args.vote, traces_out)


if __name__ == "__main__":
    main()

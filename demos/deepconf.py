"""DeepConf on built-in tasks with the embedded model, with `livepp think`'s
default settings: greedy, plain majority, DeepConf offline and online, with
tokens, traces stopped online and accuracy with bootstrap intervals.

    python demos/deepconf.py [--tasks sums,products] [--limit 12] [--engine torch|llama.cpp]
                             [--traces 16] [--warmup 4] [--eta 90] [--group G] [--tokens 256]

The defaults are those of ``livepp think`` (16 traces, 4 warm-up, η 90, a
group window of 1/16 of the budget, 256 tokens, temperature 0.7, top-p 0.95,
its step-by-step prompt). For each question of a task's eval half: one greedy
answer with the same prompt; then the traces (seeds 0..N-1) offline (every
trace to its end) and online (warm-up, then early stops). From the offline
run: plain majority over every trace, and plain majority at online's budget
(the first traces, in seed order, whose tokens fit in what online spent on
that question). Online's traces are prefixes of offline's (same seeds), so
online is also recomputed from the offline traces (livepp.car.deepconf_sweep)
and must agree: a check printed, not assumed. Accuracy intervals: 95 %
percentile bootstrap over questions (2000 resamples).

The offline traces are saved as a labelled recording for
``livepp think --sweep-eta 10..90:10 --recorded demos/out/deepconf-TASK.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

from livepp.car.answers import extract_answer
from livepp.car.deepconf import default_group, think
from livepp.car.deepconf_sweep import RecordedRun, RecordedTrace, simulate
from livepp.car.tasks import answer_matches, builtin_split
from livepp.core.events import TokenRecord, dumps, to_json_dict
from livepp.core.monitor import Monitor
from livepp.core.params import GenerationParams
from livepp.engines.select import as_engine

OUT = Path(__file__).parent / "out"
PROMPT = "{question}\nThink step by step, then give the final answer on the last line."  # livepp think's default


class Recorder:
    """Every trace's events: kept for the recording and the check."""

    def __init__(self) -> None:
        self.events: dict[int, list] = {}

    def emit_sample(self, sample: int, event) -> None:
        self.events.setdefault(sample, []).append(event)


def bootstrap(hits: list[bool], *, resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    rng, n = random.Random(seed), len(hits)
    means = sorted(sum(hits[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples))
    return means[int(0.025 * resamples)], means[int(0.975 * resamples) - 1]


def majority_within(outcomes, budget: int) -> str | None:
    """Plain majority over the first traces (seed order) whose tokens fit in ``budget``."""
    counts: dict[str, int] = {}
    spent = 0
    for o in outcomes:
        spent += o.n_tokens
        if spent > budget:
            break
        if o.answer is not None:
            counts[o.answer] = counts.get(o.answer, 0) + 1
    return max(counts, key=lambda a: counts[a]) if counts else None


def run_task(engine, task: str, args, params: GenerationParams, group: int) -> dict:
    questions = builtin_split(task, "eval")[: args.limit]
    hits = {k: [] for k in ("greedy", "majority", "majority at online's budget", "deepconf offline", "deepconf online")}
    tokens = {"greedy": 0, "offline": 0, "online": 0}
    seconds = {"offline": 0.0, "online": 0.0}
    stopped = excluded = online_traces = disagreements = 0
    OUT.mkdir(exist_ok=True)
    recording = (OUT / f"deepconf-{task}.jsonl").open("w", encoding="utf-8")
    for i, q in enumerate(questions):
        greedy = Monitor().run(engine.open(PROMPT.format(question=q.question), GenerationParams(max_new_tokens=params.max_new_tokens)))
        tokens["greedy"] += greedy.end.n_tokens
        hits["greedy"].append(answer_matches(extract_answer(greedy.text) or "", q.answers))
        runs, recorder = {}, Recorder()
        for mode in ("offline", "online"):
            t = time.perf_counter()
            runs[mode] = think(q.question, engine=engine, traces=args.traces, warmup=args.warmup, eta=args.eta, group=group, mode=mode,
                               params=params, prompt=PROMPT, sinks=[recorder] if mode == "offline" else [])
            seconds[mode] += time.perf_counter() - t
            tokens[mode] += runs[mode].tokens
        off, on = runs["offline"], runs["online"]
        def right(answer: str | None, accepted: tuple[str, ...] = q.answers) -> bool:
            return answer is not None and answer_matches(answer, accepted)

        hits["majority"].append(right(off.majority))
        hits["majority at online's budget"].append(right(majority_within(off.traces, on.tokens)))
        hits["deepconf offline"].append(right(off.answer))
        hits["deepconf online"].append(right(on.answer))
        stopped += len(on.samples("stopped"))
        excluded += len(on.samples("excluded"))
        online_traces += len(on.traces) - args.warmup
        # The recording, and online recomputed from it.
        for sample in sorted(recorder.events):
            for e in recorder.events[sample]:
                recording.write(dumps(to_json_dict(e) | {"sample": sample}) + "\n")
        recording.write(dumps(off.vote_dict() | {"answers": list(q.answers)}) + "\n")
        traces = [RecordedTrace(s, [TokenRecord(e.token_id, e.text, e.logprob, confidence=e.confidence) for e in evs if e.type == "token"],
                                evs[-1].text, evs[-1].reason) for s, evs in sorted(recorder.events.items())]
        again = simulate(RecordedRun(traces, group), mode="online", eta=args.eta, warmup=args.warmup)
        disagreements += (again.answer, again.tokens, again.kept) != (on.answer, on.tokens, on.kept)
        print(f"[{i + 1}/{len(questions)}] {q.question} → greedy {extract_answer(greedy.text)!r}, majority {off.majority!r}, "
              f"offline {off.answer!r}, online {on.answer!r} (tokens online {on.tokens} / offline {off.tokens}; "
              f"stopped {len(on.samples('stopped'))}, excluded {len(on.samples('excluded'))})", flush=True)
    recording.close()
    n = len(questions)
    print(f"\n{task}: {n} questions · {args.traces} traces each (online: {args.warmup} warm-up) · eta {args.eta:g} · group {group} · "
          f"at most {params.max_new_tokens} tokens per trace · temperature {params.temperature:g}, top-p {params.top_p:g} · engine {args.engine}")
    for name, h in hits.items():
        lo, hi = bootstrap(h)
        print(f"  {name:<29} {sum(h):>3}/{n}  {100 * sum(h) / n:5.1f}%  [95% CI {100 * lo:5.1f}, {100 * hi:5.1f}]")
    diff = [int(a) - int(b) for a, b in zip(hits["deepconf online"], hits["majority"])]
    rng = random.Random(1)
    boots = sorted(sum(diff[rng.randrange(n)] for _ in range(n)) / n for _ in range(2000))
    print(f"  online − majority: {100 * sum(diff) / n:+.1f} points [95% CI {100 * boots[50]:+.1f}, {100 * boots[1949]:+.1f}]")
    print(f"  online traces stopped: {stopped}/{online_traces} after the warm-up; excluded after the fact: {excluded}")
    print(f"  tokens: greedy {tokens['greedy']} · offline (= plain majority, every trace) {tokens['offline']} · online {tokens['online']} "
          f"({100 * (1 - tokens['online'] / tokens['offline']):.1f}% fewer than offline)")
    print(f"  seconds: offline {seconds['offline']:.0f}, online {seconds['online']:.0f}; online recomputed from the offline traces "
          f"{'agrees on every question' if not disagreements else f'DISAGREES on {disagreements} question(s)'}")
    return {"task": task, "n": n, "hits": {k: sum(v) for k, v in hits.items()}, "tokens": tokens, "stopped": stopped}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", default="sums,products")
    ap.add_argument("--limit", type=int, default=12)
    ap.add_argument("--engine", choices=["torch", "llama.cpp"], default="torch")
    ap.add_argument("--traces", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--eta", type=float, default=90)
    ap.add_argument("--group", type=int, default=None)
    ap.add_argument("--tokens", type=int, default=256)
    args = ap.parse_args()
    if args.engine == "llama.cpp":
        from livepp.engines.llamacpp import LlamaCppEngine

        engine = LlamaCppEngine(max_rows=max(16, args.traces))
    else:
        from livepp import Decoder, load_model

        engine = as_engine(Decoder(load_model()))
    params = GenerationParams(max_new_tokens=args.tokens, temperature=0.7, top_p=0.95, seed=0)
    group = args.group or default_group(args.tokens)
    summary = [run_task(engine, task.strip(), args, params, group) for task in args.tasks.split(",")]
    (OUT / "deepconf-summary.json").write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()

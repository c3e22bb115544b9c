"""Does the worst reasoning step predict a wrong answer better than the whole answer's PPL?

    python demos/steps.py [--task sums,products] [--limit 100] [--tokens 160] [--engine auto|torch|llama.cpp]

The embedded model answers built-in arithmetic questions (the eval half of
each task named) with a step-by-step prompt, greedy, as one batch. livepp cuts each
reply into steps as it streams (the default step rule: a blank line, or a
line starting "Step N" / "N." / "N)") and emits each step's PPL. A reply is
right when its last number is the answer. Printed: accuracy, steps per
reply, and the AUROC of three predictors of a wrong answer: the whole
answer's PPL, the highest step PPL, and the last step's PPL (1.0 = perfect,
0.5 = chance), each with a 95% bootstrap interval. The numbers are this model's on this task; they are a
measurement, not a promise.
"""

from __future__ import annotations

import argparse
import random
import time
from collections import defaultdict

from livepp import GenerationParams
from livepp.api import stream_many
from livepp.car.calibration import auroc
from livepp.car.routing import LONG_PROMPT
from livepp.car.tasks import answer_matches, builtin_split
from livepp.core.steps import DEFAULT_STEP_REGEX


def engine_for(kind: str):
    from livepp.engines.llamacpp import LlamaCppEngine, llama_cpp_available

    if kind == "llama.cpp" or (kind == "auto" and llama_cpp_available()):
        return LlamaCppEngine(None)
    from livepp.api import as_engine

    return as_engine(None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", default="sums,products", help="Built-in tasks, comma-separated (pooled).")
    ap.add_argument("--limit", type=int, default=100, help="Questions per task at most.")
    ap.add_argument("--tokens", type=int, default=160)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--engine", choices=["auto", "torch", "llama.cpp"], default="auto")
    args = ap.parse_args()
    engine = engine_for(args.engine)
    questions = [q for task in args.task.split(",") for q in builtin_split(task.strip(), "eval")[: args.limit]]
    params = GenerationParams(max_new_tokens=args.tokens, top_logprobs=0)
    rows: list[dict] = []
    started = time.perf_counter()
    for at in range(0, len(questions), args.batch):
        part = questions[at : at + args.batch]
        steps: dict[int, list[float]] = defaultdict(list)
        ends: dict[int, object] = {}
        for sample, event in stream_many([LONG_PROMPT.format(question=q.question) for q in part], model=engine, params=params,
                                         steps=DEFAULT_STEP_REGEX):
            if event.type == "step":
                steps[sample].append(event.ppl)
            elif event.type == "end":
                ends[sample] = event
        for i, q in enumerate(part):
            end = ends[i]
            step_ppls = steps[i] or [end.ppl]
            rows.append({"wrong": not answer_matches(end.text, q.answers), "ppl": end.ppl, "max_step": max(step_ppls),
                         "last_step": step_ppls[-1], "steps": len(steps[i])})
        print(f"{len(rows)}/{len(questions)} answered ({time.perf_counter() - started:.0f} s)", flush=True)
    wrong = [r["wrong"] for r in rows]
    print(f"\n{engine.name} ({engine.kind}), task {args.task}, {len(rows)} questions, step-by-step prompt, greedy, "
          f"{args.tokens} tokens at most")
    print(f"accuracy {1 - sum(wrong) / len(rows):.3f} ({len(rows) - sum(wrong)} right, {sum(wrong)} wrong); "
          f"steps per reply: mean {sum(r['steps'] for r in rows) / len(rows):.1f}")
    print(f"\n{'predictor of a wrong answer':<32} {'AUROC':>6}   95% bootstrap interval")
    rng = random.Random(0)
    resamples = [[rng.randrange(len(rows)) for _ in rows] for _ in range(1000)]
    for key, label in (("ppl", "whole-answer PPL"), ("max_step", "highest step PPL"), ("last_step", "last step's PPL")):
        scores = [r[key] for r in rows]
        boot = sorted(a for a in (auroc([scores[i] for i in idx], [wrong[i] for i in idx]) for idx in resamples) if a == a)
        low, high = boot[int(0.025 * len(boot))], boot[int(0.975 * len(boot)) - 1]
        print(f"{label:<32} {auroc(scores, wrong):>6.3f}   [{low:.3f}, {high:.3f}]")


if __name__ == "__main__":
    main()

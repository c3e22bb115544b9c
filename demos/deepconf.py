"""DeepConf on built-in tasks with the embedded model: greedy, plain majority,
DeepConf offline and online, with tokens and wall time.

    python demos/deepconf.py [--task sums] [--limit 12] [--traces 8] [--warmup 3] [--eta 90] [--group 16] [--tokens 48]

For each question of the task's eval half: one greedy answer; then the same
traces (seeds 0..N-1) run offline (all to the end) and online (warm-up, then
early stops). Offline gives the plain majority over all traces and the
DeepConf offline vote; online gives the DeepConf online vote. Printed: the
accuracy of each, and the tokens and seconds of offline against online at
the same trace budget (the same seeds, so online's traces are prefixes of
offline's).
"""

from __future__ import annotations

import argparse
import time

from livepp import Decoder, GenerationParams, load_model
from livepp.car.deepconf import think
from livepp.car.routing import SHORT_PROMPT, short_answer
from livepp.car.tasks import answer_matches, builtin_split


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", default="sums")
    ap.add_argument("--limit", type=int, default=12)
    ap.add_argument("--traces", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--eta", type=float, default=90)
    ap.add_argument("--group", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=48)
    args = ap.parse_args()
    decoder = Decoder(load_model())
    params = GenerationParams(max_new_tokens=args.tokens, temperature=0.7, top_p=0.95, seed=0)
    questions = builtin_split(args.task, "eval")[: args.limit]
    right = {"greedy": 0, "majority": 0, "deepconf offline": 0, "deepconf online": 0}
    tokens = {"offline": 0, "online": 0}
    seconds = {"offline": 0.0, "online": 0.0}
    for i, q in enumerate(questions):
        greedy = short_answer(decoder, q.question, max_new_tokens=args.tokens)
        right["greedy"] += answer_matches(greedy.text, q.answers)
        runs = {}
        for mode in ("offline", "online"):
            t = time.perf_counter()
            runs[mode] = think(q.question, engine=decoder, traces=args.traces, warmup=args.warmup, eta=args.eta, group=args.group,
                               mode=mode, params=params, prompt=SHORT_PROMPT)
            seconds[mode] += time.perf_counter() - t
            tokens[mode] += runs[mode].tokens
        right["majority"] += runs["offline"].majority is not None and answer_matches(runs["offline"].majority, q.answers)
        for mode in ("offline", "online"):
            answer = runs[mode].answer
            right[f"deepconf {mode}"] += answer is not None and answer_matches(answer, q.answers)
        print(f"[{i + 1}/{len(questions)}] {q.question} → greedy {greedy.text.strip()[:30]!r}, majority {runs['offline'].majority!r}, "
              f"offline {runs['offline'].answer!r}, online {runs['online'].answer!r} "
              f"({runs['online'].tokens}/{runs['offline'].tokens} tokens)", flush=True)
    n = len(questions)
    print(f"\n{args.task}: {n} questions, {args.traces} traces each (online: {args.warmup} warm-up), eta {args.eta:g}, group {args.group}, "
          f"at most {args.tokens} tokens per trace, temperature 0.7, top-p 0.95")
    for name, ok in right.items():
        print(f"  {name:<18} {ok:>3}/{n}")
    saved = 1 - tokens["online"] / tokens["offline"]
    print(f"  tokens: offline {tokens['offline']}, online {tokens['online']} ({100 * saved:.1f}% fewer); "
          f"seconds: offline {seconds['offline']:.1f}, online {seconds['online']:.1f} "
          f"(online / offline {seconds['online'] / seconds['offline']:.2f}x)")


if __name__ == "__main__":
    main()

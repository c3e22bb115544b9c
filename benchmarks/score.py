"""Sliding-window scoring speed and memory: livepp against the guide's loop.

    python benchmarks/score.py [--file PATH] [--max-length 512] [--stride 256]
                               [--batch-size 4] [--repeats 2] [--no-memory]

The baseline is a plain transcription of the loop in Hugging Face's
"perplexity of fixed-length models" guide (model(input_ids, labels=...) per
window, loss times the number of scored tokens). Both run on the embedded
model, the same text, max_length and stride, interleaved round by round; each
reports its best round as tokens scored per second, with the ratio. Both must
agree on the PPL. Then, unless --no-memory, livepp scores a ~10k and a ~100k
token document in fresh processes and prints each one's peak RSS, to show
that memory depends on the window, not the document length.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from livepp import load_model
from livepp.scoring.teacher_forced import score_ids, text_ids

DEFAULT_TEXT = "/usr/share/common-licenses/GPL-3"


def guide_loop(model, ids: list[int], max_length: int, stride: int) -> tuple[float, int]:
    """The guide's loop, transcribed: returns (mean NLL, tokens scored)."""
    encodings = torch.tensor([ids])
    seq_len = encodings.size(1)
    nll_sum = 0.0
    n_tokens = 0
    prev_end_loc = 0
    for begin_loc in range(0, seq_len, stride):
        end_loc = min(begin_loc + max_length, seq_len)
        trg_len = end_loc - prev_end_loc
        input_ids = encodings[:, begin_loc:end_loc]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            outputs = model(input_ids, labels=target_ids)
            neg_log_likelihood = outputs.loss
        num_valid_tokens = (target_ids != -100).sum().item()
        batch_size = target_ids.size(0)
        num_loss_tokens = num_valid_tokens - batch_size
        nll_sum += neg_log_likelihood.item() * num_loss_tokens
        n_tokens += num_loss_tokens
        prev_end_loc = end_loc
        if end_loc == seq_len:
            break
    return nll_sum / n_tokens, n_tokens


def timed(fn):
    t = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - t


def memory_probe(tokens: int, max_length: int, stride: int, batch_size: int) -> dict:
    """Run in a child process: score a document of about `tokens` tokens."""
    loaded = load_model()
    base = Path(DEFAULT_TEXT).read_text()
    ids, first, _ = text_ids(loaded, base)
    reps = math.ceil(tokens / len(ids))
    ids, first, _ = text_ids(loaded, "\n\n".join([base] * reps))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = score_ids(loaded, ids, score_from=first, max_length=max_length, stride=stride, batch_size=batch_size)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"tokens": len(ids), "ppl": result.ppl, "peak_rss_mb": peak / 1024, "rss_before_scoring_mb": before / 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--file", default=DEFAULT_TEXT)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--stride", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--_probe", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args._probe is not None:
        print(json.dumps(memory_probe(args._probe, args.max_length, args.stride, args.batch_size)))
        return

    loaded = load_model()
    ids, first, _ = text_ids(loaded, Path(args.file).read_text(encoding="utf-8"))
    L, s = args.max_length, args.stride
    print(f"{args.file}: {len(ids)} tokens, max_length {L}, stride {s}, {torch.get_num_threads()} threads, best of {args.repeats}")

    runs = {
        "guide loop (batch 1)": lambda: guide_loop(loaded.model, ids, L, s),
        "livepp (batch 1)": lambda: score_ids(loaded, ids, score_from=first, max_length=L, stride=s, batch_size=1),
        f"livepp (batch {args.batch_size})": lambda: score_ids(loaded, ids, score_from=first, max_length=L, stride=s, batch_size=args.batch_size),
    }
    best = {name: math.inf for name in runs}
    values = {}
    for _ in range(args.repeats):
        for name, fn in runs.items():
            value, seconds = timed(fn)
            best[name] = min(best[name], seconds)
            values[name] = value

    guide_nll, guide_n = values["guide loop (batch 1)"]
    print()
    for name, seconds in best.items():
        v = values[name]
        n, nll = (guide_n, guide_nll) if isinstance(v, tuple) else (v.n_tokens, v.mean_nll)
        print(f"  {name:<22} {n / seconds:8.1f} tokens scored/s   PPL {math.exp(nll):.4f} over {n} tokens")
    base = guide_n / best["guide loop (batch 1)"]
    b1 = values["livepp (batch 1)"].n_tokens / best["livepp (batch 1)"]
    bb = values[f"livepp (batch {args.batch_size})"].n_tokens / best[f"livepp (batch {args.batch_size})"]
    print()
    print(f"  livepp batch 1 / guide loop           {b1 / base:5.2f}x   (target >= 1.0x)")
    print(f"  livepp batch {args.batch_size} / guide loop           {bb / base:5.2f}x   (target >= 1.5x)")

    if not args.no_memory:
        print("\npeak memory (fresh process each, same window and stride):")
        for tokens in (10_000, 100_000):
            out = subprocess.run(
                [sys.executable, __file__, "--_probe", str(tokens), "--max-length", str(L), "--stride", str(L), "--batch-size", str(args.batch_size)],
                capture_output=True, text=True, check=True,
            )
            probe = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"  {probe['tokens']:>7} tokens: peak RSS {probe['peak_rss_mb']:7.0f} MB "
                  f"(model + tokens loaded: {probe['rss_before_scoring_mb']:.0f} MB), PPL {probe['ppl']:.4f}")


if __name__ == "__main__":
    main()

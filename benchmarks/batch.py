"""Batched decode speed: livepp with full monitoring against HF `generate`, from one run.

    python benchmarks/batch.py [--tokens 64] [--batches 1,4,8] [--repeats 2]

For each batch size B, B different prompts (different lengths, left-padded)
generate exactly `--tokens` greedy tokens each (`--ignore-eos` semantics) on
the embedded model. HF `generate` runs without any monitoring; livepp runs
`generate_many` with full monitoring (raw logprob, entropy, top-5, DeepConf
confidence, a tracker and an EarlyStop policy per row, and JSON
serialisation of every event). Contenders are interleaved round by round and
each reports its best round, as aggregate tokens/s over all rows. Printed:
both figures per batch size, livepp / HF, and livepp batch B / livepp batch 1.
"""

from __future__ import annotations

import argparse
import time

import torch

from livepp import Decoder, EarlyStop, GenerationParams, generate_many, load_model
from livepp.core.sinks import event_json

PROMPTS = [
    "Write a long story about a cat who learns to sail.",
    "Explain how a bicycle works.",
    "Describe the city of Paris in spring, with its markets, rivers and old streets.",
    "List some facts about the moon.",
    "Tell me about the history of printing and how it changed Europe.",
    "What makes a good cup of tea?",
    "Write a poem about rain on a tin roof at night.",
    "Why do birds migrate south in winter?",
]


class Serialise:
    def emit(self, event) -> None:
        event_json(event)


def hf_batch(decoder: Decoder, prompts: list[str], n: int) -> float:
    ids = [decoder.encode(p) for p in prompts]
    width = max(map(len, ids))
    batch = torch.tensor([[0] * (width - len(x)) + x for x in ids])
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
    t = time.perf_counter()
    with torch.inference_mode():
        out = decoder.model.generate(batch, attention_mask=mask, do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=0)
    dt = time.perf_counter() - t
    assert out.shape[1] - width == n
    return len(prompts) * n / dt


def livepp_batch(decoder: Decoder, prompts: list[str], n: int) -> float:
    params = GenerationParams(max_new_tokens=n, ignore_eos=True)
    t = time.perf_counter()
    results = generate_many(prompts, model=decoder, params=params, policies=lambda: [EarlyStop(1e9)], sinks=[Serialise()])
    dt = time.perf_counter() - t
    assert all(r.end.n_tokens == n for r in results)
    return len(prompts) * n / dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--batches", default="1,4,8")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    decoder = Decoder(load_model())
    sizes = [int(b) for b in args.batches.split(",")]
    best: dict[tuple[str, int], float] = {}
    hf_batch(decoder, PROMPTS[:2], 4)  # warm-up
    for r in range(args.repeats):
        for b in sizes:
            prompts = PROMPTS[:b]
            for name, fn in (("hf", hf_batch), ("livepp", livepp_batch)):
                rate = fn(decoder, prompts, args.tokens)
                best[name, b] = max(best.get((name, b), 0.0), rate)
                print(f"round {r + 1}: {name:<7} batch {b}: {rate:6.1f} tokens/s", flush=True)
    print(f"\n{args.tokens} greedy tokens per row, aggregate tokens/s, best of {args.repeats} interleaved rounds")
    print(f"{'batch':>5} {'HF generate':>12} {'livepp (monitored)':>19} {'livepp/HF':>10} {'livepp vs its batch 1':>22}")
    base = best.get(("livepp", 1))
    for b in sizes:
        hf, lp = best["hf", b], best["livepp", b]
        scale = f"{lp / base:.2f}x" if base else "–"
        print(f"{b:>5} {hf:>12.1f} {lp:>19.1f} {lp / hf:>9.2f}x {scale:>22}")


if __name__ == "__main__":
    main()

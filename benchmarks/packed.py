"""The torch engine on the CPU: linear layers packed for oneDNN (livepp's
default) against the model as transformers loads it, from one interleaved run.

    python benchmarks/packed.py [--repeats 5] [--tokens 64]

1. One forward pass of 1, 30 and 512 tokens (a decode step, a short prompt,
   a scoring window): median milliseconds of each model, and the ratio.
2. `livepp generate`'s decoder, greedy, full monitoring: tokens/s of each.
3. The largest difference of a logprob between the two models.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from livepp import Decoder, GenerationParams, load_model


def forward_ms(model, ids: torch.Tensor) -> float:
    with torch.inference_mode():
        t = time.perf_counter()
        model(ids)
        return (time.perf_counter() - t) * 1e3


def tokens_per_s(decoder: Decoder, prompt: list[int], n: int) -> float:
    params = GenerationParams(max_new_tokens=n, ignore_eos=True)
    t = time.perf_counter()
    got = sum(1 for _ in decoder.stream(prompt, params))
    return got / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=64, help="tokens generated per run")
    args = ap.parse_args()
    models = {"transformers (nn.Linear)": load_model(pack=False), "livepp (packed)": load_model()}
    gen = torch.Generator().manual_seed(0)
    shapes = {n: torch.randint(100, 40000, (1, n), generator=gen) for n in (1, 30, 512)}
    decoders = {name: Decoder(m) for name, m in models.items()}
    prompt = decoders["livepp (packed)"].encode("Tell me a story about a lighthouse keeper.")
    for name, m in models.items():  # warm-up
        forward_ms(m.model, shapes[30])
        tokens_per_s(decoders[name], prompt, 4)
    ms: dict[tuple[str, int], list[float]] = {}
    tps: dict[str, list[float]] = {}
    for _ in range(args.repeats):
        for n, ids in shapes.items():
            for name, m in models.items():
                ms.setdefault((name, n), []).append(forward_ms(m.model, ids))
        for name, d in decoders.items():
            tps.setdefault(name, []).append(tokens_per_s(d, prompt, args.tokens))
    base, ours = list(models)
    print(f"SmolLM2-135M float32, {torch.get_num_threads()} threads; median of {args.repeats} interleaved runs\n")
    print(f"  {'forward pass':<16} {base:>26} {ours:>18} {'speed-up':>9}")
    for n in shapes:
        a, b = statistics.median(ms[(base, n)]), statistics.median(ms[(ours, n)])
        print(f"  {n:>4} tokens      {a:>23.1f} ms {b:>15.1f} ms {a / b:>8.2f}x")
    a, b = statistics.median(tps[base]), statistics.median(tps[ours])
    print(f"  {'generate':<16} {a:>19.1f} tokens/s {b:>11.1f} tokens/s {b / a:>8.2f}x")
    with torch.inference_mode():
        ids = shapes[512]
        x = torch.log_softmax(models[base].model(ids).logits.double(), -1)
        y = torch.log_softmax(models[ours].model(ids).logits.double(), -1)
    print(f"\n  largest difference of a logprob over 512 positions x the vocabulary: {(x - y).abs().max().item():.1e}")


if __name__ == "__main__":
    main()

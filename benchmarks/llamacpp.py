"""The llama.cpp engine against a bare llama.cpp loop and the torch engine, from one run.

    python benchmarks/llamacpp.py [--tokens 64] [--batch 4]

Baseline: a plain llama-cpp-python low-level decode loop on the embedded
GGUF, one token per decode, greedy argmax in numpy, no statistics at all.
Then livepp's llama.cpp engine with full monitoring (raw logprob, entropy,
top-5, confidence, tracker, policies' inputs), the torch engine with full
monitoring on the same model (fp32 after dequantization), and the llama.cpp
engine decoding a batch of sequences in one context. Printed: tokens/s and
the ratio to the bare loop.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from livepp import Decoder, GenerationParams, Monitor, generate_many, load_model
from livepp.engines.llamacpp import LlamaContext, LlamaCppEngine
from livepp.engines.torch.engine import TorchEngine

PROMPT = "Write a long story about a cat who learns to sail."


def bare(path: str, ids: list[int], n: int) -> float:
    ctx = LlamaContext(path, n_seq=1)
    t = time.perf_counter()
    logits = ctx.prefill(ids, 0, exact=False)
    pos = len(ids)
    for _ in range(n - 1):
        token = int(np.argmax(logits.numpy()))
        logits = ctx.decode([(token, pos, 0, True)])[0]
        pos += 1
    rate = n / (time.perf_counter() - t)
    ctx.close()
    return rate


def monitored(engine, n: int) -> float:
    t = time.perf_counter()
    r = Monitor().run(engine.open(PROMPT, GenerationParams(max_new_tokens=n, ignore_eos=True)))
    return r.end.n_tokens / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, default=4)
    args = ap.parse_args()
    llama = LlamaCppEngine()
    torch_engine = TorchEngine(Decoder(load_model()))
    ids = llama.encode(PROMPT)
    monitored(llama, 4), monitored(torch_engine, 4)  # warm-up
    base = bare(llama.path, ids, args.tokens)
    ll = monitored(llama, args.tokens)
    te = monitored(torch_engine, args.tokens)
    t = time.perf_counter()
    generate_many([PROMPT], n=args.batch, model=llama, params=GenerationParams(max_new_tokens=args.tokens, ignore_eos=True, temperature=0.8, seed=0))
    batch = args.batch * args.tokens / (time.perf_counter() - t)
    print(f"{args.tokens} tokens, embedded SmolLM2-135M (Q4_1 GGUF), batch 1 unless said\n")
    print(f"  {'setup':<44} {'tokens/s':>9} {'vs bare llama.cpp':>18}")
    for name, rate in (("bare llama.cpp loop (no statistics)", base), ("livepp llama.cpp engine, full monitoring", ll),
                       ("livepp torch engine, full monitoring", te), (f"livepp llama.cpp engine, batch of {args.batch}", batch)):
        print(f"  {name:<44} {rate:>9.1f} {rate / base:>17.2f}x")


if __name__ == "__main__":
    main()

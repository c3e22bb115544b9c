"""How far llama.cpp generation's logprobs lie from llama.cpp's own
token-by-token evaluation, on the default path and with --exact.

    python benchmarks/exactness.py [--tokens 48] [--model PATH.gguf]

For each chat prompt: a greedy generation on the llama.cpp engine (default:
the prompt prefilled in batched kernels), the same with ``exact=True`` (every
prompt token its own decode), and llama.cpp's token-by-token teacher forcing
of the prompt plus the generated ids in a fresh context. Printed per prompt:
the largest and median per-token |logprob difference| of each path against
that evaluation. The default path's distance depends on the processor's
kernels; --exact should be at rounding level everywhere.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from livepp.core.monitor import Monitor
from livepp.core.params import GenerationParams
from livepp.engines.llamacpp import LlamaContext, LlamaCppEngine

PROMPTS = [
    "Write a poem about rivers and stones.",
    "Tell me about owls.",
    "What is 17 + 25? Think step by step.",
    "Explain entropy in one paragraph.",
    "Name three colours and say why you like them.",
    "Translate 'good morning' into French, Spanish and German.",
    # A long prompt: more of it goes through the batched kernels.
    "Summarise this: " + " ".join(open("/usr/share/common-licenses/GPL-3", encoding="utf-8").read().split()[:250]),
]


def token_by_token(path: str, ids: list[int], n_prompt: int) -> list[float]:
    ctx = LlamaContext(path, n_seq=1)
    try:
        logits = [lg for pos, t in enumerate(ids[:-1]) for lg in ctx.decode([(t, pos, 0, pos >= n_prompt - 1)])]
    finally:
        ctx.close()
    return [torch.log_softmax(lg.double(), -1)[ids[n_prompt + k]].item() for k, lg in enumerate(logits)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--model", default=None)
    args = ap.parse_args()
    params = GenerationParams(max_new_tokens=args.tokens, ignore_eos=True)
    worst = {"default": 0.0, "exact": 0.0}
    for exact in (False, True):
        engine = LlamaCppEngine(args.model, exact=exact)
        name = "exact" if exact else "default"
        try:
            for prompt in PROMPTS:
                r = Monitor().run(engine.open(prompt, params))
                n_prompt = len(r.events[0].prompt_token_ids)
                ids = list(r.events[0].prompt_token_ids) + r.token_ids
                d = np.abs(np.array([t.logprob for t in r.tokens]) - np.array(token_by_token(engine.path, ids, n_prompt)))
                worst[name] = max(worst[name], float(d.max()))
                print(f"{name:<7} {prompt[:44]!r:<47} {n_prompt:>3} prompt tokens · {len(d)} generated · "
                      f"|Δ logprob| max {d.max():.2e}, median {np.median(d):.1e} nats", flush=True)
        finally:
            engine.close()
    print(f"largest per-token difference to token-by-token evaluation: default path {worst['default']:.2e} nats, "
          f"--exact {worst['exact']:.1e} nats")


if __name__ == "__main__":
    main()

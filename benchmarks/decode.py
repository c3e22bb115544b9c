"""Decode speed: Hugging Face generate against livepp, from one run.

    python benchmarks/decode.py [--tokens 128] [--repeats 3] [--compile]

All contenders generate the same number of greedy tokens from the same
prompt on the embedded model, batch 1, and are interleaved round by round so
that machine noise hits them alike; each reports its best round. Printed:
tokens/s of HF `generate`, HF `generate` + `TextIteratorStreamer`, livepp with
full monitoring (raw logprob, entropy, top-5, DeepConf confidence, tracker,
an EarlyStop policy and JSON serialisation of every event), livepp with
monitoring off (token id and logprob only), and the ratios. `--compile` adds
livepp with torch.compile + static KV cache and reports its compile time.
"""

from __future__ import annotations

import argparse
import threading
import time

import torch
from transformers import TextIteratorStreamer

from livepp import Decoder, EarlyStop, GenerationParams, Monitor, load_model
from livepp.core.sinks import event_json

PROMPT = "Write a long story about a cat who learns to sail."


class JsonSerialisingSink:
    """Serialises every event like `--json` does, without terminal I/O."""

    def emit(self, event) -> None:
        event_json(event)


def hf_generate(model, ids, n):
    t = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n, min_new_tokens=n)
    assert out.shape[1] - ids.shape[1] == n
    return n / (time.perf_counter() - t)


def hf_streamer(model, tokenizer, ids, n):
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True)
    kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n, min_new_tokens=n, streamer=streamer)
    t = time.perf_counter()
    worker = threading.Thread(target=lambda: torch.inference_mode()(model.generate)(**kwargs))
    worker.start()
    for _ in streamer:
        pass
    worker.join()
    return n / (time.perf_counter() - t)


def livepp_full(decoder, prompt_ids, n):
    params = GenerationParams(max_new_tokens=n, ignore_eos=True, top_logprobs=5, confidence_k=20, entropy=True)
    monitor = Monitor(policies=[EarlyStop(1e9, metric="window_ppl")], sinks=[JsonSerialisingSink()], keep_events=False)
    t = time.perf_counter()
    result = monitor.run(decoder.stream(prompt_ids, params))
    assert result.end.n_tokens == n
    return n / (time.perf_counter() - t)


def livepp_bare(decoder, prompt_ids, n):
    params = GenerationParams(max_new_tokens=n, ignore_eos=True, top_logprobs=0, confidence_k=0, entropy=False)
    t = time.perf_counter()
    count = sum(1 for _ in decoder.stream(prompt_ids, params))
    assert count == n
    return n / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--compile", action="store_true", help="also measure the torch.compile path (minutes of compile time)")
    args = ap.parse_args()
    n = args.tokens

    loaded = load_model()
    decoder = Decoder(loaded)
    prompt_ids = decoder.encode(PROMPT)
    ids = torch.tensor([prompt_ids])
    print(f"model {loaded.name}, {len(prompt_ids)} prompt tokens, {n} new tokens, batch 1, "
          f"{torch.get_num_threads()} threads, best of {args.repeats}")

    runs = {
        "HF generate (greedy)": lambda: hf_generate(loaded.model, ids, n),
        "HF generate + TextIteratorStreamer": lambda: hf_streamer(loaded.model, loaded.tokenizer, ids, n),
        "livepp, full monitoring": lambda: livepp_full(decoder, prompt_ids, n),
        "livepp, monitoring off": lambda: livepp_bare(decoder, prompt_ids, n),
    }
    compiled = None
    if args.compile:
        compiled = Decoder(loaded).compile(max_cache_len=len(prompt_ids) + n + 8)
        t = time.perf_counter()
        livepp_full(compiled, prompt_ids, n)  # first run compiles
        compile_s = time.perf_counter() - t
        greedy = GenerationParams(max_new_tokens=n, ignore_eos=True)
        same = [r.token_id for r in compiled.stream(prompt_ids, greedy)] == [r.token_id for r in decoder.stream(prompt_ids, greedy)]
        print(f"compiled decoder ready after {compile_s:.0f} s; greedy ids equal to eager: {same}")
        runs["livepp --compile, full monitoring"] = lambda: livepp_full(compiled, prompt_ids, n)

    for fn in runs.values():  # warm-up: allocator, thread pools, caches
        fn()
    best = {name: 0.0 for name in runs}
    for _ in range(args.repeats):
        for name, fn in runs.items():
            best[name] = max(best[name], fn())

    width = max(map(len, runs))
    print()
    for name, tps in best.items():
        print(f"  {name:<{width}}  {tps:6.1f} tokens/s")
    hf, hs = best["HF generate (greedy)"], best["HF generate + TextIteratorStreamer"]
    full, bare = best["livepp, full monitoring"], best["livepp, monitoring off"]
    print()
    print(f"  livepp full / HF generate            {full / hf:5.2f}x   (target >= 1.00x)")
    print(f"  livepp full / HF generate + streamer {full / hs:5.2f}x   (target >= 1.25x)")
    print(f"  monitoring cost vs livepp bare       {100 * (1 - full / bare):5.1f}%   (target <= 5%)")
    if compiled is not None:
        comp = best["livepp --compile, full monitoring"]
        print(f"  livepp --compile / HF generate       {comp / hf:5.2f}x   (target >= 1.25x); "
              f"first run incl. compile {compile_s:.0f} s")


if __name__ == "__main__":
    main()

"""Decode speed: Hugging Face generate against livepp, from one run.

    python benchmarks/decode.py [--tokens 128] [--repeats 3] [--compile] [--no-llama]

All contenders generate the same number of greedy tokens from the same
prompt on the embedded model, batch 1, and are interleaved round by round so
that machine noise hits them alike; each reports its best round. Printed:
tokens/s of HF `generate`, HF `generate` + `TextIteratorStreamer`, livepp with
full monitoring (raw logprob, entropy, top-5, DeepConf confidence, tracker,
an EarlyStop policy and JSON serialisation of every event), livepp with
monitoring off (token id and logprob only), and the ratios. `--compile` adds
livepp with torch.compile + static KV cache and reports its compile time.

With llama-cpp-python installed (unless `--no-llama`), the same run adds the
embedded model's own GGUF on llama.cpp: livepp's llama.cpp engine with full
monitoring, the same engine loop with statistics off (token id and logprob
only, as "livepp, monitoring off"), a raw llama.cpp loop with nothing of
livepp's (one token per `llama_decode`, argmax), llama-cpp-python's own streaming
`create_completion(logprobs=5)` path, and, at batch 1, 4 and 8 (`--batches`),
the llama.cpp engine with full monitoring (aggregate tokens/s of N greedy
rows of one prompt, every row with its own statistics, tracker, policy and
serialised events) against a bare llama.cpp loop at the same batch size: N
sequences of one context, one `llama_decode` per step for all of them, argmax
only (`--batch-only` runs just these rows).
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

import torch
from transformers import TextIteratorStreamer

from livepp import Decoder, EarlyStop, GenerationParams, Monitor, load_model
from livepp.core.sinks import event_json
from livepp.engines.torch.engine import TorchEngine

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


def livepp_full(engine, n):
    """Any engine, with full monitoring: the statistics, a policy and every event serialised."""
    params = GenerationParams(max_new_tokens=n, ignore_eos=True, top_logprobs=5, confidence_k=20, entropy=True)
    monitor = Monitor(policies=[EarlyStop(1e9, metric="window_ppl")], sinks=[JsonSerialisingSink()], keep_events=False)
    t = time.perf_counter()
    result = monitor.run(engine.open(PROMPT, params))
    assert result.end.n_tokens == n
    return n / (time.perf_counter() - t)


def livepp_bare(engine, n):
    """The same engine loop with monitoring off: token id and logprob only."""
    params = GenerationParams(max_new_tokens=n, ignore_eos=True, top_logprobs=0, confidence_k=0, entropy=False)
    t = time.perf_counter()
    count = sum(1 for _ in engine.open(PROMPT, params))
    assert count == n
    return n / (time.perf_counter() - t)


def llama_bare(ctx, prompt_ids, n):
    import numpy as np

    ctx.clear()
    t = time.perf_counter()
    logits = ctx.prefill(prompt_ids, 0, exact=False)
    for pos in range(len(prompt_ids), len(prompt_ids) + n - 1):
        logits = ctx.decode([(int(np.argmax(logits.numpy())), pos, 0, True)])[0]
    return n / (time.perf_counter() - t)


def llama_bare_batch(ctx, prompt_ids, rows, n):
    """The baseline of a batch: ``rows`` sequences of one llama.cpp context
    share one prefill, then one ``llama_decode`` per step decodes a token for
    every sequence, each the argmax of its logits; nothing of livepp's."""
    import numpy as np

    ctx.clear()
    t = time.perf_counter()
    first = ctx.prefill(prompt_ids, 0, exact=False).numpy()
    for seq in range(1, rows):
        ctx.copy(0, seq)
    tokens = [int(np.argmax(first))] * rows
    for pos in range(len(prompt_ids), len(prompt_ids) + n - 1):
        block = ctx.decode([(tokens[seq], pos, seq, True) for seq in range(rows)], copy=False).numpy()
        tokens = np.argmax(block, axis=1).tolist()
    return rows * n / (time.perf_counter() - t)


def llama_engine_batch(engine, rows, n):
    """The llama.cpp engine, ``rows`` greedy rows of one prompt with full
    monitoring: each row's statistics, its own tracker and policy, and every
    event serialised (the batch form of ``livepp_full``)."""
    from livepp.core.batch_monitor import MonitoredBatch

    params = GenerationParams(max_new_tokens=n, ignore_eos=True, top_logprobs=5, confidence_k=20, entropy=True)
    sink = JsonSerialisingSink()
    t = time.perf_counter()
    batch = MonitoredBatch(engine.open_batch([PROMPT] * rows, [params] * rows), [params] * rows, model=engine.name,
                           engine=engine.kind, policies=lambda i: [EarlyStop(1e9, metric="window_ppl")])
    ends = 0
    for _, event in batch:
        sink.emit(event)
        ends += event.type == "end" and event.n_tokens == n
    assert ends == rows
    return rows * n / (time.perf_counter() - t)


def llama_own_logprobs(llm, prompt_ids, n):
    t = time.perf_counter()
    count = 0
    for chunk in llm.create_completion(prompt_ids, max_tokens=n, temperature=0.0, logprobs=5, stream=True):
        count += len((chunk["choices"][0].get("logprobs") or {}).get("tokens") or [])
    llm.reset()
    return count / (time.perf_counter() - t)


def llama_batch(engine, rows, n):
    from livepp import generate_many

    params = GenerationParams(max_new_tokens=n, ignore_eos=True, temperature=0.8, seed=0)
    t = time.perf_counter()
    results = generate_many([PROMPT], n=rows, model=engine, params=params)
    assert all(r.end.n_tokens == n for r in results)
    return rows * n / (time.perf_counter() - t)


def interleaved_rounds(runs: dict, repeats: int) -> dict[str, list[float]]:
    """Every contender once to warm up (allocator, thread pools, caches), then
    ``repeats`` rounds of all of them in turn, so that machine noise hits them
    alike; each contender's figure of every round."""
    for fn in runs.values():
        fn()
    rounds: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            rounds[name].append(fn())
    return rounds


def interleaved_best(runs: dict, repeats: int) -> dict[str, float]:
    """:func:`interleaved_rounds`, each contender's best round."""
    return {name: max(figures) for name, figures in interleaved_rounds(runs, repeats).items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--compile", action="store_true", help="also measure the torch.compile path (minutes of compile time)")
    ap.add_argument("--no-llama", action="store_true", help="leave out the llama.cpp rows")
    ap.add_argument("--batches", default="1,4,8", help="batch sizes of the llama.cpp engine against the bare loop")
    ap.add_argument("--batch-only", action="store_true", help="only the llama.cpp engine against the bare loop at each batch size")
    args = ap.parse_args()
    if args.batch_only:
        return batch_main(args)
    n = args.tokens

    loaded = load_model()
    decoder = Decoder(loaded)
    engine = TorchEngine(decoder)
    prompt_ids = decoder.encode(PROMPT)
    ids = torch.tensor([prompt_ids])
    print(f"model {loaded.name}, {len(prompt_ids)} prompt tokens, {n} new tokens, batch 1, "
          f"{torch.get_num_threads()} threads, best of {args.repeats}")

    runs = {
        "HF generate (greedy)": lambda: hf_generate(loaded.model, ids, n),
        "HF generate + TextIteratorStreamer": lambda: hf_streamer(loaded.model, loaded.tokenizer, ids, n),
        "livepp, full monitoring": lambda: livepp_full(engine, n),
        "livepp, monitoring off": lambda: livepp_bare(engine, n),
    }
    compiled = None
    if args.compile:
        compiled = Decoder(loaded).compile(max_cache_len=len(prompt_ids) + n + 8)
        t = time.perf_counter()
        livepp_full(TorchEngine(compiled), n)  # first run compiles
        compile_s = time.perf_counter() - t
        greedy = GenerationParams(max_new_tokens=n, ignore_eos=True)
        same = [r.token_id for r in compiled.stream(prompt_ids, greedy)] == [r.token_id for r in decoder.stream(prompt_ids, greedy)]
        print(f"compiled decoder ready after {compile_s:.0f} s; greedy ids equal to eager: {same}")
        runs["livepp --compile, full monitoring"] = lambda: livepp_full(TorchEngine(compiled), n)

    llama = None
    if not args.no_llama:
        from livepp.engines.llamacpp import LlamaContext, LlamaCppEngine, llama_cpp_available

        if llama_cpp_available():
            from llama_cpp import Llama

            llama = LlamaCppEngine()
            bare_ctx = LlamaContext(llama.path, n_seq=1)
            llm = Llama(llama.path, n_ctx=2048, verbose=False, logits_all=True)
            llama_ids = llama.encode(PROMPT)
            runs["llama.cpp engine, full monitoring"] = lambda: livepp_full(llama, n)
            runs["llama.cpp engine, monitoring off"] = lambda: livepp_bare(llama, n)
            runs["llama.cpp raw loop (argmax only)"] = lambda: llama_bare(bare_ctx, llama_ids, n)
            runs["llama-cpp-python stream, logprobs=5"] = lambda: llama_own_logprobs(llm, llama_ids, n)
            runs["llama.cpp engine, batch 8 (aggregate)"] = lambda: llama_batch(llama, 8, n)
            runs["llama.cpp engine, batch 1 (sampled)"] = lambda: llama_batch(llama, 1, n)

    best = interleaved_best(runs, args.repeats)
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
    if llama is not None:
        lf, lb = best["llama.cpp engine, full monitoring"], best["llama.cpp engine, monitoring off"]
        raw = best["llama.cpp raw loop (argmax only)"]
        own, b8, b1 = best["llama-cpp-python stream, logprobs=5"], best["llama.cpp engine, batch 8 (aggregate)"], best["llama.cpp engine, batch 1 (sampled)"]
        print(f"  llama.cpp full / torch full          {lf / full:5.2f}x   (target >= 4x)")
        print(f"  llama.cpp full / llama-cpp-python logprobs=5 {lf / own:5.2f}x   (target >= 3x)")
        print(f"  llama.cpp monitoring cost vs the same loop, statistics off {100 * (1 - lf / lb):5.1f}%   (target <= 10%)")
        print(f"  llama.cpp full vs the raw llama.cpp loop      {100 * (1 - lf / raw):5.1f}% slower")
        print(f"  llama.cpp batch 8 / batch 1 (aggregate) {b8 / b1:5.2f}x")
    if compiled is not None:
        comp = best["livepp --compile, full monitoring"]
        print(f"  livepp --compile / HF generate       {comp / hf:5.2f}x   (target >= 1.25x); "
              f"first run incl. compile {compile_s:.0f} s")


def batch_main(args) -> None:
    """The llama.cpp engine with full monitoring against the bare batched loop."""
    from livepp.engines.llamacpp import LlamaContext, LlamaCppEngine

    n, batches = args.tokens, [int(b) for b in args.batches.split(",")]
    engine = LlamaCppEngine()
    ctx = LlamaContext(engine.path, n_seq=max(batches))
    ids = engine.encode(PROMPT)
    print(f"model {engine.name} (llama.cpp), {len(ids)} prompt tokens, {n} new tokens per row, best of {args.repeats}, interleaved")
    runs = {}
    for b in batches:
        runs[f"bare llama.cpp loop, batch {b} (argmax only)"] = lambda b=b: llama_bare_batch(ctx, ids, b, n)
        runs[f"llama.cpp engine, batch {b}, full monitoring"] = lambda b=b: llama_engine_batch(engine, b, n)
    rounds = interleaved_rounds(runs, args.repeats)
    width = max(map(len, runs))
    print()
    for name, figures in rounds.items():
        print(f"  {name:<{width}}  {max(figures):6.1f} tokens/s (aggregate)")
    print()
    print("  engine with full monitoring / bare loop: best against best, and the median of the rounds' ratios (each round runs both)")
    for b in batches:
        engine_rounds, bare_rounds = rounds[f"llama.cpp engine, batch {b}, full monitoring"], rounds[f"bare llama.cpp loop, batch {b} (argmax only)"]
        paired = statistics.median(e / r for e, r in zip(engine_rounds, bare_rounds))
        print(f"  batch {b}: {max(engine_rounds) / max(bare_rounds):6.3f}x best, {paired:6.3f}x median   (target >= 0.95x at batch 8)")
    ctx.close()
    engine.close()


if __name__ == "__main__":
    main()

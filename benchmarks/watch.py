"""Proxy scoring throughput against the embedded model's own generation, from one run.

    python benchmarks/watch.py [--tokens 256] [--repeats 3]

The embedded model (torch engine) generates a greedy reply with full
monitoring: that is the rate a proxy must keep up with. Then `ProxyStream`
(what `livepp watch` and `generate --remote --proxy` run) scores that same
reply, given the same prompt, with the same model, as the text arrives:

* one generated token's text at a time (the most work per token: about one
  forward pass per token, as a generator would deliver it);
* in blocks of 256 characters (text that arrives faster than it is scored,
  read from a pipe or a file, is scored many tokens per forward pass);
* `livepp score` of the whole text at once, for reference;
* live: the model generates in one thread while the proxy scores its text
  in another (read ahead with `BufferedText`, as `generate --remote --proxy`
  does), sharing the machine: the generator's rate while watched, and how
  long after the generator's last token the proxy has scored everything.

Interleaved, best of N; prints tokens/s of each and the ratio to generation.
"""

from __future__ import annotations

import argparse
import time

from livepp import GenerationParams, Monitor, load_model
from livepp.engines.torch.decoder import Decoder
from livepp.engines.torch.proxy import BufferedText, ProxyStream
from livepp.scoring.teacher_forced import score_target

PROMPT = "Write a long story about a cat who learns to sail."


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    loaded = load_model()
    decoder = Decoder(loaded)
    ids = decoder.encode(PROMPT)
    params = GenerationParams(max_new_tokens=args.tokens, ignore_eos=True)
    best = {"generation": 0.0, "per token": 0.0, "256-char blocks": 0.0, "score": 0.0}
    counts = {}
    for _ in range(args.repeats):
        t = time.perf_counter()
        result = Monitor(keep_events=True).run(decoder.stream(ids, params))
        n = result.end.n_tokens
        best["generation"] = max(best["generation"], n / (time.perf_counter() - t))
        pieces = [e.text for e in result.tokens]
        text = "".join(pieces)
        runs = {"per token": pieces, "256-char blocks": [text[i:i + 256] for i in range(0, len(text), 256)]}
        for name, chunks in runs.items():
            t = time.perf_counter()
            records = list(ProxyStream(loaded, chunks, GenerationParams(), prompt=PROMPT, chat=True))
            best[name] = max(best[name], len(records) / (time.perf_counter() - t))
            counts[name] = len(records)
        t = time.perf_counter()
        generated_at: list[float] = []

        def texts():
            for record in decoder.stream(ids, params):
                yield record.text
            generated_at.append(time.perf_counter())

        live = list(ProxyStream(loaded, BufferedText(texts()), GenerationParams(), prompt=PROMPT, chat=True))
        lag = time.perf_counter() - generated_at[0]
        rate = n / (generated_at[0] - t)
        if rate > best.get("live generation", 0.0):
            best["live generation"], best["lag"], counts["live"] = rate, lag, len(live)
        t = time.perf_counter()
        scored = score_target(loaded, PROMPT, text, chat=True)
        best["score"] = max(best["score"], scored.n_tokens / (time.perf_counter() - t))
        counts["score"] = scored.n_tokens
    print(f"{loaded.name}, torch on {decoder.device}, a {n}-token reply, best of {args.repeats}\n")
    print(f"{'':<44} {'tokens':>6} {'tokens/s':>9} {'x generation':>13}")
    print(f"{'generation, full monitoring':<44} {n:>6} {best['generation']:>9.1f} {1.0:>13.2f}")
    for name, label in (("per token", "proxy, text arriving a token at a time"), ("256-char blocks", "proxy, text arriving in 256-char blocks"),
                        ("score", "score, the whole text at once")):
        print(f"{label:<44} {counts[name]:>6} {best[name]:>9.1f} {best[name] / best['generation']:>13.2f}")
    print(f"\nlive, generator and proxy on the same machine: the generator ran at {best['live generation']:.1f} tokens/s "
          f"({best['live generation'] / best['generation']:.2f}x its rate alone); the proxy had scored all {counts['live']} tokens "
          f"{best['lag']:.2f} s after the generator's last token")


if __name__ == "__main__":
    main()

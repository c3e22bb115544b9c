"""Scoring over the API against scoring in-process, from one run.

    python benchmarks/score_api.py [--texts 8] [--tokens 512] [--lm-eval-requests 48]

1. Tokens scored per second: `livepp score` in-process on N texts of 512
   tokens (the windows of one document, scored 1 and N per forward pass:
   `--batch-size`), against `livepp serve` (its own process, loopback) scoring
   the same token ids with `echo, logprobs 0, max_tokens 0` from 1 client in
   turn and from N clients at once.
2. lm-evaluation-harness: the same loglikelihood requests (and one
   loglikelihood_rolling document) through its `local-completions` model
   against `livepp serve`, and through its own HF backend in-process on the
   same weights; wall time of each and the ratio. The HF backend runs the
   model as transformers loads it (what its users run), and once more on
   livepp's model, whose linear layers are packed for oneDNN on the CPU.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

import openai

sys.path.insert(0, str(Path(__file__).resolve().parent))
from server import HERE, Served  # noqa: E402

from livepp import load_model  # noqa: E402
from livepp.scoring.teacher_forced import score_ids  # noqa: E402

GPL = Path("/usr/share/common-licenses/GPL-3")
MODEL = "SmolLM2-135M-Instruct"


def document_ids(loaded, n_texts: int, tokens: int) -> list[int]:
    text = GPL.read_text() if GPL.is_file() else "The quick brown fox jumps over the lazy dog. " * 4000
    ids = loaded.tokenizer(text)["input_ids"]
    need = n_texts * tokens
    while len(ids) < need:
        ids = ids + ids
    return ids[:need]


def in_process(loaded, ids: list[int], tokens: int, batch: int) -> float:
    """Tokens scored per second by livepp score's windows, `batch` per forward pass."""
    t = time.perf_counter()
    result = score_ids(loaded, ids, max_length=tokens, stride=tokens, batch_size=batch)
    return result.n_tokens / (time.perf_counter() - t)


def over_the_api(port: int, texts: list[list[int]], concurrent: bool) -> float:
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=600)
    scored = []

    def one(ids: list[int]) -> None:
        r = client.completions.create(model=MODEL, prompt=ids, echo=True, logprobs=0, max_tokens=0)
        scored.append(sum(v is not None for v in r.choices[0].logprobs.token_logprobs))

    t = time.perf_counter()
    if concurrent:
        threads = [threading.Thread(target=one, args=(ids,)) for ids in texts]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    else:
        for ids in texts:
            one(ids)
    return sum(scored) / (time.perf_counter() - t)


def lm_eval_requests(n: int) -> tuple[list, list]:
    from lm_eval.api.instance import Instance

    text = GPL.read_text() if GPL.is_file() else "The quick brown fox jumps over the lazy dog. " * 400
    sentences = [s.strip() for s in text.replace("\n", " ").split(".") if len(s.split()) > 6][:n]
    pairs = [(" ".join(s.split()[:-3]), " " + " ".join(s.split()[-3:])) for s in sentences]
    loglikelihood = [Instance(request_type="loglikelihood", doc={}, arguments=p, idx=i) for i, p in enumerate(pairs)]
    rolling = [Instance(request_type="loglikelihood_rolling", doc={}, arguments=(text[:6000],), idx=0)]
    return loglikelihood, rolling


def timed(fn) -> tuple[float, object]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--texts", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--lm-eval-requests", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--lm-eval-only", action="store_true", help="skip the tokens-per-second table")
    args = ap.parse_args()
    loaded = load_model()
    ids = document_ids(loaded, args.texts, args.tokens)
    texts = [ids[i * args.tokens : (i + 1) * args.tokens] for i in range(args.texts)]
    server = Served(HERE, "--max-batch", str(max(8, args.texts)), "--max-queue", "32")
    try:
        over_the_api(server.port, texts[:2], concurrent=True)  # warm-up
        in_process(loaded, ids[: 2 * args.tokens], args.tokens, 2)
        rows: dict[str, list[float]] = {}
        for _ in range(0 if args.lm_eval_only else args.repeats):  # interleaved
            rows.setdefault("in-process score, 1 window per pass", []).append(in_process(loaded, ids, args.tokens, 1))
            rows.setdefault(f"in-process score, {args.texts} windows per pass", []).append(in_process(loaded, ids, args.tokens, args.texts))
            rows.setdefault("API, 1 client, requests in turn", []).append(over_the_api(server.port, texts, concurrent=False))
            rows.setdefault(f"API, {args.texts} clients at once", []).append(over_the_api(server.port, texts, concurrent=True))
        batched = statistics.median(rows.get(f"in-process score, {args.texts} windows per pass", [1.0]))
        print(f"{args.texts} texts of {args.tokens} tokens (the GPL-3), embedded model, torch engine; median of {args.repeats} interleaved runs\n")
        print(f"  {'setup':<44} {'tokens scored/s':>16} {'vs in-process batched':>22}")
        for name, values in rows.items():
            print(f"  {name:<44} {statistics.median(values):>16.0f} {statistics.median(values) / batched:>21.2f}x")

        from lm_eval.models.huggingface import HFLM
        from lm_eval.models.openai_completions import LocalCompletionsAPI

        loglikelihood, rolling = lm_eval_requests(args.lm_eval_requests)
        # lm-eval's HF backend on the model as transformers loads it (plain
        # nn.Linear: what its users run), and once on livepp's model, whose
        # linear layers are packed for oneDNN (livepp/engines/torch/packed.py).
        plain = load_model(pack=False)
        # 514: lm-eval's API models roll windows of max_length - 2 predicted tokens, its HF backend of max_length.
        setups = {
            "its HF backend, in-process (batch 1)": HFLM(pretrained=plain.model, tokenizer=plain.tokenizer, backend="causal",
                                                         max_length=512, batch_size=1),
            "its HF backend, in-process (batch 8)": HFLM(pretrained=plain.model, tokenizer=plain.tokenizer, backend="causal",
                                                         max_length=512, batch_size=8),
            "its HF backend on livepp's packed model (b 1)": HFLM(pretrained=loaded.model, tokenizer=loaded.tokenizer,
                                                                  backend="causal", max_length=512, batch_size=1),
            "local-completions, num_concurrent=1": LocalCompletionsAPI(
                base_url=f"http://127.0.0.1:{server.port}/v1/completions", model=MODEL, tokenizer_backend="remote", max_length=514,
                num_concurrent=1, max_retries=1),
            "local-completions, num_concurrent=8": LocalCompletionsAPI(
                base_url=f"http://127.0.0.1:{server.port}/v1/completions", model=MODEL, tokenizer_backend="remote", max_length=514,
                num_concurrent=8, max_retries=1),
            "local-completions, batch_size=8": LocalCompletionsAPI(
                base_url=f"http://127.0.0.1:{server.port}/v1/completions", model=MODEL, tokenizer_backend="remote", max_length=514,
                batch_size=8, max_retries=1),
        }
        for lm in setups.values():
            lm.loglikelihood(loglikelihood[:2], disable_tqdm=True)  # warm-up (the remote tokenizer's first request included)
        runs: dict[str, list[tuple[float, float]]] = {name: [] for name in setups}
        outs = {}
        for _ in range(max(1, args.repeats)):  # interleaved, so a drift of the machine's speed hits every setup alike
            for name, lm in setups.items():
                ll_s, ll = timed(lambda lm=lm: lm.loglikelihood(loglikelihood, disable_tqdm=True))
                rolling_s, rolled = timed(lambda lm=lm: lm.loglikelihood_rolling(rolling, disable_tqdm=True))
                runs[name].append((ll_s, rolling_s))
                outs[name] = (ll, rolled)
        parts = {name: (statistics.median(a for a, _ in r), statistics.median(b for _, b in r)) for name, r in runs.items()}
        times = {name: statistics.median(a + b for a, b in r) for name, r in runs.items()}
        print(f"\nlm-evaluation-harness: {len(loglikelihood)} loglikelihood requests + 1 loglikelihood_rolling document (6000 characters); "
              f"median of {max(1, args.repeats)} interleaved runs")
        print(f"  {'setup':<46} {'in all':>8} {'loglikelihood':>14} {'rolling':>8}")
        base = "its HF backend, in-process (batch 1)"
        for name, seconds in times.items():
            print(f"  {name:<46} {seconds:>6.2f} s {parts[name][0]:>12.2f} s {parts[name][1]:>6.2f} s  "
                  f"({times[base] / seconds:.2f}x the HF backend's speed at batch 1)")
        hf_out = outs[base]
        for name in [n for n in setups if n.startswith("local")]:
            out = outs[name]
            worst = max(abs(a[0] - b[0]) / max(1.0, abs(a[0])) for a, b in zip(hf_out[0], out[0]))
            print(f"  {name}: largest relative difference of a loglikelihood from HF's {worst:.1e}; rolling: "
                  f"{abs(hf_out[1][0] - out[1][0]) / abs(hf_out[1][0]):.1e}")
    finally:
        server.stop()


if __name__ == "__main__":
    main()

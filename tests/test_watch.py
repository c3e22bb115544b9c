"""`livepp watch` and `generate --remote --proxy`: proxy-model PPL of a text
stream, scored incrementally; the reference is `livepp score` on the whole text."""

from __future__ import annotations

import json
import random
import threading
import time

import pytest
from click.testing import CliRunner
from hypothesis import given, settings, strategies as st

from livepp.cli.main import main
from livepp.core.params import GenerationParams
from livepp.engines.torch.engine import TorchEngine
from livepp.engines.torch.models import LoadedModel
from livepp.engines.torch.proxy import GrowingText, ProxyStream, decode_chunks

PROMPT = "Explain, step by step, why ice floats."
TEXT = ("Ice floats because it is less dense than liquid water.\n\nStep 1: when water freezes, its molecules "
        "form a hexagonal lattice held by hydrogen bonds, which keeps them further apart.\n\nStep 2: so a litre of ice "
        "weighs about 917 g — less than a litre of water (≈1000 g). Naïve intuition says solids sink; water is the "
        "exception 🧊, and lakes freeze from the top down.")


def cli(decoder, *args, input=None):
    r = CliRunner().invoke(main, list(args), input=input, obj={"engine": TorchEngine(decoder)})
    assert r.exit_code == 0, r.output
    return [json.loads(line) for line in r.stdout.splitlines() if line.strip()]


def random_byte_chunks(text: str, seed: int) -> list[bytes]:
    """Random cuts of the UTF-8 bytes: some split a word, a token or a multi-byte character."""
    data = text.encode("utf-8")
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, len(data)), len(data) // 6))
    # Make sure a multi-byte character is split: cut inside "—" and the emoji.
    for char in ("—", "🧊"):
        at = data.index(char.encode("utf-8")) + 1
        cuts = sorted({*cuts, at})
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)])]


@settings(max_examples=150, deadline=None)
@given(text=st.lists(st.sampled_from(list("ab c\n .,'s1é東🧊\t") + ["Step 1:", "ing", "'ll", "  ", "\n\n"]), min_size=1, max_size=30).map("".join),
       cuts=st.lists(st.integers(0, 60), max_size=12), chat=st.booleans())
def test_growing_text_releases_exactly_the_whole_texts_tokens(loaded, text, cuts, chat):
    tok = loaded.tokenizer
    prefix = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False) if chat else "Q: hi"
    growing = GrowingText(tok, prefix, add_special_tokens=not chat)
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    released = []
    for a, b in zip(bounds, bounds[1:]):
        released += growing.feed(text[a:b])
    released += growing.finish()
    assert [i for i, _ in released] == [int(i) for i in tok(prefix + text, add_special_tokens=not chat)["input_ids"]]


@pytest.mark.model
@pytest.mark.parametrize("seed", [0, 1])
def test_watch_in_random_chunks_equals_score_on_the_whole_text(decoder, loaded, seed):
    reference = cli(decoder, "score", "--prompt", PROMPT, "--target", TEXT, "--chat", "--json")[0]
    stream = ProxyStream(loaded, decode_chunks(random_byte_chunks(TEXT, seed)), GenerationParams(top_logprobs=0), prompt=PROMPT, chat=True)
    records = list(stream)
    assert [r.token_id for r in records] == [t["token_id"] for t in reference["tokens"]]
    assert max(abs(r.logprob - t["logprob"]) for r, t in zip(records, reference["tokens"])) <= 1e-4
    assert max(abs(r.entropy - t["entropy"]) for r, t in zip(records, reference["tokens"])) <= 1e-4
    assert "".join(r.text for r in records) == TEXT
    assert stream.finish_reason == "eos"


@pytest.mark.model
def test_the_watch_command_from_standard_input_and_a_file_being_written(decoder, tmp_path):
    reference = cli(decoder, "score", "--prompt", PROMPT, "--target", TEXT, "--json")[0]
    events = cli(decoder, "watch", "--prompt", PROMPT, "--json", input=TEXT.encode("utf-8"))
    tokens = [e for e in events if e["type"] == "token"]
    assert [t["token_id"] for t in tokens] == [t["token_id"] for t in reference["tokens"]]
    assert max(abs(a["logprob"] - b["logprob"]) for a, b in zip(tokens, reference["tokens"])) <= 1e-4
    assert events[0]["engine"] == "proxy" and events[-1]["type"] == "end" and events[-1]["reason"] == "eos"
    assert events[-1]["ppl"] == pytest.approx(reference["ppl"], rel=1e-4)

    # A file that is still being written: watch --follow reads it as it grows.
    path = tmp_path / "answer.txt"
    path.write_bytes(b"")
    pieces = random_byte_chunks(TEXT, 7)

    def writer() -> None:
        with path.open("ab") as f:
            for piece in pieces:
                f.write(piece)
                f.flush()
                time.sleep(0.01)

    thread = threading.Thread(target=writer)
    thread.start()
    followed = cli(decoder, "watch", str(path), "--prompt", PROMPT, "--follow", "--idle", "1.5", "--json")
    thread.join()
    assert [e["token_id"] for e in followed if e["type"] == "token"] == [t["token_id"] for t in reference["tokens"]]
    assert followed[-1]["ppl"] == pytest.approx(reference["ppl"], rel=1e-4)


@pytest.mark.model
def test_a_policy_stop_stops_reading(decoder, loaded):
    read = []

    def source():
        for word in (TEXT + " ") * 20:
            read.append(word)
            yield word

    events = cli(decoder, "watch", "--prompt", PROMPT, "--json", "--policy", "early-stop:threshold=1.5,metric=ppl,min_tokens=4",
                 input=TEXT.encode())
    assert events[-1]["reason"] == "policy" and events[-1]["n_tokens"] == 4
    from livepp.core.monitor import Monitor
    from livepp.core.policies import parse_policy

    stream = ProxyStream(loaded, source(), GenerationParams(top_logprobs=0), prompt=PROMPT)
    result = Monitor(policies=[parse_policy("early-stop:threshold=1.5,metric=ppl,min_tokens=4")]).run(stream)
    assert result.end.reason == "policy" and result.end.n_tokens == 4
    assert len(read) < 200, "the source was read on after the stop"


def tiny_model(loaded) -> LoadedModel:
    """A two-layer random Llama with the real tokenizer: the 20k-token scaling
    test is about the scorer's bookkeeping, not the weights."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(loaded.tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    return LoadedModel(LlamaForCausalLM(config).eval(), loaded.tokenizer, "tiny-random-llama", "test")


@pytest.mark.model
def test_memory_and_time_per_token_stay_flat_over_a_20k_token_stream(loaded):
    model = tiny_model(loaded)
    rng = random.Random(3)
    words = ["river", "stone", "light", "seven", "under", "quietly", "the", "of", "and", "a", "mountain", "café", "42,", "then."]
    text = " ".join(rng.choice(words) for _ in range(17000))
    stream = ProxyStream(model, (text[i:i + 400] for i in range(0, len(text), 400)), GenerationParams(top_logprobs=0, confidence_k=0),
                         max_length=512, stride=256)
    stamps, caches, tails = [], [], []
    for record in stream:
        stamps.append(time.perf_counter())
        if len(stamps) % 500 == 0:
            caches.append(stream.scorer.cache.get_seq_length())
            tails.append(len(stream.text.tail))
    n = len(stamps)
    assert n >= 20000
    assert max(caches) <= 512 and max(tails) < 2000  # nothing grows with the stream
    # Every token is fed once, plus each window's re-read context (256 tokens
    # per 256 new ones): no rescoring from the start.
    windows = (n + 1 - 512) // 256 + 1
    assert stream.scorer.forward_tokens <= n + 1 + windows * 256
    quarter = n // 4
    first = (stamps[quarter] - stamps[0]) / quarter
    last = (stamps[-1] - stamps[-quarter]) / quarter
    assert last < 1.6 * first, f"time per token grew from {first * 1e6:.0f} to {last * 1e6:.0f} µs"


def test_buffered_text_hands_over_the_backlog_at_once_and_raises_the_sources_error():
    from livepp.engines.torch.proxy import BufferedText

    release = threading.Event()

    def source():
        yield "a"
        release.wait(10)
        yield from ["b", "c", "d"]
        raise OSError("connection reset")

    text = BufferedText(source())
    assert next(text) == "a"
    release.set()
    time.sleep(0.2)  # b, c, d arrive while nobody reads
    assert next(text) == "bcd"
    with pytest.raises(OSError, match="connection reset"):
        next(text)


@pytest.mark.model
def test_watch_over_the_websocket_equals_score_and_can_be_cancelled(decoder):
    from websockets.sync.client import connect

    from test_server import RunningServer

    reference = cli(decoder, "score", "--prompt", PROMPT, "--target", TEXT, "--chat", "--json")[0]
    server = RunningServer(decoder)
    try:
        with connect(f"ws://127.0.0.1:{server.port}/ws") as ws:
            ws.send(json.dumps({"type": "watch", "id": "w1", "prompt": PROMPT, "chat": True, "text": TEXT[:7]}))
            for piece in [TEXT[i:i + 13] for i in range(7, len(TEXT), 13)]:
                ws.send(json.dumps({"type": "text", "id": "w1", "text": piece}))
            ws.send(json.dumps({"type": "text", "id": "w1", "done": True}))
            events = []
            while not events or events[-1]["type"] != "end":
                events.append(json.loads(ws.recv(timeout=120)))
            tokens = [e for e in events if e["type"] == "token"]
            assert [t["token_id"] for t in tokens] == [t["token_id"] for t in reference["tokens"]]
            assert max(abs(a["logprob"] - b["logprob"]) for a, b in zip(tokens, reference["tokens"])) <= 1e-4
            assert events[-1]["reason"] == "eos" and events[-1]["ppl"] == pytest.approx(reference["ppl"], rel=1e-4)

            ws.send(json.dumps({"type": "watch", "id": "w2", "prompt": PROMPT, "text": "Ice is"}))
            ws.send(json.dumps({"type": "cancel", "id": "w2"}))
            end = None
            while end is None:
                e = json.loads(ws.recv(timeout=60))
                end = e if e["type"] == "end" else None
            assert end["reason"] == "cancelled"
            ws.send(json.dumps({"type": "text", "id": "nope", "text": "x"}))
            assert json.loads(ws.recv(timeout=30))["code"] == "unknown_id"
    finally:
        server.stop()


@pytest.mark.model
def test_watch_refuses_bad_input_before_it_starts(decoder, tmp_path):
    for args, message in ((["watch", str(tmp_path / "missing.txt"), "--json"], "cannot read"),
                          (["watch", "--chat", "--json"], "--chat needs --prompt"),
                          (["watch", "-", "--follow"], "--follow is for a FILE")):
        r = CliRunner().invoke(main, args, input=b"text", obj={"engine": TorchEngine(decoder)})
        assert r.exit_code == 2 and message in r.output, (args, r.output)
        assert '"type": "start"' not in r.stdout


@pytest.mark.model
def test_a_websocket_watch_and_two_generations_share_the_batchs_forward_passes(decoder):
    """The watched text's tokens are fed as a row of the continuous batch, in
    the same forward passes as two generations' decode steps; each of the
    three equals its run alone."""
    from websockets.sync.client import connect

    from test_continuous_batching import alone, tokens
    from test_server import RunningServer, events_until_end, send

    reference = cli(decoder, "score", "--prompt", PROMPT, "--target", TEXT, "--chat", "--json")[0]
    server = RunningServer(decoder, max_batch=4)
    params = {"max_new_tokens": 24, "ignore_eos": True}
    prompts = ["Tell me about owls.", "Write a haiku about rain."]
    try:
        with connect(f"ws://127.0.0.1:{server.port}/ws") as ws:
            send(ws, type="watch", id="w", prompt=PROMPT, chat=True, text=TEXT[:20])
            for k, prompt in enumerate(prompts):
                send(ws, type="generate", id=f"g{k}", prompt=prompt, params=params)
            for i in range(20, len(TEXT), 24):
                send(ws, type="text", id="w", text=TEXT[i:i + 24])
                time.sleep(0.02)
            send(ws, type="text", id="w", done=True)
            events: dict[str, list] = {"w": [], "g0": [], "g1": []}
            while any(not v or v[-1]["type"] not in ("end", "error") for v in events.values()):
                e = json.loads(ws.recv(timeout=300))
                events[e["id"]].append(e)
        sizes = list(server.server.scheduler.batch_sizes)
    finally:
        server.stop()
    # Steps in which the watch fed text and both generations decoded.
    assert sizes.count(3) >= 3, f"the watch and the generations should have stepped together: {sizes}"
    watched = [e for e in events["w"] if e["type"] == "token"]
    assert [t["token_id"] for t in watched] == [t["token_id"] for t in reference["tokens"]]
    assert max(abs(a["logprob"] - b["logprob"]) for a, b in zip(watched, reference["tokens"])) <= 1e-4
    assert events["w"][-1]["reason"] == "eos"
    for k, prompt in enumerate(prompts):
        got_ids, got_lps = tokens(events[f"g{k}"])
        want_ids, want_lps = alone(decoder, prompt, params)
        assert got_ids == want_ids and max(abs(a - b) for a, b in zip(got_lps, want_lps)) <= 1e-4

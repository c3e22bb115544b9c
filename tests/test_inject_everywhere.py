"""`inject` on every local engine and path: rows of a torch batch (`generate
P1 P2 -n N`), DeepConf traces, the service's continuous batch (websocket and
`/v1` with `extra_body`) and the llama.cpp engine. The reference of a row
that injects is a plain run whose prompt ends with the injected text (and a
teacher-forced pass); the other rows of the batch equal their runs alone."""

from __future__ import annotations

import math
import threading

import pytest
import torch

from livepp.core.batch_monitor import MonitoredBatch
from livepp.core.monitor import Monitor
from livepp.core.params import GenerationParams
from livepp.core.policies import Inject
from livepp.engines.torch.engine import TorchEngine

pytestmark = pytest.mark.model

PROMPTS = ["What is 17 times 3?", "Name three colours."]
TEXT = "\nLet me check step by step:"
N = 16


def inject() -> Inject:
    return Inject(TEXT, when="ppl>1.0001", min_tokens=4)


def check_injected_row(tokens, prompt_ids, open_plain, n=N):
    """Tokens after the injection equal a plain run from prompt + tokens
    before + the injected text; the injected tokens are in no statistic."""
    injected = [t for t in tokens if t.injected]
    assert "".join(t.text for t in injected) == TEXT
    at = tokens.index(injected[0])
    before, after = tokens[:at], tokens[at + len(injected):]
    assert len(before) == 4 and len(after) == n - 4
    plain_ids = list(prompt_ids) + [t.token_id for t in before + injected]
    plain = Monitor().run(open_plain(plain_ids, GenerationParams(max_new_tokens=n - 4, ignore_eos=True))).tokens
    assert [t.token_id for t in after] == [t.token_id for t in plain]
    assert max(abs(a.logprob - b.logprob) for a, b in zip(after, plain)) <= 1e-4
    counted = [t for t in tokens if not t.injected]
    assert [t.index for t in counted] == list(range(n))
    assert counted[-1].ppl == pytest.approx(math.exp(-sum(t.logprob for t in counted) / n), rel=1e-9)
    return plain_ids


def check_alone(tokens, prompt_ids, open_plain, n=N):
    alone = Monitor().run(open_plain(list(prompt_ids), GenerationParams(max_new_tokens=n, ignore_eos=True))).tokens
    assert not any(t.injected for t in tokens)
    assert [t.token_id for t in tokens] == [t.token_id for t in alone]
    assert max(abs(a.logprob - b.logprob) for a, b in zip(tokens, alone)) <= 1e-4


def monitored_rows(engine, policies_of):
    params = [GenerationParams(max_new_tokens=N, ignore_eos=True)] * 2
    batch = MonitoredBatch(engine.open_batch(PROMPTS, params), params, model=engine.name, policies=policies_of)
    rows: dict[int, list] = {0: [], 1: []}
    for i, event in batch:
        if event.type == "token":
            rows[i].append(event)
    return batch, rows


def test_rows_of_a_torch_batch_each_inject_their_own(decoder):
    engine = TorchEngine(decoder)
    batch, rows = monitored_rows(engine, lambda i: [inject()] if i == 0 else [])
    plain = lambda ids, p: decoder.stream(ids, p)  # noqa: E731
    check_injected_row(rows[0], batch.stream.prompt_token_ids[0], plain)
    check_alone(rows[1], batch.stream.prompt_token_ids[1], plain)


def test_think_traces_inject_and_their_logprobs_equal_a_teacher_forced_pass(decoder):
    from livepp.car.deepconf import think

    events: dict[int, list] = {}

    class Collect:
        def emit_sample(self, sample, event):
            events.setdefault(sample, []).append(event)

    think("What is 17 + 25?", engine=decoder, traces=2, mode="offline", group=4, eta=100, sinks=[Collect()],
          params=GenerationParams(max_new_tokens=N, temperature=0.8, seed=3), policies=lambda: [inject()])
    for trace in events.values():
        tokens = [e for e in trace if e.type == "token"]
        assert "".join(t.text for t in tokens if t.injected) == TEXT
        ids = list(trace[0].prompt_token_ids) + [t.token_id for t in tokens]
        n_prompt = len(trace[0].prompt_token_ids)
        with torch.inference_mode():
            teacher = torch.log_softmax(decoder.model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
        want = [teacher[n_prompt + k - 1, t.token_id].item() for k, t in enumerate(tokens)]
        assert max(abs(a - t.logprob) for a, t in zip(want, tokens)) <= 1e-4
        assert trace[-1].n_tokens == sum(not t.injected for t in tokens) == N


def test_llamacpp_single_stream_and_batch_rows_inject():
    from livepp.engines.llamacpp import LlamaCppEngine

    # exact: prompts token by token, so the plain run's prompt (with the
    # injected text in it) is evaluated as the injection was.
    engine = LlamaCppEngine(exact=True)
    try:
        plain = lambda ids, p: engine.open(ids, p)  # noqa: E731
        single = Monitor(policies=[inject()]).run(engine.open(PROMPTS[0], GenerationParams(max_new_tokens=N, ignore_eos=True)))
        check_injected_row(single.tokens, single.events[0].prompt_token_ids, plain)
        batch, rows = monitored_rows(engine, lambda i: [inject()] if i == 1 else [])
        check_injected_row(rows[1], batch.stream.prompt_token_ids[1], plain)
        check_alone(rows[0], batch.stream.prompt_token_ids[0], plain)
    finally:
        engine.close()


def test_the_continuous_batch_injects_into_one_row_over_the_websocket_and_v1(decoder):
    import openai
    from websockets.sync.client import connect

    from test_server import RunningServer, events_until_end, send

    s = RunningServer(decoder, max_batch=4)
    spec = f"inject:when=ppl>1.0001,min_tokens=4,text={TEXT}"
    params = {"max_new_tokens": N, "ignore_eos": True}
    out: dict = {}
    start = threading.Event()

    def client(key: str, prompt: str, policies: list) -> None:
        with connect(s.url) as ws:
            start.wait(30)
            send(ws, type="generate", id=key, prompt=prompt, params=params, policies=policies)
            out[key] = events_until_end(ws, key, timeout=300)

    try:
        threads = [threading.Thread(target=client, args=("a", PROMPTS[0], [spec])), threading.Thread(target=client, args=("b", PROMPTS[1], []))]
        for t in threads:
            t.start()
        start.set()
        for t in threads:
            t.join(300)
        assert s.server.scheduler.peak_batch == 2
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{s.port}/v1", api_key="unused", max_retries=0, timeout=300)
        chunks = list(c.chat.completions.create(model=decoder.loaded.name, messages=[{"role": "user", "content": PROMPTS[0]}],
                                                max_tokens=N, temperature=0, stream=True, extra_body={"livepp": {"policies": [spec]}}))
    finally:
        s.stop()
    plain = lambda ids, p: decoder.stream(ids, p)  # noqa: E731

    class Token:  # the JSON events as attributes
        def __init__(self, e):
            self.__dict__.update(e)
            self.injected = e.get("injected", False)

    a = [Token(e) for e in out["a"] if e["type"] == "token"]
    check_injected_row(a, out["a"][0]["prompt_token_ids"], plain)
    check_alone([Token(e) for e in out["b"] if e["type"] == "token"], out["b"][0]["prompt_token_ids"], plain)
    # /v1: the same row, its injected text in the content and marked in livepp's keys
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == out["a"][-1]["text"]
    marked = [ch.choices[0].model_extra["livepp"] for ch in chunks if ch.choices and (ch.choices[0].model_extra.get("livepp") or {}).get("injected")]
    assert [m["token_id"] for m in marked] == [t.token_id for t in a if t.injected]

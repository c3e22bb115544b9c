"""A request fails alone: what one request does to its own row (a degenerate
temperature, a sampler that raises) never touches the other rows of the
continuous batch. Real server, real embedded model, the openai SDK."""

from __future__ import annotations

import threading

import openai
import pytest

from test_server import RunningServer

pytestmark = pytest.mark.model

MODEL = "SmolLM2-135M-Instruct"
OTHERS = [("Tell me about owls.", {}), ("Write a haiku about rain.", {"temperature": 0.8, "seed": 3}),
          ("Name three colours.", {"temperature": 0.7, "top_p": 0.9, "seed": 11})]


def ask(client: openai.OpenAI, prompt: str, extra: dict, out: dict, key: str, start: threading.Event | None = None) -> None:
    if start is not None:
        start.wait(30)
    try:
        chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, logprobs=1, stream=True,
                                                **({"temperature": 0} | extra)))
        out[key] = chunks
    except openai.APIError as exc:
        out[key] = exc


def ids_and_logprobs(chunks: list) -> tuple[list[int], list[float]]:
    tokens = [c.choices[0].model_extra["livepp"] for c in chunks if c.choices and c.choices[0].model_extra.get("livepp", {}).get("token_id") is not None]
    return [t["token_id"] for t in tokens], [t["logprob"] for t in tokens]


def run_together(client: openai.OpenAI, odd: tuple[str, dict]) -> dict:
    out: dict = {}
    start = threading.Event()
    jobs = [(*OTHERS[i], f"o{i}") for i in range(3)] + [(*odd, "odd")]
    threads = [threading.Thread(target=ask, args=(client, p, e, out, k, start)) for p, e, k in jobs]
    for t in threads:
        t.start()
    start.set()
    for t in threads:
        t.join(300)
    return out


@pytest.fixture(scope="module")
def served(decoder):
    s = RunningServer(decoder, max_batch=8)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{s.port}/v1", api_key="unused", max_retries=0, timeout=300)
    alone = {}
    for i, (prompt, extra) in enumerate(OTHERS):
        ask(client, prompt, extra, alone, f"o{i}")
    yield s, client, alone
    s.stop()


def assert_others_unchanged(together: dict, alone: dict) -> None:
    for i in range(3):
        chunks = together[f"o{i}"]
        assert not isinstance(chunks, Exception), chunks
        assert chunks[-1].choices[0].finish_reason in ("length", "stop")
        want_ids, want_lps = ids_and_logprobs(alone[f"o{i}"])
        got_ids, got_lps = ids_and_logprobs(chunks)
        assert got_ids == want_ids and len(got_ids) > 0
        assert max(abs(a - b) for a, b in zip(got_lps, want_lps)) <= 1e-4


def test_a_temperature_of_1e_300_is_greedy_and_the_other_rows_are_unchanged(served):
    server, client, alone = served
    together = run_together(client, ("What is 2+2?", {"temperature": 1e-300}))
    assert server.server.scheduler.peak_batch >= 3
    assert_others_unchanged(together, alone)
    greedy: dict = {}
    ask(client, "What is 2+2?", {"temperature": 0}, greedy, "g")
    assert ids_and_logprobs(together["odd"])[0] == ids_and_logprobs(greedy["g"])[0]  # below 1e-5: greedy


def test_a_sampler_that_raises_ends_only_its_request(served, monkeypatch):
    import livepp.engines.torch.sampling as sampling

    real = sampling.sample_token

    def flaky(logits, params, generator=None):
        if params.seed == 666:
            raise RuntimeError("the sampler broke")
        return real(logits, params, generator)

    monkeypatch.setattr(sampling, "sample_token", flaky)
    server, client, alone = served
    together = run_together(client, ("What is 2+2?", {"temperature": 0.5, "seed": 666}))
    failed = together["odd"]
    assert isinstance(failed, openai.InternalServerError) and "the sampler broke" in failed.message
    assert failed.body["code"] == "internal"
    assert_others_unchanged(together, alone)
    assert not server.server.jobs  # every slot is free again

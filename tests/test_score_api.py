"""Scoring as a service: prompt logprobs over the OpenAI API, the contract
lm-evaluation-harness's `local-completions` relies on, vLLM's
`prompt_logprobs` and tokenizer endpoints, against a real `livepp serve`
with the real embedded model. References: `livepp score` (itself checked
against lm-eval's HF backend) and lm-eval's HF backend in-process."""

from __future__ import annotations

import json
import threading
import urllib.request
from pathlib import Path

import openai
import pytest

from livepp.scoring.teacher_forced import score_text
from test_server import RunningServer

pytestmark = pytest.mark.model

MODEL = "SmolLM2-135M-Instruct"
GPL = Path("/usr/share/common-licenses/GPL-3")
TEXT = "The quick brown fox jumps over the lazy dog. It was a sunny day, and the park was full of children playing."


@pytest.fixture(scope="module")
def server(decoder):
    s = RunningServer(decoder, max_batch=8, prefill_chunk=64, max_new_tokens_cap=64)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="unused", max_retries=0, timeout=300)


def post(server, path: str, body: dict) -> dict:
    req = urllib.request.Request(f"http://127.0.0.1:{server.port}{path}", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def chat_ids(tok) -> list[int]:
    ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=True)
    return list(ids if isinstance(ids, list) else ids["input_ids"])


def test_the_echo_recipe_equals_livepp_score_token_by_token(client, loaded, server):
    long_text = GPL.read_text()[:1200] if GPL.is_file() else TEXT * 8
    for text in (TEXT, long_text):  # one chunk, and several chunks of 64 tokens
        r = client.completions.create(model=MODEL, prompt=text, echo=True, logprobs=0, max_tokens=0)
        choice = r.choices[0]
        ref = score_text(loaded, text)
        lp = choice.logprobs
        assert choice.text == text and choice.finish_reason == "length" and r.usage.completion_tokens == 0
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None and lp.text_offset[0] == 0
        assert "".join(lp.tokens) == text and lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
        assert len(lp.token_logprobs) - 1 == ref.n_tokens
        assert max(abs(a - b.logprob) for a, b in zip(lp.token_logprobs[1:], ref.tokens)) <= 1e-4
        # logprobs=0: each position's top_logprobs holds just the given token
        assert all(list(top.values()) == [tlp] for top, tlp in zip(lp.top_logprobs[1:], lp.token_logprobs[1:]))
    assert server.server.scheduler.largest_score_chunk == 64  # one prefill chunk's positions at a time, never the whole text


def test_prompt_logprobs_in_vllms_shape_equal_livepp_score(client, loaded):
    r = client.completions.create(model=MODEL, prompt=TEXT, max_tokens=1, temperature=0, extra_body={"prompt_logprobs": 2})
    entries = r.choices[0].model_extra["prompt_logprobs"]
    ref = score_text(loaded, TEXT)
    ids = loaded.tokenizer(TEXT)["input_ids"]
    assert entries[0] is None and len(entries) == len(ids)
    for pos, (entry, want) in enumerate(zip(entries[1:], ref.tokens), start=1):
        given = entry[str(ids[pos])]
        assert abs(given["logprob"] - want.logprob) <= 1e-4
        assert given["decoded_token"] == loaded.tokenizer.decode([ids[pos]])
        ranks = sorted(v["rank"] for v in entry.values())
        if given["rank"] <= 2:  # among the top 2: two entries, ranked by logprob
            assert ranks == [1, 2] and given["rank"] == 1 + sum(v["logprob"] > given["logprob"] for v in entry.values())
        else:  # the top 2 and the given token, ranked in the whole vocabulary
            assert ranks == [1, 2, given["rank"]] and all(v["logprob"] >= given["logprob"] for v in entry.values())
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=1, temperature=0,
                                          extra_body={"prompt_logprobs": 0})
    chat_entries = chat.choices[0].model_extra["prompt_logprobs"]
    assert chat_entries[0] is None and len(chat_entries) == len(chat_ids(loaded.tokenizer))


def test_the_four_prompt_forms(client, loaded):
    ids = loaded.tokenizer(TEXT)["input_ids"]
    other = "A second text, shorter."
    other_ids = loaded.tokenizer(other)["input_ids"]
    ref = {TEXT: [t.logprob for t in score_text(loaded, TEXT).tokens], other: [t.logprob for t in score_text(loaded, other).tokens]}
    forms = [(TEXT, [TEXT]), ([TEXT, other], [TEXT, other]), (ids, [TEXT]), ([ids, other_ids], [TEXT, other])]
    for prompt, texts in forms:
        r = client.completions.create(model=MODEL, prompt=prompt, echo=True, logprobs=1, max_tokens=0)
        assert [c.index for c in r.choices] == list(range(len(texts)))
        for choice, text in zip(r.choices, texts):
            assert choice.text == text
            got = choice.logprobs.token_logprobs[1:]
            assert max(abs(a - b) for a, b in zip(got, ref[text])) <= 1e-4 and len(got) == len(ref[text])


def test_a_sampled_token_outside_the_top_k_is_in_top_logprobs(client):
    r = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=24, temperature=1.5, seed=3, logprobs=1)
    lp = r.choices[0].logprobs
    assert all(len(top) in (1, 2) for top in lp.top_logprobs)
    assert all(tlp in top.values() for top, tlp in zip(lp.top_logprobs, lp.token_logprobs))
    assert any(len(top) == 2 for top in lp.top_logprobs)  # at this temperature some token is not the most likely


def test_scoring_and_generating_in_one_batch_each_equal_their_runs_alone(client, loaded, server):
    long_text = (GPL.read_text() if GPL.is_file() else TEXT * 20)[:2500]
    gen = dict(model=MODEL, prompt="Write about the sea.", max_tokens=24, temperature=0, logprobs=0, extra_body={"ignore_eos": True})
    alone_gen = client.completions.create(**gen).choices[0].logprobs.token_logprobs
    out: dict = {}
    start = threading.Event()

    def run(key, **kwargs):
        start.wait(30)
        out[key] = client.completions.create(**kwargs).choices[0].logprobs.token_logprobs

    threads = [threading.Thread(target=run, args=("gen",), kwargs=gen),
               threading.Thread(target=run, args=("score",), kwargs=dict(model=MODEL, prompt=long_text, echo=True, logprobs=0, max_tokens=0))]
    for t in threads:
        t.start()
    start.set()
    for t in threads:
        t.join(300)
    assert max(abs(a - b) for a, b in zip(out["gen"], alone_gen)) <= 1e-4 and len(out["gen"]) == 24
    ref = score_text(loaded, long_text)
    assert max(abs(a - b.logprob) for a, b in zip(out["score"][1:], ref.tokens)) <= 1e-4


def test_tokenizer_endpoints_in_vllms_shape(server, loaded):
    tok = loaded.tokenizer
    assert post(server, "/tokenize", {"prompt": TEXT, "add_special_tokens": False})["tokens"] == tok(TEXT, add_special_tokens=False)["input_ids"]
    chat = post(server, "/tokenize", {"messages": [{"role": "user", "content": "Hi"}]})
    assert chat["tokens"] == chat_ids(tok)
    assert chat["count"] == len(chat["tokens"]) and chat["max_model_len"] == loaded.context_length
    assert post(server, "/detokenize", {"tokens": chat["tokens"]})["prompt"] == tok.decode(chat["tokens"])
    with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/tokenizer_info") as r:
        info = json.loads(r.read())
    assert info["eos_token"] == tok.eos_token and info["chat_template"] == tok.chat_template


@pytest.fixture(scope="module")
def harness(loaded):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=loaded.model, tokenizer=loaded.tokenizer, backend="causal", max_length=512, batch_size=1)


def _requests(kind, args_list):
    from lm_eval.api.instance import Instance

    return [Instance(request_type=kind, doc={}, arguments=args, idx=i) for i, args in enumerate(args_list)]


PAIRS = [("The capital of France is", " Paris."), ("2 + 2 =", " 4"), ("Question: What colour is the sky?\nAnswer:", " Blue"),
         ("", "Hello world")]


@pytest.mark.parametrize("backend", ["huggingface", "remote"])
def test_lm_eval_local_completions_equals_its_own_hf_backend(server, harness, loaded, tmp_path, backend):
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    options = {"tokenizer": str(tmp_path)} if backend == "huggingface" else {}
    if backend == "huggingface":
        loaded.tokenizer.save_pretrained(tmp_path)
    # lm-eval's API models keep max_length - 1 tokens (one for generation) and roll windows of max_length - 2
    # predicted tokens; its HF backend rolls windows of max_length: 514 here is 512 there.
    api = LocalCompletionsAPI(base_url=f"http://127.0.0.1:{server.port}/v1/completions", model=MODEL, tokenizer_backend=backend,
                              max_length=514, num_concurrent=1, max_retries=1, **options)
    text = (GPL.read_text() if GPL.is_file() else TEXT * 40)[:6000]  # three windows
    pairs = [(c, t) for c, t in PAIRS if c] + [("", "Hello world")]
    want = harness.loglikelihood(_requests("loglikelihood", [p for p in pairs if p[0]]), disable_tqdm=True)
    got = api.loglikelihood(_requests("loglikelihood", [p for p in pairs if p[0]]), disable_tqdm=True)
    for (w, w_greedy), (g, g_greedy) in zip(want, got):
        assert g == pytest.approx(w, rel=1e-4, abs=1e-5) and g_greedy == w_greedy
    [want_rolling] = harness.loglikelihood_rolling(_requests("loglikelihood_rolling", [(text,)]), disable_tqdm=True)
    [got_rolling] = api.loglikelihood_rolling(_requests("loglikelihood_rolling", [(text,)]), disable_tqdm=True)
    assert got_rolling == pytest.approx(want_rolling, rel=1e-4)


def test_the_gateway_passes_scoring_requests_to_its_upstream_and_its_answers_back(server, client):
    from livepp.engines.remote import OpenAIEngine
    from test_remote_parsing import Stub

    gateway = RunningServer(OpenAIEngine(f"http://127.0.0.1:{server.port}/v1", MODEL))
    refusing = Stub(b'{"error": {"message": "echo is not supported", "type": "invalid_request_error", "param": "echo", "code": null}}',
                    status=400)
    strict = RunningServer(OpenAIEngine(refusing.url, MODEL))
    try:
        through = openai.OpenAI(base_url=f"http://127.0.0.1:{gateway.port}/v1", api_key="unused", max_retries=0, timeout=300)
        direct = client.completions.create(model=MODEL, prompt=TEXT, echo=True, logprobs=1, max_tokens=0)
        for stream in (False, True):
            if stream:
                chunks = list(through.completions.create(model=MODEL, prompt=TEXT, echo=True, logprobs=1, max_tokens=0, stream=True))
                got = [lp for c in chunks if c.choices and c.choices[0].logprobs for lp in c.choices[0].logprobs.token_logprobs]
            else:
                got = through.completions.create(model=MODEL, prompt=TEXT, echo=True, logprobs=1, max_tokens=0).choices[0].logprobs.token_logprobs
            assert got == direct.choices[0].logprobs.token_logprobs
        ids = through.completions.create(model=MODEL, prompt=[[1, 2, 3, 4]], echo=True, logprobs=0, max_tokens=0,
                                         extra_body={"prompt_logprobs": 1})
        assert len(ids.choices[0].model_extra["prompt_logprobs"]) == 4
        with pytest.raises(openai.BadRequestError) as refused:
            openai.OpenAI(base_url=f"http://127.0.0.1:{strict.port}/v1", api_key="unused", max_retries=0).completions.create(
                model=MODEL, prompt=TEXT, echo=True, logprobs=0, max_tokens=0)
        assert refused.value.body["param"] == "echo" and "echo is not supported" in refused.value.message
        assert refusing.requests[0]["echo"] is True and "livepp" not in refusing.requests[0]
        assert not gateway.server.jobs and not strict.server.jobs
    finally:
        gateway.stop()
        strict.stop()
        refusing.close()

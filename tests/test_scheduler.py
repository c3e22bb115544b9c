"""The continuous-batching scheduler on the real model, without a server:
chunked prefill of a long prompt between running steps, and a policy stop
that takes a row out of the very next forward pass."""

from __future__ import annotations

import threading

import pytest

from livepp.core.monitor import Monitor
from livepp.core.params import GenerationParams
from livepp.core.policies import EarlyStop
from livepp.engines.torch.engine import TorchEngine
from livepp.engines.scheduler import Scheduler

pytestmark = pytest.mark.model


class ForwardLog:
    """Each forward pass's input shape [rows, new tokens], from a model hook."""

    def __init__(self, model) -> None:
        self.shapes: list[tuple[int, int]] = []
        self.handle = model.base_model.register_forward_pre_hook(self.hook, with_kwargs=True)  # every path runs the base model

    def hook(self, _module, _args, kwargs) -> None:
        self.shapes.append(tuple(kwargs["input_ids"].shape))

    def close(self) -> None:
        self.handle.remove()


def test_a_long_prompt_is_prefilled_in_chunks_between_the_running_rows_steps(decoder):
    engine = TorchEngine(decoder)
    scheduler = Scheduler(engine, max_batch=4, prefill_chunk=64, gather_s=0)
    long_prompt = "Summarise this. " + " ".join(f"Item {i} is a red box." for i in range(60))
    n_long = len(decoder.encode(long_prompt))
    assert n_long > 4 * 64
    params = GenerationParams(max_new_tokens=40, ignore_eos=True)
    log = ForwardLog(decoder.model)
    got: dict[str, list[float]] = {"a": [], "b": []}
    try:
        a = scheduler.open("Write a long essay about the sea.", params)
        first = next(a)
        got["a"].append(first.logprob)
        b = scheduler.open(long_prompt, GenerationParams(max_new_tokens=6))
        t = threading.Thread(target=lambda: got["b"].extend(r.logprob for r in b))
        t.start()
        got["a"].extend(r.logprob for r in a)
        t.join(120)
    finally:
        log.close()
        scheduler.close()
    chunks = [i for i, s in enumerate(log.shapes) if s[0] == 1 and s[1] == 64]
    steps_between = [i for i, s in enumerate(log.shapes) if s == (1, 1) and chunks[0] < i < chunks[-1]]
    assert len(chunks) == n_long // 64 and (1, n_long % 64) in log.shapes[chunks[-1]:]
    # the running row stepped between the chunks: it never waited for the whole prefill
    assert len(steps_between) >= len(chunks) - 1
    # and chunked prefill gives the numbers of a single pass
    alone = Monitor().run(engine.open(long_prompt, GenerationParams(max_new_tokens=6)))
    assert max(abs(x - y) for x, y in zip(got["b"], [t.logprob for t in alone.tokens])) <= 1e-4
    assert len(got["a"]) == 40


def test_a_policy_stop_takes_the_row_out_of_the_next_forward_pass(decoder):
    engine = TorchEngine(decoder)
    scheduler = Scheduler(engine, max_batch=4)
    log = ForwardLog(decoder.model)
    results = {}
    params = GenerationParams(max_new_tokens=30, ignore_eos=True)

    def run(name: str, prompt: str, policies) -> None:
        results[name] = Monitor(policies=policies).run(scheduler.open(prompt, params))

    try:
        threads = [threading.Thread(target=run, args=("stopped", "Write a long essay about the sea.", [EarlyStop(1.0001, metric="ppl", min_tokens=7)])),
                   threading.Thread(target=run, args=("free", "Write a poem about rain.", []))]
        for th in threads:
            th.start()
        for th in threads:
            th.join(120)
    finally:
        log.close()
        scheduler.close()
    stopped, free = results["stopped"].end, results["free"].end
    assert stopped.reason == "policy" and stopped.n_tokens == 7
    assert free.reason == "length" and free.n_tokens == 30
    steps = [s for s in log.shapes if s[1] == 1]
    # one prefill for both (they arrived together), then 6 steps with both rows, then the free row alone
    assert [s[0] for s in steps] == [2] * 6 + [1] * 23


def test_a_scored_prompt_queued_behind_a_generation_is_scored_not_prefilled_with_it(decoder):
    """A scored prompt that arrives with a generation is prefilled alone and
    scored (it used to join the generation's padded prefill, unscored)."""
    from livepp.engines.protocol import ScoreSpec
    from livepp.scoring.teacher_forced import score_ids

    scheduler = Scheduler(TorchEngine(decoder), max_batch=4, gather_s=0.2)
    ids = decoder.tokenizer("The capital of France is Paris.")["input_ids"]
    scores: list = []
    try:
        generation = scheduler.open("Hi!", GenerationParams(max_new_tokens=4, ignore_eos=True))
        scored = scheduler.open(ids, GenerationParams(max_new_tokens=1), score=ScoreSpec(generate=False),
                                on_scores=lambda row, s: scores.extend(s))
        assert list(scored) == [] and len(list(generation)) == 4
    finally:
        scheduler.close()
    want = score_ids(decoder.loaded, ids)
    assert [s.logprob for s in scores] == pytest.approx([t.logprob for t in want.tokens], abs=1e-4)


def test_short_scored_prompts_waiting_together_share_one_forward_pass_and_each_scores_as_alone(decoder):
    """lm-eval's loglikelihood requests with num_concurrent: scored prompts
    that wait together are prefilled and scored in one forward pass (up to a
    chunk's tokens in all), each with its numbers alone; a scored row that
    also generates joins the batch after it."""
    from livepp.engines.protocol import ScoreSpec
    from livepp.scoring.teacher_forced import score_ids

    texts = ["The capital of France is Paris.", "Two plus two is four, and three plus three is six.", "Owls hunt at night.",
             "Water boils at one hundred degrees Celsius at sea level."]
    ids = [decoder.tokenizer(t)["input_ids"] for t in texts]
    scheduler = Scheduler(TorchEngine(decoder), max_batch=8, prefill_chunk=256, gather_s=0.3)
    log = ForwardLog(decoder.model)
    scores: dict[int, list] = {i: [] for i in range(len(texts))}
    try:
        streams = [scheduler.open(ids[i], GenerationParams(max_new_tokens=3, ignore_eos=True),
                                  score=ScoreSpec(first=2 if i == 1 else 1, top=2, generate=i == 3),
                                  on_scores=lambda row, s, i=i: scores[i].extend(s)) for i in range(len(texts))]
        generated = [list(s) for s in streams]
    finally:
        log.close()
        scheduler.close()
    assert log.shapes[0] == (4, max(len(x) for x in ids))  # one forward pass for all four prompts
    assert [len(g) for g in generated] == [0, 0, 0, 3]
    for i, x in enumerate(ids):
        want = score_ids(decoder.loaded, x)
        first = 2 if i == 1 else 1
        assert [s.position for s in scores[i]] == list(range(first, len(x)))
        assert [s.logprob for s in scores[i]] == pytest.approx([t.logprob for t in want.tokens][first - 1:], abs=1e-4)
        assert all(len(s.top) == 2 and s.top[0][1] >= s.logprob - 1e-6 for s in scores[i])
    alone = Monitor().run(decoder.stream(ids[3], GenerationParams(max_new_tokens=3, ignore_eos=True)))
    assert [r.token_id for r in generated[3]] == alone.token_ids
    assert [r.logprob for r in generated[3]] == pytest.approx([t.logprob for t in alone.tokens], abs=1e-4)


def test_requests_one_after_another_wait_for_nobody_and_a_burst_still_shares_a_prefill(decoder):
    """The idle engine's wait for more arrivals (gather_s) is paid in full only
    while requests overlap in time: a lone request that gathered nobody cuts
    it to a fifth, a request arriving while another runs restores it."""
    import time

    scheduler = Scheduler(TorchEngine(decoder), max_batch=4, gather_s=0.6)
    params = GenerationParams(max_new_tokens=1, ignore_eos=True)
    log = ForwardLog(decoder.model)

    def first_token_s(prompt: str) -> float:
        t = time.perf_counter()
        stream = scheduler.open(prompt, params)
        next(stream)
        list(stream)
        return time.perf_counter() - t

    try:
        assert first_token_s("Hello there.") >= 0.6  # the first lone arrival waited for a burst
        assert first_token_s("Hello again.") < 0.4  # it gathered nobody: the next lone request waits a fifth as long
        assert first_token_s("And again.") < 0.4
        log.shapes.clear()
        e, f = scheduler.open("A burst after them.", params), scheduler.open("Its other half.", params)
        list(e), list(f)
        assert log.shapes[0][0] == 2  # the short wait still caught the burst that came after the lone requests
        assert first_token_s("Alone once more.") >= 0.6  # ... which restored the full wait; it gathers nobody
        a = scheduler.open("One burst.", GenerationParams(max_new_tokens=3, ignore_eos=True))
        next(a)  # a runs (it steps when its consumer reads) ...
        b = scheduler.open("Two in it.", params)  # ... when b arrives: requests overlap
        list(a), list(b)
        log.shapes.clear()
        c, d = scheduler.open("The next burst.", params), scheduler.open("Its second.", params)
        list(c), list(d)
    finally:
        log.close()
        scheduler.close()
    assert log.shapes[0][0] == 2, log.shapes  # the burst before turned gathering on again: this one shares one prefill


def test_a_scored_prompt_alone_takes_longer_passes_and_is_scored_a_chunk_at_a_time(decoder, loaded):
    from livepp.engines.protocol import ScoreSpec
    from livepp.engines.torch.continuous import IDLE_SCORE_PASS
    from livepp.scoring.teacher_forced import score_ids

    ids = loaded.tokenizer(" ".join(f"Item {i} is a red box." for i in range(80)))["input_ids"][:600]
    scheduler = Scheduler(TorchEngine(decoder), max_batch=4, prefill_chunk=64, gather_s=0)
    log = ForwardLog(decoder.model)
    got: list = []
    try:
        # alone on the engine: passes of IDLE_SCORE_PASS chunks, the output layer a chunk's positions at a time
        stream = scheduler.open(ids, GenerationParams(max_new_tokens=1), score=ScoreSpec(generate=False),
                                on_scores=lambda row, scores: got.append(scores))
        list(stream)
        alone = list(log.shapes)
        # with a generating row beside it: chunk by chunk, the row stepping in between
        log.shapes.clear()
        a = scheduler.open("Write a long essay about the sea.", GenerationParams(max_new_tokens=30, ignore_eos=True))
        next(a)
        stream = scheduler.open(ids, GenerationParams(max_new_tokens=1), score=ScoreSpec(generate=False), on_scores=lambda row, scores: None)
        list(stream)
        list(a)
        beside = [s for s in log.shapes if s[1] > 1]
    finally:
        log.close()
        scheduler.close()
    big = IDLE_SCORE_PASS * 64
    assert alone == [(1, big)] * (600 // big) + [(1, 600 % big)]
    assert max(len(s) for s in got) <= 64 and [p.position for s in got for p in s] == list(range(1, 600))
    ref = score_ids(loaded, ids, max_length=2048, stride=2048)  # one window: the same positions in one pass
    assert max(abs(p.logprob - r.logprob) for p, r in zip([p for s in got for p in s], ref.tokens)) <= 1e-4
    n_a = len(decoder.encode("Write a long essay about the sea."))
    assert beside == [(1, n_a)] + [(1, 64)] * (600 // 64) + [(1, 600 % 64)]  # the row's prompt, then the scored one's chunks

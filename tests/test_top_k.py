"""The two-stage top-k used for every token's alternatives equals torch.topk."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from livepp.engines.torch.sampling import top_k, top_k_and_argmax


@settings(max_examples=60, deadline=None)
@given(n=st.integers(min_value=1, max_value=70_000), k=st.integers(min_value=1, max_value=80), seed=st.integers(0, 2**31),
       n_inf=st.integers(0, 100), ties=st.booleans())
def test_top_k_equals_torch_topk(n, k, seed, n_inf, ties):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g)
    if ties:
        x = (x * 4).round() / 4  # many equal values
    if n_inf:
        x[torch.randint(0, n, (n_inf,), generator=g)] = -float("inf")
    k = min(k, n)
    values, ids = top_k(x, k)
    want = torch.topk(x, k).values
    assert torch.equal(values, want)
    assert torch.equal(x[ids], values) and len(set(ids.tolist())) == k


@settings(max_examples=80, deadline=None)
@given(rows=st.integers(min_value=1, max_value=4), n=st.integers(min_value=1, max_value=70_000), k=st.integers(min_value=1, max_value=64),
       seed=st.integers(0, 2**31), ties=st.booleans(), nan=st.booleans(), all_inf=st.booleans())
def test_the_argmax_from_block_maxima_is_torchs_first_index_of_the_maximum(rows, n, k, seed, ties, nan, all_inf):
    """Greedy decoding takes this argmax: it must be torch.argmax's token
    exactly, ties (first index), NaN (counted as the maximum) and a row of
    -inf included."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, n, generator=g)
    if ties:
        x = (x * 2).round() / 2  # the maximum repeats, often in several blocks
    if nan:
        x[0, torch.randint(0, n, (1,), generator=g)] = float("nan")
    if all_inf:
        x[-1] = -float("inf")
    values, ids, first = top_k_and_argmax(x, min(k, n))
    assert torch.equal(first, x.argmax(dim=-1))
    assert torch.equal(ids, top_k(x, min(k, n))[1])


def test_statistics_in_two_threads_at_once_each_keep_their_own_scratch():
    """A step's [rows, vocab] scratch is kept by its thread from step to step
    (fresh blocks cost page faults every step): two threads taking statistics
    at once, of different shapes, each get exactly their numbers alone."""
    import threading

    import torch

    from livepp.core.params import GenerationParams
    from livepp.engines.torch import sampling

    params = GenerationParams(max_new_tokens=4, top_logprobs=3, confidence_k=5, entropy=True)
    blocks = [torch.randn(rows, 5000, generator=torch.Generator().manual_seed(rows)) * 4 for rows in (3, 8)]
    want = [sampling.batch_token_stats(b, [params] * len(b), [None] * len(b))[0] for b in blocks]
    bad: list = []

    def run(k: int) -> None:
        for _ in range(200):
            got = sampling.batch_token_stats(blocks[k], [params] * len(blocks[k]), [None] * len(blocks[k]))[0]
            if not ((got == want[k]) | (got.isnan() & want[k].isnan())).all():  # bit for bit; NaN where no value is
                bad.append(k)

    threads = [threading.Thread(target=run, args=(k,)) for k in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert bad == []
    scratch = sampling._WORKSPACE.blocks  # this thread's, reused while the shape allows
    sampling.batch_token_stats(blocks[0], [params] * 3, [None] * 3)
    assert sampling._WORKSPACE.blocks is scratch


def test_the_scratch_serves_inference_mode_and_no_grad_alike():
    """A thread's first statistics in inference mode (the batch's steps), its
    next ones under no_grad (a compiled decoder's), on the same vocabulary."""
    import torch

    from livepp.core.params import GenerationParams
    from livepp.engines.torch import sampling

    params = [GenerationParams(max_new_tokens=1, entropy=True)] * 2
    logits = torch.randn(2, 700, generator=torch.Generator().manual_seed(7))
    sampling._WORKSPACE.__dict__.clear()
    with torch.inference_mode():
        first = sampling.batch_token_stats(logits, params, [None, None])[0]
    with torch.no_grad():
        again = sampling.batch_token_stats(logits, params, [None, None])[0]
    assert torch.equal(first.nan_to_num(), again.nan_to_num())

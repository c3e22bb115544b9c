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

"""The two-stage top-k used for every token's alternatives equals torch.topk."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from livepp.engines.torch.sampling import top_k


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

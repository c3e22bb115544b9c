"""What a remote stream's top-k says about the entropy it does not send.

An engine that streams only the k most likely tokens' logprobs leaves the
entropy H of the next-token distribution unknown, but bounded. With the known
probabilities p_1 ≥ … ≥ p_k (and the chosen token's q when it is not among
them), the tail mass m = 1 − Σ p_i − q lies on the other tokens, each of
probability at most p_k (they are not in the top k). The known part
contributes H_known = −Σ p_i log p_i − q log q; the tail contributes

* at least as little as its mass can: as many tokens of p_k as fit, the rest
  on one token, −⌊m/p_k⌋·p_k log p_k − r log r with r = m − ⌊m/p_k⌋·p_k
  (a tighter bound than the whole tail on one token, −m log m, and never
  below it);
* at most as much as spreading it evenly over the n other tokens of the
  vocabulary can: −m log(m/n), n = V − k (− 1 if the chosen token is outside
  the top k). Without the vocabulary size V there is no upper bound.

So H ∈ [H_known + low, H_known + high], the bounds meet when the top-k holds
all the mass (m = 0), and ``tail_mass`` = m is reported beside them.
"""

from __future__ import annotations

import math
import operator
from typing import Sequence

__all__ = ["entropy_bounds"]


def _h(p: float) -> float:
    return -p * math.log(p) if p > 0 else 0.0


def entropy_bounds(top: Sequence[float], *, vocab_size: int | None = None, chosen: float | None = None) -> tuple[float, float | None, float]:
    """(lower bound, upper bound or None, tail mass) of the entropy in nats.

    ``top``: the top-k logprobs (any order); ``chosen``: the chosen token's
    logprob when it is not among them."""
    exp = math.exp
    logprobs = [v for v in top if v > -math.inf]
    top_probs = [exp(v) for v in logprobs]
    known, known_lp = top_probs, logprobs
    if chosen is not None and chosen > -math.inf:
        known, known_lp = [*top_probs, exp(chosen)], [*logprobs, chosen]
    if not known:
        return 0.0, (math.log(vocab_size) if vocab_size else None), 1.0
    h_known = -sum(map(operator.mul, known, known_lp))  # −p log p from the logprob: no log of a tiny p
    tail = 1.0 - sum(known)
    if tail <= 1e-12:  # the top-k (with the chosen token) holds everything: H is known
        return h_known, h_known, max(tail, 0.0)
    smallest = min(top_probs) if top_probs else tail  # each tail token is at most the least likely of the top-k
    full = math.floor(tail / smallest)
    low = full * _h(smallest) + _h(tail - full * smallest)
    others = vocab_size - len(known) if vocab_size else 0
    high = h_known + tail * math.log(others / tail) if others > 0 else None
    return h_known + low, high, tail

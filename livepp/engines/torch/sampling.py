"""One fused step from next-token logits to everything livepp reports.

``batch_token_stats`` picks every row's token and computes, on the device
and in one vectorised pass over the ``[rows, vocab]`` logits, its raw
logprob, the full-vocabulary entropy and varentropy, DeepConf token
confidence and the top-k alternatives, and packs them in one float64 tensor,
so the caller brings everything back to the host with a single
``.tolist()``: one sync per step. A single stream is a batch of one
(``next_token_stats``), so both take the same path.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Sequence

import torch

from livepp.core.events import PositionScore
from livepp.core.params import GenerationParams

__all__ = ["StepStats", "batch_token_stats", "log_normaliser", "sample_token", "next_token_stats", "forced_token_stats", "position_scores", "unpack_stats", "processed_scores", "top_k"]

# Packed layout: [token_id, logprob, entropy, confidence, sampling_logprob,
#                 varentropy, top_values (k), top_ids (k)]; NaN marks "not computed".
_HEAD = 6


@dataclass(frozen=True, slots=True)
class StepStats:
    token_id: int
    logprob: float
    entropy: float | None
    confidence: float | None
    sampling_logprob: float | None
    top: tuple[tuple[int, float], ...]
    varentropy: float | None = None


def processed_scores(logits: torch.Tensor, params: GenerationParams) -> torch.Tensor:
    """Logits after temperature, top-k, top-p and min-p, in that order.

    Filtered-out tokens get -inf. Always keeps at least the most likely token.
    """
    # logits: [V] float32
    scores = logits / params.temperature
    if params.top_k and params.top_k < scores.numel():
        kth = torch.topk(scores, params.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, -math.inf)
    if params.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True)
        probs = torch.softmax(sorted_scores, dim=-1)
        # Mass strictly before each token: keep tokens until top_p is covered,
        # which always keeps the first one.
        mass_before = torch.cumsum(probs, dim=-1) - probs
        drop_sorted = mass_before >= params.top_p
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        scores = scores.masked_fill(drop, -math.inf)
    if params.min_p > 0.0:
        probs = torch.softmax(scores, dim=-1)
        scores = scores.masked_fill(probs < params.min_p * probs.max(), -math.inf)
    return scores


_BLOCK = 128


def top_k(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.topk(x, k)`` over the last dimension of a large tensor ([V] or
    [R, V]), in two cheaper stages: the top k lie in the k blocks of 128 with
    the largest maxima (any element outside them has k block maxima above it),
    so only those blocks are searched. Exact; about twice as fast as one topk
    over a 50k vocabulary on a CPU."""
    values, ids, _ = top_k_and_argmax(x, k, argmax=False)
    return values, ids


def top_k_and_argmax(x: torch.Tensor, k: int, *, argmax: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """:func:`top_k`, and ``x.argmax(-1)`` (the first index of the maximum,
    as torch gives it, NaN counting as the maximum) from the same block
    maxima: the first block whose maximum is the largest holds the first
    occurrence, found by an argmax within that block alone. One pass over
    ``x`` instead of two."""
    n = x.shape[-1]
    if n < 64 * _BLOCK or k > 64:
        values, ids = torch.topk(x, k)
        return values, ids, x.argmax(dim=-1) if argmax else None
    pad = -n % _BLOCK
    lead = x.shape[:-1]
    blocks = (torch.nn.functional.pad(x, (0, pad), value=-math.inf) if pad else x).reshape(*lead, -1, _BLOCK)
    maxima = blocks.amax(dim=-1)  # [..., blocks]
    best = torch.topk(maxima, k).indices  # [..., k] the blocks that hold the top k
    candidates = torch.gather(blocks, -2, best[..., None].expand(*best.shape, _BLOCK)).flatten(-2)
    values, within = torch.topk(candidates, k)
    first = None
    if argmax:
        block = maxima.argmax(dim=-1, keepdim=True)  # [..., 1]
        inside = torch.gather(blocks, -2, block[..., None].expand(*block.shape, _BLOCK))[..., 0, :].argmax(dim=-1)
        first = block[..., 0] * _BLOCK + inside
    return values, torch.gather(best, -1, within // _BLOCK) * _BLOCK + within % _BLOCK, first


def sample_token(logits: torch.Tensor, params: GenerationParams, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One row's draw from its processed distribution: (token [1], its log-prob
    under that distribution [1]). The only per-row step of a batch's
    statistics, since each row has its own sampler settings and generator."""
    scores = processed_scores(logits, params)
    probs = torch.softmax(scores, dim=-1)
    token = torch.multinomial(probs, 1, generator=generator)
    return token, torch.log_softmax(scores, dim=-1)[token]


_WORKSPACE = threading.local()


def _scratch(like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two ``[rows, vocab]`` blocks shaped like ``like``, kept by this
    thread from step to step: a fresh block of that size is new memory at
    every step, and touching it for the first time (page faults) cost more
    than the arithmetic done in it (8 rows of a 49k vocabulary: 0.91 ms a
    step with fresh blocks, 0.53 ms with reused ones; 262k: 4.5 and 2.2 ms)."""
    rows, vocab = like.shape
    held = getattr(_WORKSPACE, "blocks", None)
    if held is None or held.shape[2] != vocab or held.shape[1] < rows or held.dtype != like.dtype or held.device != like.device:
        with torch.inference_mode(False):  # a normal tensor: written to in inference mode and out of it (a compiled decoder's no_grad)
            held = torch.empty((2, rows, vocab), dtype=like.dtype, device=like.device)
        _WORKSPACE.blocks = held
    return held[0, :rows], held[1, :rows]


def log_normaliser(logits: torch.Tensor, peak: torch.Tensor, shifted: torch.Tensor, weights: torch.Tensor, *,
                   spread: bool) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Every row's log-softmax shift, and its entropy and varentropy, from
    the logits themselves, without a log-softmax block: with ``s = x − max``
    and ``e = exp(s)``, ``log Z = log Σ e``, ``log p = x − (max + log Z)``,
    and the entropy ``H = log Z − E_p[s]``; the varentropy, the variance of
    ``−log p`` under p, is the variance of ``s`` (``log p`` and ``s`` differ
    by a constant), taken centred as ``E_p[(s − E_p[s])²]``. Each expectation
    is one dot product of ``e`` with a block, divided by Z.

    ``logits`` [R, V] fp32, ``peak`` its row maxima [R]; ``shifted`` and
    ``weights``: two [R, V] blocks to write into. Returns ``(shift, entropy,
    varentropy)``: ``log p = logits − shift``; the last two None unless
    ``spread``. Four operations over [R, V] without the spread, eight with
    it, where log-softmax, exp and the products took nine and a third
    block; and closer to a float64 evaluation (entropy 5e-7 off where the
    log-softmax form was 6e-6 off, on 8 rows of a 49k vocabulary). A token
    of probability 0 (a logit of −inf) gets s clamped to −1e4: its weight
    exp(−1e4) is exactly 0 in fp32, so it adds exactly 0 instead of 0·∞."""
    s = torch.sub(logits, peak[:, None], out=shifted).clamp_(min=-1e4)
    e = torch.exp(s, out=weights)
    z = e.sum(-1)
    log_z = z.log()
    shift = peak + log_z
    if not spread:
        return shift, None, None
    mean = torch.linalg.vecdot(e, s) / z  # E_p[s]
    entropy = log_z - mean
    varentropy = torch.linalg.vecdot(e, s.sub_(mean[:, None]).square_()) / z
    return shift, entropy, varentropy


def batch_token_stats(logits: torch.Tensor, params: Sequence[GenerationParams], generators: Sequence[torch.Generator | None],
                      *, tokens: Sequence[int] | None = None) -> tuple[torch.Tensor, dict[int, Exception]]:
    """Choose every row's next token and pack its statistics, in one
    vectorised pass over the ``[rows, vocab]`` logits block: the raw
    logprob, entropy, varentropy, top-k and confidence of all rows at once
    (:func:`log_normaliser`; the top k and the greedy token are those of the
    logits, the order log-softmax keeps); only sampled rows draw one by one
    (each with its own settings and generator). ``tokens``: the rows'
    tokens are given (teacher forcing, :func:`forced_token_stats`): nothing
    is drawn, and the [rows, vocab] blocks are fresh rather than the
    thread's scratch, as the rows can be a whole prompt. Returns the packed
    ``[rows, width]`` float64 block (one host sync brings it back; see
    :func:`unpack_stats`) and the exception of each row whose draw failed
    (its packed row is meaningless)."""
    # logits: [R, V]; statistics are taken in fp32 whatever the model's dtype,
    # and never need a gradient (a block that has one would refuse out=).
    logits = logits.detach()
    if logits.dtype != torch.float32:
        logits = logits.float()
    rows = logits.shape[0]
    nan = logits.new_full((rows,), math.nan)
    n_top = min(max(max(p.top_logprobs, p.confidence_k) for p in params), logits.shape[-1])
    given = torch.tensor(list(tokens), device=logits.device) if tokens is not None else None
    if n_top:  # the top-k and the argmax from one pass of block maxima
        top_values, top_ids, token = top_k_and_argmax(logits, n_top, argmax=given is None)  # [R, n_top], [R, n_top], [R]
        peak = top_values[:, 0]
    else:
        token = logits.argmax(dim=-1) if given is None else None  # [R] greedy rows keep this
        peak = logits.amax(dim=-1)
    if given is not None:
        token = given
    wants_entropy = [p.entropy for p in params]
    blocks = _scratch(logits) if tokens is None else (torch.empty_like(logits), torch.empty_like(logits))
    shift, entropy, varentropy = log_normaliser(logits, peak, *blocks, spread=any(wants_entropy))
    if entropy is None or varentropy is None:
        entropy = varentropy = nan
    elif not all(wants_entropy):
        off = torch.tensor([not w for w in wants_entropy], device=logits.device)
        entropy, varentropy = entropy.masked_fill(off, math.nan), varentropy.masked_fill(off, math.nan)
    failed: dict[int, Exception] = {}
    sampling_logprob = nan if given is not None or all(p.greedy for p in params) else nan.clone()
    for k, (p, gen) in enumerate(zip(params, generators)):
        if not p.greedy and given is None:
            try:
                drawn, lp = sample_token(logits[k], p, gen)
            except Exception as exc:  # noqa: BLE001 - this row's failure, reported to its consumer
                failed[k] = exc
                continue
            token[k] = drawn[0]
            sampling_logprob[k] = lp[0]
    chosen = logits.gather(1, token[:, None])[:, 0] - shift

    width = max(p.top_logprobs for p in params)
    confidence = nan
    if n_top:
        top_values = top_values - shift[:, None]  # raw logprobs
        ks = [min(p.confidence_k, n_top) for p in params]
        if any(ks):
            if len(set(ks)) == 1:
                confidence = -top_values[:, : ks[0]].mean(-1)
            else:  # rows that ask for different k: each mean of its own top k
                sums = top_values.cumsum(-1)
                at = torch.tensor([max(k, 1) - 1 for k in ks], device=logits.device)
                confidence = -sums.gather(1, at[:, None])[:, 0] / torch.tensor([max(k, 1) for k in ks], device=logits.device)
                confidence = confidence.masked_fill(torch.tensor([k == 0 for k in ks], device=logits.device), math.nan)

    columns = [torch.stack([token.to(logits.dtype), chosen, entropy, confidence, sampling_logprob, varentropy], dim=1)]
    if width:
        columns += [top_values[:, :width], top_ids[:, :width].to(logits.dtype)]
    # Ids pass through fp32 (exact up to 2^24, past any vocabulary); float64 for the host.
    return torch.cat(columns, dim=1).double(), failed


def next_token_stats(
    logits: torch.Tensor,
    params: GenerationParams,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One sequence's next token and packed statistics (:func:`batch_token_stats`
    of one row, so a row alone and a row of a batch take the same path)."""
    # logits: [V]
    packed, failed = batch_token_stats(logits[None], [params], [generator])
    if failed:
        raise failed[0]
    return packed[0, : _HEAD + 2 * params.top_logprobs]


def _optional(x: float) -> float | None:
    return None if math.isnan(x) else x


def unpack_stats(values: list[float], top: int | None = None) -> StepStats:
    """Turn the host copy of a packed row back into named fields; ``top``:
    the row's own number of alternatives when the block is wider (a batch
    packs as many as its widest row asks for)."""
    width = (len(values) - _HEAD) // 2
    k = width if top is None else top
    top_values = values[_HEAD : _HEAD + k]
    top_ids = values[_HEAD + width : _HEAD + width + k]
    return StepStats(
        token_id=int(values[0]),
        logprob=values[1],
        entropy=_optional(values[2]),
        confidence=_optional(values[3]),
        sampling_logprob=_optional(values[4]),
        varentropy=_optional(values[5]),
        top=tuple((int(i), v) for i, v in zip(top_ids, top_values)),
    )


def forced_token_stats(logits: torch.Tensor, token_ids: list[int], params: GenerationParams) -> list[StepStats]:
    """The statistics of given tokens (teacher forcing): row ``i`` of
    ``logits`` [T, V] is the distribution ``token_ids[i]`` was drawn from.
    Same quantities and layout as :func:`next_token_stats`, for T rows at
    once with one host sync."""
    if not token_ids:
        return []
    packed, _ = batch_token_stats(logits, [params] * len(token_ids), [None] * len(token_ids), tokens=token_ids)
    return [unpack_stats(row) for row in packed.tolist()]  # the one host sync


def position_scores(logits: torch.Tensor, positions: list[int], token_ids: list[int], top: int, *, entropy: bool = True,
                    rank: bool = True) -> list[PositionScore]:
    """The scores of given tokens: row ``i`` of ``logits`` [T, V] is the
    distribution ``token_ids[i]`` (at ``positions[i]``) was drawn from. The
    raw logprob, the 1-based rank among all V tokens (ties counted in the
    token's favour), the entropy and the ``top`` most likely tokens, for T
    rows with one host sync; nothing larger than [T, V] is made. Without
    ``entropy`` (None) or ``rank`` (0), those passes over [T, V] are skipped."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    target = torch.tensor(token_ids, device=logprobs.device)[:, None]
    chosen = logprobs.gather(1, target)
    nan = torch.full_like(chosen, math.nan)
    ranks = ((logprobs > chosen).sum(-1, keepdim=True) + 1).to(logprobs.dtype) if rank else torch.zeros_like(chosen)
    parts = [chosen, ranks, nan]
    if top:
        top_values, top_ids = top_k(logprobs, min(top, logprobs.shape[-1]))
        parts += [top_values, top_ids.to(logprobs.dtype)]
    if entropy:
        # One clamped copy and its exp, the product written over that exp
        # (no third [T, V] block).
        clamped = logprobs.clamp(min=-1e4)
        p = clamped.exp()
        parts[2] = -torch.mul(p, clamped, out=p).sum(-1, keepdim=True)
    rows = torch.cat(parts, dim=1).double().tolist()  # the one host sync
    k = (len(rows[0]) - 3) // 2 if rows else 0
    return [PositionScore(pos, tid, row[0], int(row[1]), row[2] if entropy else None, tuple((int(i), v) for v, i in zip(row[3:3 + k], row[3 + k:])))
            for pos, tid, row in zip(positions, token_ids, rows)]

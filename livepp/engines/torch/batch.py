"""Batched decoding: many sequences, one forward pass per step.

Rows (a prompt and its parameters) are prefilled together in one
:class:`~livepp.engines.torch.rowcache.RowCache` (each row's own positions,
masks built from them), and rows that share a prompt (N samples of one
question) share one prefill: the distinct prompts run once and their KV cache
rows are repeated. Each step then feeds every active row's newest token (and
after it, for a row an intervention appends text to, that text's tokens) in
one forward pass, picks each row's next token with that row's own sampling
parameters and seeded generator, and brings every row's statistics back with
a single host sync.
A row that ends (EOS, stop string, length) or is stopped by its consumer
(``BatchStream.stop``: a policy, a cancel) leaves the batch before the next
step: its KV cache rows are dropped, so it costs nothing after.

Each row's tokens and logprobs equal its own single-sequence decoding (the
parity tests check this against a teacher-forced pass), so batching never
changes a number; only padding changes which kernels run.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch

from livepp.engines.torch.decoder import Decoder, TextTracker, token_record
from livepp.core.events import TokenRecord
from livepp.core.params import GenerationParams, LiveppError
from livepp.core.stream import RowBatch
from livepp.engines.feeding import Feed
from livepp.engines.protocol import ScoreSpec, is_token_ids
from livepp.engines.torch.rowcache import RowCache, layer_kinds
from livepp.engines.torch.sampling import batch_token_stats, forced_token_stats, next_token_stats, unpack_stats

__all__ = ["BatchRequest", "Row", "batch_requests", "new_row", "sample_rows", "injected_records", "injection_ids", "generating_feed", "split_step", "next_logits", "step_rows",
           "records_or_raise", "SteppedRows", "BatchStream", "BatchDecoder"]


@dataclass(frozen=True)
class BatchRequest:
    """One row to decode: prompt ids and how to generate (and score)."""

    prompt_ids: tuple[int, ...]
    params: GenerationParams
    score: ScoreSpec | None = None


@dataclass
class Row:
    """One sequence in a batch: its text side, sampler and position."""

    index: int
    request: BatchRequest
    text: TextTracker
    generator: torch.Generator | None
    position: int  # position of the next token to feed
    last_token: int = -1
    done: bool = False
    finish: str | None = None
    stats: Any = field(default=None, repr=False)
    # An intervention's token ids, fed after the row's newest token at its next step.
    inject_ids: list[int] = field(default_factory=list)
    # The injected tokens' records of the latest step, delivered before its record.
    injected: list[TokenRecord] = field(default_factory=list)
    # A fed row's queue (livepp.engines.feeding): it feeds given tokens and never samples.
    fed: Any = None


def batch_requests(encode: Callable[..., list[int]], prompts: Sequence[Any], params: Sequence[GenerationParams],
                   scores: Sequence[ScoreSpec | None] | None = None) -> list[BatchRequest]:
    """One request per row. Each distinct prompt (with its ``raw`` flag) is
    encoded once, so the N samples of a prompt share its ids, and so its
    prefill; a prompt of token ids is taken as it is."""
    if len(prompts) != len(params):
        raise LiveppError(f"open_batch needs one params per prompt, got {len(prompts)} prompts and {len(params)} params")
    ids: dict[tuple[str, bool], tuple[int, ...]] = {}
    requests = []
    for k, (prompt, p) in enumerate(zip(prompts, params)):
        if is_token_ids(prompt):
            row_ids = tuple(prompt)
        else:
            key = (prompt if isinstance(prompt, str) else repr(list(prompt)), p.raw)
            if key not in ids:
                ids[key] = tuple(encode(prompt, raw=p.raw))
            row_ids = ids[key]
        requests.append(BatchRequest(row_ids, p, scores[k] if scores is not None else None))
    return requests


def new_row(dec: Decoder, index: int, request: BatchRequest) -> Row:
    """A row for ``request``, validated before any compute."""
    p = request.params
    dec.check(list(request.prompt_ids), p)
    gen = torch.Generator(device=dec.device).manual_seed(p.seed) if (not p.greedy and p.seed is not None) else None
    max_new = min(p.max_new_tokens, dec.context_length - len(request.prompt_ids))
    return Row(index, request, TextTracker(dec.tokenizer, dec.eos_ids, p, max_new), gen, len(request.prompt_ids))


def sample_rows(dec: Any, rows: Sequence[Row], logits: Any, injected: dict[int, tuple[list[int], Any]] | None = None) -> list[TokenRecord | Exception]:
    """Each row's next token and statistics from its logits row (``logits[k]``
    for ``rows[k]``: a ``[rows, V]`` block, or a list of ``[V]`` rows), in one
    vectorised pass with each row's own sampling parameters and generator,
    brought back in one host sync. Marks rows that end. ``injected[k]``:
    the ids an intervention fed row k this step and their logits; their
    records (``injected``, counted nowhere) go to ``rows[k].injected``.

    A row whose sampling or detokenization raises gets its exception in its
    place (and is done, with finish "error"); the other rows are unaffected,
    so one bad request never ends another's generation."""
    out: list[TokenRecord | Exception | None] = [None] * len(rows)
    if not rows:
        return []
    block = logits if isinstance(logits, torch.Tensor) else torch.stack(list(logits))
    with torch.inference_mode():
        try:
            packed, failed = batch_token_stats(block, [r.request.params for r in rows], [r.generator for r in rows])
            flat = packed.tolist()  # the one host sync
        except Exception:  # noqa: BLE001 - a shared failure: each row alone, so it stays that row's
            flat, failed = [], {}
            for k, r in enumerate(rows):
                try:
                    flat.append(next_token_stats(block[k], r.request.params, r.generator).tolist())
                except Exception as exc:  # noqa: BLE001
                    flat.append([])
                    failed[k] = exc
    for k, r in enumerate(rows):
        r.injected = []
        if k in failed:
            out[k] = _failed(r, failed[k])
            continue
        try:
            if injected and k in injected:
                r.injected = injected_records(dec, r, *injected[k])
            r.stats = stats = unpack_stats(flat[k], r.request.params.top_logprobs)
            text, finish = r.text.add(stats.token_id)
            if finish is not None:
                r.done, r.finish = True, finish
            r.last_token = stats.token_id
            out[k] = token_record(stats, text, finish, dec._alternatives(stats.top))
        except Exception as exc:  # noqa: BLE001
            out[k] = _failed(r, exc)
    return out  # type: ignore[return-value]


def injected_records(dec: Any, row: Row, ids: list[int], logits: Any) -> list[TokenRecord]:
    """The records of the tokens an intervention put into ``row``: each
    scored by the logits before it (``logits[j]`` for ``ids[j]``), detokenized
    with the row's text, marked ``injected`` and never an end."""
    out = []
    for stats in forced_token_stats(logits, ids, row.request.params):
        text = row.text.add_injected(stats.token_id)
        out.append(dataclasses.replace(token_record(stats, text, None, dec._alternatives(stats.top)), injected=True))
    return out


def injection_ids(encode: Callable[[str], list[int]], text: str, position: int, context_length: int) -> list[int]:
    """The ids of an injected text (``encode``: tokenized without special
    tokens), refused when empty or when they would not fit in the context
    with the token before them and one more."""
    if not isinstance(text, str) or not text:
        raise LiveppError("injected text must be a non-empty string")
    ids = [int(i) for i in encode(text)]
    if not ids:
        raise LiveppError("injected text must be a non-empty string")
    if context_length - position - 2 < len(ids):
        raise LiveppError(f"no room in the context for the injected text ({len(ids)} tokens)")
    return ids


def generating_feed(row: Row) -> Feed:
    """A generating row's feed: its newest token, and after it the ids an
    intervention injected (that row's only); logits of every slot come back.
    The row's position moves past it."""
    feed = Feed([row.last_token, *row.inject_ids], row.position, list(range(1 + len(row.inject_ids))))
    row.position += len(feed.ids)
    row.inject_ids = []
    return feed


def split_step(rows: Sequence[Row], feeds: Sequence[Feed], block: torch.Tensor, which: Sequence[int] | None = None,
               ) -> tuple[torch.Tensor, dict[int, tuple[list[int], torch.Tensor]], list[torch.Tensor]]:
    """A step's logits block (``feeds[k].wanted`` rows for row k, in order)
    cut per row; for the generating ``rows`` (at ``which`` among the feeds),
    their next-token logits [rows, V] and each injecting row's ids and logits."""
    per_row, offset = [], 0
    for feed in feeds:
        per_row.append(block[offset : offset + len(feed.wanted)])
        offset += len(feed.wanted)
    which = list(range(len(feeds))) if which is None else which
    injected = {k: (feeds[w].ids[1:], per_row[w][:-1]) for k, w in enumerate(which) if len(feeds[w].ids) > 1}
    if offset == len(rows) == len(feeds):  # one token each: the block is the next-token logits
        return block, injected, per_row
    nexts = torch.stack([per_row[w][-1] for w in which]) if which else block[:0]
    return nexts, injected, per_row


def next_logits(rows: Sequence[Row], feeds: Sequence[Feed], block: torch.Tensor) -> tuple[torch.Tensor, dict[int, tuple[list[int], torch.Tensor]]]:
    """:func:`split_step` of a step where every row generates: the
    next-token logits [rows, V] and each injecting row's ids and logits. A
    step of one token a row (no injection) is its block as it is, without
    cutting it into a view per row."""
    if len(block) == len(rows) == len(feeds):
        return block, {}
    logits, injected, _ = split_step(rows, feeds, block)
    return logits, injected


def step_rows(cache: RowCache, rows: Sequence[Row]) -> tuple[torch.Tensor, dict[int, tuple[list[int], torch.Tensor]]]:
    """One forward pass for every row of a batch (:func:`generating_feed`):
    the next-token logits [rows, V] and each injecting row's ids and logits."""
    feeds = [generating_feed(r) for r in rows]
    block = cache.forward([f.ids for f in feeds], [f.start for f in feeds], [f.wanted for f in feeds])
    return next_logits(rows, feeds, block)


def _failed(row: Row, exc: Exception) -> Exception:
    row.done, row.finish = True, "error"
    return exc


def records_or_raise(records: Sequence[TokenRecord | Exception]) -> list[TokenRecord]:
    """The records of a batch that fails as a whole when one row fails (a
    batch stream read by one consumer)."""
    for record in records:
        if isinstance(record, Exception):
            raise record
    return list(records)  # type: ignore[arg-type]


class SteppedRows(RowBatch):
    """A batch stream whose loop steps :class:`Row` s: what every step does
    after sampling, shared by the torch and the llama.cpp batches."""

    def _emit(self, active: Sequence[Row], records: Sequence[TokenRecord]) -> Iterator[tuple[int, TokenRecord]]:
        for r, record in zip(active, records):
            for injected in r.injected:
                yield r.index, injected
            if r.finish is not None:
                self.finish_reasons[r.index] = r.finish
            yield r.index, record

    def _apply_stops(self, rows: Sequence[Row]) -> None:
        """Rows stopped from outside (a policy, a cancel) are done before the next step."""
        for i, reason in self._stopped.items():
            if self.finish_reasons[i] is None:
                self.finish_reasons[i] = reason
            rows[i].done = True
        self._stopped.clear()


class BatchStream(SteppedRows):
    """Iterate ``(row index, TokenRecord)`` step by step over every active row.

    Within a step rows come in index order. ``stop(i)`` (from the consumer,
    between records) makes row i leave before the next forward pass;
    ``inject(i, text)`` appends text to row i only, fed in its next step
    (its tokens come out marked ``injected``); ``close()`` ends the whole
    stream. ``finish_reasons[i]`` says how each row ended ("policy" or
    "cancelled" for rows stopped from outside).
    """

    def __init__(self, engine: "BatchDecoder", requests: Sequence[BatchRequest]) -> None:
        self.engine = engine
        self.requests = list(requests)
        self.forward_passes = 0
        self.rows = [new_row(engine.decoder, i, req) for i, req in enumerate(self.requests)]
        super().__init__([r.prompt_ids for r in self.requests])

    def inject(self, index: int, text: str) -> None:
        row, dec = self.rows[index], self.engine.decoder
        if row.done:
            return
        row.inject_ids += injection_ids(lambda t: dec.tokenizer(t, add_special_tokens=False)["input_ids"], text,
                                        row.position + len(row.inject_ids), dec.context_length)

    # ---- the loop ----------------------------------------------------------
    def _run(self) -> Iterator[tuple[int, TokenRecord]]:
        engine = self.engine
        dec = engine.decoder
        rows = self.rows
        if not rows:
            return
        cache = engine.new_cache()
        with torch.inference_mode():
            logits = engine._prefill(cache, [r.request.prompt_ids for r in rows])
        self.forward_passes += 1
        active, injected = rows, {}
        while active:
            yield from self._emit(active, records_or_raise(sample_rows(dec, active, logits, injected)))
            self._apply_stops(rows)
            keep = [k for k, r in enumerate(active) if not r.done]
            if not keep:
                return
            if len(keep) < len(active):
                # Finished rows leave the batch: their cache rows are dropped.
                cache.select(keep)
                active = [active[k] for k in keep]
            with torch.inference_mode():
                logits, injected = step_rows(cache, active)
            self.forward_passes += 1


class BatchDecoder:
    """Decodes many rows at once with a :class:`Decoder`'s model and tokenizer."""

    def __init__(self, decoder: Decoder, *, pad_id: int = 0) -> None:
        self.decoder = decoder
        self.model = decoder.model
        self.pad_id = pad_id
        self.kinds = layer_kinds(decoder.model)

    def stream(self, requests: Sequence[BatchRequest]) -> BatchStream:
        return BatchStream(self, requests)

    def new_cache(self) -> RowCache:
        return RowCache(self.model, self.kinds, self.pad_id)

    def _prefill(self, cache: RowCache, prompts: Sequence[Sequence[int]]) -> torch.Tensor:
        """Prompts into an empty ``cache`` in one pass; their next-token logits [B, V]."""
        # Rows that share a prompt share its prefill.
        distinct: dict[tuple[int, ...], int] = {}
        which = [distinct.setdefault(tuple(p), len(distinct)) for p in prompts]
        unique = list(distinct)
        logits = cache.forward(unique, [0] * len(unique), [[len(p) - 1] for p in unique])
        if which != list(range(len(unique))):
            cache.select(which)
            logits = logits[torch.tensor(which, device=logits.device)]
        return logits

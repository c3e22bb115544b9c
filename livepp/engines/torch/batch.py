"""Batched decoding: many sequences, one forward pass per step.

Rows (a prompt and its parameters) are prefilled together: prompts are
left-padded to one length with an attention mask and per-row positions, and
rows that share a prompt (N samples of one question) share one prefill: the
distinct prompts run once and their KV cache rows are repeated. Each step
then feeds every active row's newest token in one forward pass, picks each
row's next token with that row's own sampling parameters and seeded
generator, and brings every row's statistics back with a single host sync.
A row that ends (EOS, stop string, length) or is stopped by its consumer
(``BatchStream.stop``: a policy, a cancel) leaves the batch before the next
step: its KV cache rows are dropped, so it costs nothing after.

Each row's tokens and logprobs equal its own single-sequence decoding (the
parity tests check this against a teacher-forced pass), so batching never
changes a number; only padding changes which kernels run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch

from livepp.engines.torch.decoder import Decoder, TextTracker, token_record
from livepp.core.events import TokenRecord
from livepp.core.params import GenerationParams, LiveppError
from livepp.core.stream import RowBatch
from livepp.engines.protocol import ScoreSpec, is_token_ids
from livepp.engines.torch.sampling import batch_token_stats, next_token_stats, unpack_stats

__all__ = ["BatchRequest", "Row", "batch_requests", "new_row", "sample_rows", "records_or_raise", "SteppedRows", "BatchStream", "BatchDecoder"]


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


def sample_rows(dec: Any, rows: Sequence[Row], logits: Any) -> list[TokenRecord | Exception]:
    """Each row's next token and statistics from its logits row (``logits[k]``
    for ``rows[k]``: a ``[rows, V]`` block, or a list of ``[V]`` rows), in one
    vectorised pass with each row's own sampling parameters and generator,
    brought back in one host sync. Marks rows that end.

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
        if k in failed:
            out[k] = _failed(r, failed[k])
            continue
        try:
            r.stats = stats = unpack_stats(flat[k], r.request.params.top_logprobs)
            text, finish = r.text.add(stats.token_id)
            if finish is not None:
                r.done, r.finish = True, finish
            r.last_token = stats.token_id
            out[k] = token_record(stats, text, finish, dec._alternatives(stats.top))
        except Exception as exc:  # noqa: BLE001
            out[k] = _failed(r, exc)
    return out  # type: ignore[return-value]


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
    ``close()`` ends the whole stream. ``finish_reasons[i]`` says how each row
    ended ("policy" or "cancelled" for rows stopped from outside).
    """

    def __init__(self, engine: "BatchDecoder", requests: Sequence[BatchRequest]) -> None:
        self.engine = engine
        self.requests = list(requests)
        self.forward_passes = 0
        super().__init__([r.prompt_ids for r in self.requests])

    # ---- the loop ----------------------------------------------------------
    def _run(self) -> Iterator[tuple[int, TokenRecord]]:
        engine = self.engine
        dec = engine.decoder
        rows = [new_row(dec, i, req) for i, req in enumerate(self.requests)]
        if not rows:
            return
        with torch.inference_mode():
            logits, cache, mask = engine._prefill([r.request.prompt_ids for r in rows])
        self.forward_passes += 1
        active = rows
        while active:
            yield from self._emit(active, records_or_raise(sample_rows(dec, active, logits)))
            self._apply_stops(rows)
            keep = [k for k, r in enumerate(active) if not r.done]
            if not keep:
                return
            if len(keep) < len(active):
                # Finished rows leave the batch: their cache rows are dropped.
                index = torch.tensor(keep, device=mask.device)
                cache.batch_select_indices(index)
                mask = mask[index]
                active = [active[k] for k in keep]
            with torch.inference_mode():
                logits, mask = engine._step(active, cache, mask)
            self.forward_passes += 1
            for r in active:
                r.position += 1


class BatchDecoder:
    """Decodes many rows at once with a :class:`Decoder`'s model and tokenizer."""

    def __init__(self, decoder: Decoder, *, pad_id: int = 0) -> None:
        self.decoder = decoder
        self.model = decoder.model
        self.pad_id = pad_id

    def stream(self, requests: Sequence[BatchRequest]) -> BatchStream:
        return BatchStream(self, requests)

    def _prefill(self, prompts: Sequence[Sequence[int]]) -> tuple[torch.Tensor, Any, torch.Tensor]:
        """Next-token logits [B, V], the KV cache and the attention mask [B, T]."""
        from transformers import DynamicCache

        # Rows that share a prompt share its prefill.
        distinct: dict[tuple[int, ...], int] = {}
        which = [distinct.setdefault(tuple(p), len(distinct)) for p in prompts]
        unique = list(distinct)
        width = max(map(len, unique))
        device = self.model.device
        # Left padding: every row's newest token sits in the last column.
        ids = torch.tensor([[self.pad_id] * (width - len(p)) + list(p) for p in unique], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in unique], device=device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.model.config)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                         use_cache=True, logits_to_keep=1)
        logits = out.logits[:, -1]
        if len(unique) != len(prompts) or which != list(range(len(prompts))):
            index = torch.tensor(which, device=device)
            cache.batch_select_indices(index)
            logits, mask = logits[index], mask[index]
        return logits, cache, mask

    def _step(self, rows: Sequence[Row], cache: Any, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # input_ids: [B, 1] the newest token of each row; positions: [B, 1] its own position.
        device = mask.device
        ids = torch.tensor([[r.last_token] for r in rows], device=device)
        positions = torch.tensor([[r.position] for r in rows], device=device)
        mask = torch.cat([mask, mask.new_ones((len(rows), 1))], dim=1)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                         use_cache=True, logits_to_keep=1)
        return out.logits[:, -1], mask

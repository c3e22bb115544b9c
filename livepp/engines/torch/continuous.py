"""The torch engine's side of continuous batching: one shared
:class:`~livepp.engines.torch.rowcache.RowCache`.

New rows are prefilled (prompts together; a long prompt alone in chunks) into
a cache of their own, then stacked onto the running batch's. Rows that leave
are selected out, and columns no row uses any more are dropped. A step feeds
each row its newest token (and an intervention's text after it), and the
scheduler's fed rows (a watched text) their next tokens, all in one forward
pass. Sliding-window models (Gemma 2/3) batch as any other: attention follows
each row's own positions.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Sequence

import torch

from livepp.core.events import PositionScore
from livepp.engines.feeding import Feed
from livepp.engines.torch.batch import BatchDecoder, Row
from livepp.engines.torch.rowcache import RowCache, final_logits
from livepp.engines.torch.sampling import position_scores
from livepp.engines.torch.engine import TorchEngine

__all__ = ["TorchBackend", "IDLE_SCORE_PASS"]

IDLE_SCORE_PASS = 4
"""Chunks per forward pass of a scored prompt while no row of the batch runs (CPU)."""


class TorchBackend:
    def __init__(self, engine: TorchEngine) -> None:
        self.engine, self.name, self.kind = engine, engine.name, engine.kind
        self.text = self.decoder = engine.decoder  # what new_row and sample_rows ask of an engine
        self.batcher = BatchDecoder(engine.decoder)  # refuses a model whose layers cannot be batched
        self.cache = self.batcher.new_cache()
        self._pending: RowCache | None = None

    def prefill(self, rows: Sequence[Row], chunk: int) -> Iterator[Callable[[], Any]]:
        """Callables, one per forward pass; the last returns the rows' next-token logits."""
        prompts = [r.request.prompt_ids for r in rows]
        if len(rows) == 1 and len(prompts[0]) > chunk:
            yield from self._chunked(prompts[0], chunk, None)
            return

        def whole() -> Any:
            cache = self.batcher.new_cache()
            with torch.inference_mode():
                logits = self.batcher._prefill(cache, prompts)
            self._pending = cache
            return logits

        yield whole

    def _chunked(self, ids: Sequence[int], chunk: int, scored: Callable[[int, int, torch.Tensor], None] | None,
                 passes: Callable[[], int] | None = None) -> Iterator[Callable[[], Any]]:
        """A prompt ``chunk`` tokens per forward pass into a cache of its own;
        ``scored(start, end, logits)`` gets the logits of at most ``chunk``
        positions at a time (row j: the distribution of the token at
        start + j + 1) when scoring. ``passes()``, asked before each pass
        of a scored prompt, gives its tokens (a chunk or more; the output
        layer still takes ``chunk`` positions at a time)."""
        cache = self.batcher.new_cache()
        n, start = len(ids), 0
        while start < n:
            end = min(start + (passes() if passes is not None else chunk), n)

            def step(start: int = start, end: int = end) -> Any:
                with torch.inference_mode():
                    if scored is None:
                        logits = cache.forward([ids[start:end]], [start], [[end - start - 1] if end == n else []])
                    else:
                        hidden = cache.forward([ids[start:end]], [start], [range(end - start)], logits=False)
                        for at in range(start, end, chunk):
                            logits = final_logits(self.decoder.model, hidden[at - start : min(at + chunk, end) - start])
                            scored(at, min(at + chunk, end), logits)
                if end < n:
                    return None
                self._pending = cache
                return logits[-1:]

            yield step
            start = end

    @property
    def vocab_size(self) -> int:
        return int(self.decoder.model.get_input_embeddings().num_embeddings)

    def score_prefill(self, row: Row, chunk: int, on_scores: Callable[[list[PositionScore]], None],
                      busy: Callable[[], bool] | None = None) -> Iterator[Callable[[], Any]]:
        """A prompt prefilled ``chunk`` tokens per forward pass, its given
        tokens scored from ``row.request.score.first`` on as each chunk's
        logits come (only one chunk's [chunk, V] logits exist at a time);
        the last returns the next-token logits.

        On the CPU, a pass while ``busy()`` says no row runs takes
        :data:`IDLE_SCORE_PASS` chunks (a window of 514 tokens took 910 ms
        in one pass here, 1,130 ms in three of 171), its output layer and
        scores still a chunk's positions at a time. Requests queued behind
        it wait for the whole prefill either way, so fewer passes end their
        wait sooner. (On a GPU the passes stay a chunk: a longer one's
        activations are what ``--prefill-chunk`` is sized against.)"""
        ids = row.request.prompt_ids
        passes = None
        if busy is not None and self.decoder.device.type == "cpu":
            def passes() -> int:
                return chunk if busy() else IDLE_SCORE_PASS * chunk
        yield from self._chunked(ids, chunk, lambda start, end, logits: _report_scores(row, start, end, logits, on_scores), passes)

    def score_group(self, rows: Sequence[Row], reports: Sequence[Callable[[list[PositionScore]], None]]) -> Iterator[Callable[[], Any]]:
        """Short prompts (``prefill_chunk`` tokens in all) prefilled and scored
        in one forward pass, each as :meth:`score_prefill` scores it alone
        (``reports[i]`` gets row i's scores); returns each row's next-token
        logits, rows in order."""

        def whole() -> Any:
            prompts = [list(r.request.prompt_ids) for r in rows]
            cache = self.batcher.new_cache()
            with torch.inference_mode():
                logits = cache.forward(prompts, [0] * len(prompts), [range(len(ids)) for ids in prompts])  # [tokens in all, V]
                at, last = 0, []
                for row, ids, report in zip(rows, prompts, reports):
                    _report_scores(row, 0, len(ids), logits[at : at + len(ids)], report)  # the whole prompt as one chunk
                    last.append(at + len(ids) - 1)
                    at += len(ids)
            self._pending = cache
            return logits[last]

        yield whole

    def join(self, keep: list[int]) -> None:
        """The prefilled rows at ``keep`` (indices into the group) join the batch."""
        if self._pending is None:  # a prefill abandoned before its last chunk: its cache is dropped
            return
        pending, self._pending = self._pending, None
        if not keep:
            return
        if len(keep) < pending.rows:
            pending.select(keep)
        self.cache.stack(pending)

    def step(self, rows: Sequence[Row], feeds: Sequence[Feed]) -> Any:
        """One forward pass: each row its feed; the wanted slots' logits, rows in order."""
        for k, feed in enumerate(feeds):
            if feed.forget:
                self.cache.forget(k)
        with torch.inference_mode():
            return self.cache.forward([f.ids for f in feeds], [f.start for f in feeds], [f.wanted for f in feeds])

    def join_empty(self) -> None:
        """A row with nothing to prefill (a fed row) joins the batch."""
        self.cache.add_empty_row()

    def keep(self, keep: list[int]) -> None:
        """Only the active rows at ``keep`` stay."""
        self.cache.select(keep)

    def reset(self) -> None:
        self.cache.clear()
        self._pending = None

    def close(self) -> None:
        self.reset()


def _report_scores(row: Row, start: int, end: int, logits: torch.Tensor, report: Callable[[list[PositionScore]], None]) -> None:
    """Score ``row``'s given tokens that the logits of its prompt's positions
    ``start`` .. ``end - 1`` predict (row j of ``logits``: the distribution of
    the token at ``start + j + 1``), from ``row.request.score.first`` on."""
    ids, spec = row.request.prompt_ids, row.request.score
    assert spec is not None
    lo, hi = max(start + 1, spec.first), min(end, len(ids) - 1)
    if lo <= hi:
        report(position_scores(logits[lo - start - 1 : hi - start], list(range(lo, hi + 1)), list(ids[lo : hi + 1]), spec.top,
                               entropy=spec.entropy, rank=spec.rank))

"""The torch engine's side of continuous batching: one shared KV cache.

New rows are prefilled (prompts together, left-padded; a long prompt alone in
chunks) into a cache of their own, then stacked onto the running batch's
cache, both left-padded to the longer length. Rows that leave are selected
out, and cache columns that only padding still uses are trimmed away.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F

from livepp.core.events import PositionScore
from livepp.core.params import LiveppError
from livepp.engines.torch.batch import BatchDecoder, Row
from livepp.engines.torch.sampling import position_scores
from livepp.engines.torch.engine import TorchEngine

__all__ = ["TorchBackend"]


class TorchBackend:
    def __init__(self, engine: TorchEngine) -> None:
        self.engine, self.name, self.kind = engine, engine.name, engine.kind
        self.text = self.decoder = engine.decoder  # what new_row and sample_rows ask of an engine
        self.batcher = BatchDecoder(engine.decoder)
        _check_full_attention(engine.decoder.model)
        self._cache: Any = None
        self._mask: torch.Tensor | None = None
        self._pending: tuple[Any, torch.Tensor] | None = None

    def prefill(self, rows: Sequence[Row], chunk: int) -> Iterator[Callable[[], Any]]:
        """Callables, one per forward pass; the last returns the rows' next-token logits."""
        prompts = [r.request.prompt_ids for r in rows]
        if len(rows) == 1 and len(prompts[0]) > chunk:
            yield from self._chunked(prompts[0], chunk)
            return

        def whole() -> Any:
            with torch.inference_mode():
                logits, cache, mask = self.batcher._prefill(prompts)
            self._pending = (cache, mask)
            return logits

        yield whole

    def _chunked(self, prompt: Sequence[int], c: int) -> Iterator[Callable[[], Any]]:
        from transformers import DynamicCache

        cache = DynamicCache(config=self.decoder.model.config)
        device, n = self.decoder.device, len(prompt)
        for start in range(0, n, c):
            end = min(start + c, n)

            def chunk(start: int = start, end: int = end) -> Any:
                with torch.inference_mode():
                    out = self.decoder.model(input_ids=torch.tensor([list(prompt[start:end])], device=device),
                                             attention_mask=torch.ones((1, end), dtype=torch.long, device=device),
                                             position_ids=torch.arange(start, end, device=device)[None],
                                             past_key_values=cache, use_cache=True, logits_to_keep=1)
                if end < n:
                    return None
                self._pending = (cache, torch.ones((1, n), dtype=torch.long, device=device))
                return out.logits[:, -1]

            yield chunk

    @property
    def vocab_size(self) -> int:
        return int(self.decoder.model.get_input_embeddings().num_embeddings)

    def score_prefill(self, row: Row, chunk: int, on_scores: Callable[[list[PositionScore]], None]) -> Iterator[Callable[[], Any]]:
        """A prompt prefilled ``chunk`` tokens per forward pass, its given
        tokens scored from ``row.request.score.first`` on as each chunk's
        logits come (only one chunk's [chunk, V] logits exist at a time);
        the last returns the next-token logits."""
        from transformers import DynamicCache

        ids, spec = row.request.prompt_ids, row.request.score
        assert spec is not None
        cache = DynamicCache(config=self.decoder.model.config)
        device, n = self.decoder.device, len(ids)
        for start in range(0, n, chunk):
            end = min(start + chunk, n)

            def step(start: int = start, end: int = end) -> Any:
                with torch.inference_mode():
                    # logits[j] is the distribution of the token at position start + j + 1
                    logits = self.decoder.model(input_ids=torch.tensor([list(ids[start:end])], device=device),
                                                attention_mask=torch.ones((1, end), dtype=torch.long, device=device),
                                                position_ids=torch.arange(start, end, device=device)[None],
                                                past_key_values=cache, use_cache=True, logits_to_keep=end - start).logits[0]
                    lo, hi = max(start + 1, spec.first), min(end, n - 1)
                    if lo <= hi:
                        on_scores(position_scores(logits[lo - start - 1 : hi - start], list(range(lo, hi + 1)), list(ids[lo : hi + 1]), spec.top))
                if end < n:
                    return None
                self._pending = (cache, torch.ones((1, n), dtype=torch.long, device=device))
                return logits[-1:]

            yield step

    def join(self, keep: list[int]) -> None:
        """The prefilled rows at ``keep`` (indices into the group) join the batch."""
        if self._pending is None:  # a prefill abandoned before its last chunk: its cache is dropped
            return
        cache, mask = self._pending
        self._pending = None
        if not keep:
            return
        if len(keep) < mask.shape[0]:
            index = torch.tensor(keep, device=mask.device)
            cache.batch_select_indices(index)
            mask = mask[index]
        self._cache, self._mask = _stack(self._cache, self._mask, cache, mask)

    def step(self, rows: Sequence[Row]) -> Any:
        with torch.inference_mode():
            logits, self._mask = self.batcher._step(rows, self._cache, self._mask)
        return logits

    def keep(self, keep: list[int]) -> None:
        """Only the active rows at ``keep`` stay; drop cache columns only padding uses."""
        if not keep:
            self._cache, self._mask = None, None
            return
        assert self._mask is not None
        index = torch.tensor(keep, device=self._mask.device)
        self._cache.batch_select_indices(index)
        self._mask = self._mask[index]
        first = int(self._mask.any(dim=0).to(torch.int8).argmax())
        if first > 0:
            for layer in self._cache.layers:
                layer.keys, layer.values = layer.keys[:, :, first:], layer.values[:, :, first:]
            self._mask = self._mask[:, first:]

    def reset(self) -> None:
        self._cache, self._mask, self._pending = None, None, None

    def close(self) -> None:
        self.reset()


def _stack(cache_a: Any, mask_a: torch.Tensor | None, cache_b: Any, mask_b: torch.Tensor) -> tuple[Any, torch.Tensor]:
    """One batch from two: both left-padded to the longer one's length."""
    if cache_a is None or mask_a is None:
        return cache_b, mask_b
    width = max(mask_a.shape[1], mask_b.shape[1])
    la, lb = mask_a.shape[1], mask_b.shape[1]

    def pad(x: torch.Tensor, length: int) -> torch.Tensor:
        return F.pad(x, (0, 0, width - length, 0)) if width > length else x

    for a, b in zip(cache_a.layers, cache_b.layers):
        a.keys = torch.cat([pad(a.keys, la), pad(b.keys, lb)], dim=0)
        a.values = torch.cat([pad(a.values, la), pad(b.values, lb)], dim=0)
    mask = torch.cat([F.pad(mask_a, (width - la, 0)), F.pad(mask_b, (width - lb, 0))], dim=0)
    return cache_a, mask


def _check_full_attention(model: Any) -> None:
    from transformers import DynamicCache

    kinds = {type(layer).__name__ for layer in DynamicCache(config=model.config).layers}
    if kinds - {"DynamicLayer"}:
        raise LiveppError(f"continuous batching stacks full-attention KV caches; this model's cache has {sorted(kinds)} layers "
                          "(serve it with --max-batch 1)")

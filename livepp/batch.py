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

from .decoder import Decoder, TextTracker, token_record
from .events import TokenRecord
from .monitor import Monitor, Session
from .params import GenerationParams
from .policies import Policy
from .tracker import Tracker
from .sampling import next_token_stats, unpack_stats

__all__ = ["BatchRequest", "BatchStream", "BatchDecoder", "MonitoredBatch", "sample_emitter"]


@dataclass(frozen=True)
class BatchRequest:
    """One row to decode: prompt ids and how to generate."""

    prompt_ids: tuple[int, ...]
    params: GenerationParams


@dataclass
class _Row:
    index: int
    request: BatchRequest
    text: TextTracker
    generator: torch.Generator | None
    position: int  # position of the next token to feed
    last_token: int = -1
    done: bool = False
    stats: Any = field(default=None, repr=False)


class BatchStream:
    """Iterate ``(row index, TokenRecord)`` step by step over every active row.

    Within a step rows come in index order. ``stop(i)`` (from the consumer,
    between records) makes row i leave before the next forward pass;
    ``close()`` ends the whole stream. ``finish_reasons[i]`` says how each row
    ended ("policy" or "cancelled" for rows stopped from outside).
    """

    def __init__(self, engine: "BatchDecoder", requests: Sequence[BatchRequest]) -> None:
        self.engine = engine
        self.requests = list(requests)
        self.finish_reasons: list[str | None] = [None] * len(self.requests)
        self.forward_passes = 0
        self._stopped: dict[int, str] = {}
        self._gen = self._run()

    def stop(self, index: int, reason: str = "policy") -> None:
        if self.finish_reasons[index] is None:
            self._stopped[index] = reason

    def __iter__(self) -> "BatchStream":
        return self

    def __next__(self) -> tuple[int, TokenRecord]:
        return next(self._gen)

    def close(self) -> None:
        self._gen.close()

    # ---- the loop ----------------------------------------------------------
    def _run(self) -> Iterator[tuple[int, TokenRecord]]:
        engine = self.engine
        dec = engine.decoder
        rows = []
        for i, req in enumerate(self.requests):
            p = req.params
            dec.check(list(req.prompt_ids), p)
            gen = torch.Generator(device=dec.device).manual_seed(p.seed) if (not p.greedy and p.seed is not None) else None
            max_new = min(p.max_new_tokens, dec.context_length - len(req.prompt_ids))
            rows.append(_Row(i, req, TextTracker(dec.tokenizer, dec.eos_ids, p, max_new), gen, len(req.prompt_ids)))
        if not rows:
            return
        with torch.inference_mode():
            logits, cache, mask = engine._prefill([r.request.prompt_ids for r in rows])
        self.forward_passes += 1
        active = rows
        while active:
            # Statistics of every active row, brought back in one host sync.
            with torch.inference_mode():
                packed = [next_token_stats(logits[k], r.request.params, r.generator) for k, r in enumerate(active)]
                flat = torch.cat(packed).tolist()
            offset = 0
            for r, t in zip(active, packed):
                r.stats = unpack_stats(flat[offset : offset + t.numel()])
                offset += t.numel()
            for r in active:
                text, finish = r.text.add(r.stats.token_id)
                if finish is not None:
                    r.done = True
                    self.finish_reasons[r.index] = finish
                r.last_token = r.stats.token_id
                yield r.index, token_record(r.stats, text, finish, dec._alternatives(r.stats.top))
            for i, reason in self._stopped.items():
                if self.finish_reasons[i] is None:
                    self.finish_reasons[i] = reason
                rows[i].done = True
            self._stopped.clear()
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

    def _step(self, rows: Sequence[_Row], cache: Any, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # input_ids: [B, 1] the newest token of each row; positions: [B, 1] its own position.
        device = mask.device
        ids = torch.tensor([[r.last_token] for r in rows], device=device)
        positions = torch.tensor([[r.position] for r in rows], device=device)
        mask = torch.cat([mask, mask.new_ones((len(rows), 1))], dim=1)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                         use_cache=True, logits_to_keep=1)
        return out.logits[:, -1], mask


class MonitoredBatch:
    """A batch whose every row runs through its own monitor session: its own
    tracker and policies, exactly as a single stream would. Iterate it for
    ``(sample, event)`` as they happen; a policy stop takes that row out of
    the batch at once; closing the iterator cancels the rows still running.
    ``sessions[i].tracker`` stays readable afterwards (e.g. DeepConf scores).
    """

    def __init__(self, decoder: Decoder, requests: Sequence[BatchRequest], *, policies: Callable[[int], Sequence[Policy]],
                 tracker_factory: Callable[[], Tracker] = Tracker, run_params: dict[str, Any] | None = None,
                 sample_offset: int = 0) -> None:
        self._events: list[tuple[int, Any]] = []
        self.stream = BatchDecoder(decoder).stream(requests)
        self.sessions: list[Session] = []
        for i, req in enumerate(requests):
            monitor = Monitor(sinks=[_Collect(self._events, i)], keep_events=False, tracker_factory=tracker_factory)
            params = req.params.to_dict() | dict(run_params or {}) | {"sample": sample_offset + i}
            self.sessions.append(monitor.session(model=decoder.loaded.name, prompt_token_ids=req.prompt_ids, params=params,
                                                 policies=list(policies(i))))

    def __iter__(self) -> Iterator[tuple[int, Any]]:
        sessions, stream = self.sessions, self.stream
        unfinished = "cancelled"  # how rows still running end if we leave early
        try:
            yield from self._drain()
            for i, record in stream:
                if sessions[i].push(record):
                    stream.stop(i)
                    sessions[i].end("policy")
                elif record.finish_reason is not None:
                    sessions[i].end(record.finish_reason)
                yield from self._drain()
        except GeneratorExit:
            raise  # closed by the consumer: the running rows are cancelled
        except BaseException:
            unfinished = "error"
            raise
        finally:
            stream.close()
            for s in sessions:
                s.end(unfinished)  # no-op for rows that already ended

    def _drain(self) -> Iterator[tuple[int, Any]]:
        for item in self._events:
            yield item
        self._events.clear()


class _Collect:
    def __init__(self, events: list[tuple[int, Any]], sample: int) -> None:
        self.events, self.sample = events, sample

    def emit(self, event: Any) -> None:
        self.events.append((self.sample, event))


def sample_emitter(sink: Any) -> Callable[[int, Any], None]:
    """How to hand a sample's event to ``sink``: its ``emit_sample(sample,
    event)`` when it has one (it wants to know which sample), else ``emit``."""
    emit_sample = getattr(sink, "emit_sample", None)
    return emit_sample if emit_sample is not None else (lambda _sample, event: sink.emit(event))

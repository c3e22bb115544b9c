"""Continuous batching: one thread owns a local engine and steps every
active row in one forward pass (the torch engine: one shared KV cache,
``engines/torch/continuous.py``; llama.cpp: one sequence per row of one
context, ``engines/llamacpp.py``).

Streams are opened from any thread (:meth:`Scheduler.open`, and
:meth:`Scheduler.open_batch` for N rows read together, e.g. DeepConf traces).
A new row waits in a bounded queue until the batch has room, is prefilled
(prompts up to ``prefill_chunk`` tokens together in one padded pass; scored
prompts likewise, up to ``prefill_chunk`` tokens in all, on the torch engine;
a longer prompt alone, one chunk per turn, so running rows wait at most one
chunk; a scored prompt takes longer passes while no row runs),
delivers its first token, and joins the shared batch at the next step: its KV
cache joins the batch's. A row
that ends (EOS, stop string, length) or whose consumer closes it (a policy
stop, a cancel, a disconnect) leaves the batch before the next step.

Steps are in lockstep with the consumers: a step runs once every active
row's consumer has taken its last record and asked for the next one (or has
closed), so a policy's stop is seen before the row's next forward pass, as
with a single stream. Each row keeps its own sampling generator and text
side, so its tokens and logprobs equal its own single-sequence decoding up to
the rounding of padded kernels (the tests check ≤ 1e-4).
"""

from __future__ import annotations

import sys
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

from livepp.core.events import PositionScore, TokenRecord
from livepp.core.params import EngineBusy, GenerationParams, LiveppError
from livepp.engines.encoder import PromptEncoder
from livepp.engines.protocol import Prompt, ScoreSpec, is_token_ids
from livepp.engines.select import local_kind, supports_continuous_batching
from livepp.engines.torch.openmp import release_openmp_pool
from livepp.engines.feeding import FedState, plan_feed, score_feed
from livepp.engines.scheduled import FedStream, ScheduledBatch, ScheduledStream
from livepp.engines.torch.batch import BatchRequest, Row, batch_requests, generating_feed, injection_ids, new_row, sample_rows, split_step

__all__ = ["Scheduler", "ScheduledStream", "ScheduledBatch", "FedStream", "backend_for", "supports_continuous_batching"]


def backend_for(engine: Any) -> Any:
    """A local engine's continuous-batching side (None if none); the calling thread frees its OpenMP pool (torch/openmp.py)."""
    kind = local_kind(engine)
    if kind == "torch":
        from livepp.engines.torch.continuous import TorchBackend as Backend
    elif kind == "llama.cpp":
        from livepp.engines.llamacpp import LlamaBackend as Backend
    else:
        return None
    release_openmp_pool()
    return Backend(engine)


class _Channel:
    """The consumer side of one stream or one batch: records waiting to be
    read, whether the consumer is waiting for more, and how it ended."""

    def __init__(self) -> None:
        self.rows: list[_Slot] = []
        # (row, record), or (row, [PositionScore, ...]) for a scored prompt's chunk
        self.pending: deque[tuple[int, Any]] = deque()
        self.on_scores: Any = None  # the consumer's callback for scored chunks
        self.waiting = False
        self.aborted = False
        self.error: BaseException | None = None
        self.queue_position: int | None = None

    def ready(self) -> bool:
        return self.aborted or (self.waiting and not self.pending)


@dataclass(eq=False)
class _Slot:
    channel: _Channel
    local: int  # row index within its channel
    row: Row
    cancelled: str | None = None
    done: bool = False


class Scheduler:
    """A local engine behind a continuous batch (see the module docstring).
    Thread-safe; ``serial`` is False because it serializes the model itself."""

    serial = False

    def __init__(self, engine: Any, *, max_batch: int = 8, max_queue: int = 24, prefill_chunk: int = 256,
                 gather_s: float = 0.01) -> None:
        if max_batch < 1 or max_queue < 0 or prefill_chunk < 1:
            raise LiveppError(f"need max_batch >= 1, max_queue >= 0, prefill_chunk >= 1; got {max_batch}, {max_queue}, {prefill_chunk}")
        self.engine = engine
        if not supports_continuous_batching(engine):
            raise LiveppError(f"continuous batching needs a local torch or llama.cpp engine, not {type(engine).__name__}")
        limit = getattr(engine, "max_rows", None)  # llama.cpp: the context's sequences
        if limit is not None and max_batch > limit:
            raise LiveppError(f"--max-batch {max_batch} is above this engine's {limit} sequences")
        self.backend = backend_for(engine)
        self.name, self.kind = self.backend.name, self.backend.kind
        self.text = self.backend.text  # the text side rows are made and sampled with (the loop's own)
        # Prompts are encoded by the threads that submit them (a copy of the
        # tokenizer): a long prompt's tokenization never holds up the loop.
        self.encoder = PromptEncoder(self.text.tokenizer, context_length=self.text.context_length, name=self.name)
        self.max_batch, self.max_queue, self.prefill_chunk = max_batch, max_queue, prefill_chunk
        # An idle engine waits this long after the latest arrival (at most 5x
        # in all) before prefilling, so a burst of requests shares one prefill;
        # while requests stop overlapping in time (a lone request waited for
        # nobody, and none has arrived since while another was queued or
        # running), a fifth of it: a client sending one request after another
        # (lm-eval with num_concurrent 1) waits 2 ms, not 10, before each, and
        # the first burst after such a phase still shares one prefill.
        self.gather_s = gather_s
        self._last_submit = 0.0
        self._bursts = True  # whether requests overlap in time (see _gather)
        self._cv = threading.Condition()
        self._queue: deque[_Slot] = deque()
        self._prefill: list[_Slot] = []
        self._prefill_steps: Iterator[Any] | None = None
        self._active: list[_Slot] = []
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.forward_passes = 0
        self.steps = 0
        self.peak_batch = 0  # the most rows one decode step has run
        self.batch_sizes: deque[int] = deque(maxlen=4096)  # rows that fed tokens in each recent step, oldest first
        self.largest_score_chunk = 0  # the most positions one scored chunk has held

    # ---- opening streams (any thread) -------------------------------------
    def open(self, prompt: Prompt | Sequence[int], params: GenerationParams, *, score: ScoreSpec | None = None,
             on_scores: Callable[[int, list[PositionScore]], None] | None = None) -> "ScheduledStream":
        """A row; a prompt of token ids is taken as given. With ``score`` its
        prompt is scored as it is prefilled, each chunk's scores handed to
        ``on_scores(row, scores)`` on the consumer's thread, before its tokens."""
        stream = ScheduledStream(self, self._submit([prompt], [params], [score], on_scores))
        if score is not None and not score.generate:
            stream.finish_reason = "length"  # scored, nothing to generate
        return stream

    def open_batch(self, prompts: Sequence[Prompt | Sequence[int]], params: Sequence[GenerationParams], *,
                   scores: Sequence[ScoreSpec | None] | None = None,
                   on_scores: Callable[[int, list[PositionScore]], None] | None = None) -> "ScheduledBatch":
        return ScheduledBatch(self, self._submit(prompts, params, scores, on_scores))

    def open_fed(self, params: GenerationParams) -> FedStream:
        """A fed row (:mod:`livepp.engines.feeding`): tokens its consumer
        hands it are fed and scored in the batch's steps."""
        channel = _Channel()
        row = Row(0, BatchRequest((), params), None, None, 0)  # type: ignore[arg-type]
        row.fed = FedState()
        with self._cv:
            self._admit(channel, [row])
        return FedStream(self, channel)

    def _feed(self, slot: _Slot, items: Sequence[Any]) -> int:
        """Queue a fed row's items; how many it will report consumed."""
        with self._cv:
            if slot.done or slot.cancelled or slot.channel.error is not None:
                raise slot.channel.error or LiveppError("the watched row has ended")
            slot.row.fed.queue.extend(items)
            self._cv.notify_all()
        return sum(1 for item in items if item is not None)

    def status(self) -> dict[str, int]:
        """Rows prefilling or decoding, rows queued, rows in the batch (rows
        already cancelled are leaving and not counted) and the limits."""
        with self._cv:
            active = sum(1 for s in self._active if not s.cancelled)
            return {"running": active + sum(1 for s in self._prefill if not s.cancelled),
                    "queued": sum(1 for s in self._queue if not s.cancelled), "batch_size": active,
                    "max_batch": self.max_batch, "max_queue": self.max_queue}

    def close(self) -> None:
        """Stop the loop; streams still open end with an error."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(30)
        self.backend.close()  # the engine is its own again

    def _submit(self, prompts: Sequence[Any], params: Sequence[GenerationParams], scores: Sequence[ScoreSpec | None] | None = None,
                on_scores: Any = None) -> _Channel:
        channel = _Channel()
        channel.on_scores = on_scores
        for prompt in prompts:
            if is_token_ids(prompt):
                bad = next((t for t in prompt if not 0 <= t < self.backend.vocab_size), None)
                if bad is not None:
                    raise LiveppError(f"token id {bad} is not in this model's vocabulary of {self.backend.vocab_size}")
            else:
                self.encoder.check_size(prompt)
        requests = batch_requests(self.encoder.encode, prompts, params, scores)
        rows = [new_row(self.text, i, r) for i, r in enumerate(requests)]
        with self._cv:
            self._admit(channel, rows)
        return channel

    def _admit(self, channel: _Channel, rows: list[Row]) -> None:
        """Rows into the queue (under the lock), or refused when it is full."""
        if self._stopping:
            raise LiveppError("the engine is shutting down")
        running = len(self._active) + len(self._prefill)
        occupied = running + len(self._queue)  # rows in the batch or waiting for it
        if occupied + len(rows) > self.max_batch + self.max_queue:
            raise EngineBusy(f"the model is busy: {running} rows running and {len(self._queue)} waiting "
                             f"(batch {self.max_batch}, queue {self.max_queue}); try again later")
        if occupied + len(rows) > self.max_batch:
            # Its place among the rows that wait for someone to leave the batch.
            channel.queue_position = max(1, occupied + 1 - self.max_batch)
        if self._queue or self._prefill or self._active or len(rows) > 1:
            self._bursts = True  # requests overlap in time: concurrent clients, whose arrivals gathering can catch
        self._last_submit = time.perf_counter()
        for i, row in enumerate(rows):
            slot = _Slot(channel, i, row)
            channel.rows.append(slot)
            self._queue.append(slot)
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="livepp-scheduler", daemon=True)
            self._thread.start()
        self._cv.notify_all()

    # ---- the consumer side (the stream's thread) ----------------------------
    def _get(self, channel: _Channel) -> tuple[int, TokenRecord]:
        while True:
            with self._cv:
                item = self._next_item(channel)
            row, record = item
            if not isinstance(record, list):
                return item
            if channel.on_scores is not None:  # a scored chunk of a prompt, on the consumer's thread
                channel.on_scores(row, record)

    def _next_item(self, channel: _Channel) -> tuple[int, Any]:
        while True:
            if channel.pending:
                channel.waiting = False  # busy with this record until it asks again
                return channel.pending.popleft()
            if channel.error is not None:
                raise channel.error
            if channel.aborted or all(s.done for s in channel.rows):
                channel.waiting = False
                raise StopIteration
            if not channel.waiting:
                channel.waiting = True
                self._cv.notify_all()
            self._cv.wait()

    def _inject(self, slot: _Slot, text: str) -> None:
        """Append ``text`` to ``slot``'s row, fed at its next step (the
        consumer's thread tokenizes it, with the submitting side's tokenizer)."""
        row = slot.row
        ids = injection_ids(lambda t: self.encoder.tokenize(t, add_special_tokens=False), text, row.position, self.text.context_length)
        with self._cv:
            if not (slot.done or slot.cancelled):
                row.inject_ids += ids

    def _cancel(self, slot: _Slot, reason: str) -> None:
        with self._cv:
            if not slot.done:
                slot.cancelled = slot.cancelled or reason
            self._cv.notify_all()

    def _abort(self, channel: _Channel, reason: str) -> None:
        with self._cv:
            channel.aborted = True
            for slot in channel.rows:
                if not slot.done:
                    slot.cancelled = slot.cancelled or reason
            self._cv.notify_all()

    # ---- the loop (the scheduler's thread) -----------------------------------
    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._stopping and not self._work_ready():
                    self._cv.wait()
                if self._stopping:
                    self._fail_all(LiveppError("the engine stopped"))
                    return
                self._drop_cancelled_queue()
                if self._prefill_steps is None:
                    self._gather()
                    self._start_prefill()
            try:
                if self._prefill_steps is not None:
                    self._prefill_chunk()  # one chunk; running rows step in between
                with self._cv:
                    # Rows that joined just now step once their consumers have read their first token.
                    stepping = self._step_ready()
                if stepping:
                    self._step()
            except Exception as exc:  # a failed forward pass fails the rows in it, not the service
                traceback.print_exc(file=sys.stderr)
                with self._cv:
                    self._fail_all(exc, keep_queue=True)

    def _gather(self) -> None:
        """With nothing running, let a burst of arrivals gather (under the lock)."""
        if self._active or not self._queue or self.gather_s <= 0:
            return
        window = self.gather_s if self._bursts else self.gather_s / 5
        cap = time.perf_counter() + 5 * self.gather_s
        arrived = len(self._queue)
        while not self._stopping and len(self._queue) < self.max_batch:
            wait = min(self._last_submit + window, cap) - time.perf_counter()
            if wait <= 0:
                break
            self._cv.wait(wait)
        if len(self._queue) == arrived == 1:
            self._bursts = False  # waited for nobody: the short wait until requests overlap again
        elif len(self._queue) > arrived:
            self._bursts = True  # the wait caught someone

    def _step_ready(self) -> bool:
        # A fed row never holds up a step; a step runs when some row has work.
        return (bool(self._active) and all(s.cancelled or s.row.fed is not None or s.channel.ready() for s in self._active)
                and any(s.cancelled or s.row.fed is None or s.row.fed.queue for s in self._active))

    def _work_ready(self) -> bool:
        if self._prefill_steps is not None:
            return True
        if self._queue and len(self._active) + len(self._prefill) < self.max_batch:
            return True
        if any(s.cancelled for s in self._queue):
            return True
        return self._step_ready()

    def _drop_cancelled_queue(self) -> None:
        for slot in [s for s in self._queue if s.cancelled]:
            self._queue.remove(slot)
            slot.done = True
        self._cv.notify_all()

    def _start_prefill(self) -> None:
        """Take queued rows while the batch has room: short prompts together,
        a long prompt alone (chunked)."""
        room = self.max_batch - len(self._active)
        if not self._queue or room <= 0:
            return
        first = self._queue[0]
        if first.row.fed is not None:  # nothing to prefill: it joins the batch empty
            self._queue.popleft()
            self.backend.join_empty()
            self._active.append(first)
            return
        short = len(first.row.request.prompt_ids) <= self.prefill_chunk
        if first.row.request.score is not None and short and hasattr(self.backend, "score_group"):
            # Short scored prompts (lm-eval's loglikelihood requests) together,
            # up to one chunk's tokens in all: one forward pass scores them all.
            group, total = [self._queue.popleft()], len(first.row.request.prompt_ids)
            while (self._queue and len(group) < room and self._queue[0].row.fed is None and self._queue[0].row.request.score is not None
                   and total + len(self._queue[0].row.request.prompt_ids) <= self.prefill_chunk):
                total += len(self._queue[0].row.request.prompt_ids)
                group.append(self._queue.popleft())
            reports = [lambda scores, s=s: self._scored(s, scores) for s in group]
            self._prefill_steps = iter(self.backend.score_group([s.row for s in group], reports))
            self._prefill = group
            return
        if first.row.request.score is not None:  # a scored prompt: alone, chunk by chunk
            group = [self._queue.popleft()]
            self._prefill_steps = iter(self.backend.score_prefill(first.row, self.prefill_chunk, lambda scores: self._scored(first, scores),
                                                                  busy=lambda: bool(self._active)))
            self._prefill = group
            return
        if len(first.row.request.prompt_ids) > self.prefill_chunk:
            group = [self._queue.popleft()]
        else:
            group = []
            while (self._queue and len(group) < room and self._queue[0].row.fed is None and self._queue[0].row.request.score is None
                   and len(self._queue[0].row.request.prompt_ids) <= self.prefill_chunk):
                group.append(self._queue.popleft())
        self._prefill_steps = iter(self.backend.prefill([s.row for s in group], self.prefill_chunk))
        self._prefill = group

    def _prefill_chunk(self) -> None:
        assert self._prefill_steps is not None
        with self._cv:
            if all(s.cancelled for s in self._prefill):  # nobody wants the rest of this prompt
                for s in self._prefill:
                    s.done = True
                self._prefill_steps, self._prefill = None, []
                self.backend.join([])
                self._cv.notify_all()
                return
        logits = next(self._prefill_steps)()
        self.forward_passes += 1
        if logits is None:
            return  # more chunks to go; running rows step in between
        self._prefill_steps = None
        group = self._prefill
        # Scored rows with nothing to generate are done; the others sample and join.
        generating = [k for k, s in enumerate(group) if s.row.request.score is None or s.row.request.score.generate]
        if len(generating) < len(group):
            with self._cv:
                for k, s in enumerate(group):
                    if k not in generating:
                        s.done = s.row.done = True
                if not generating:
                    self.backend.join([])
                    self._prefill = []
                    self._cv.notify_all()
                    return
            logits = logits[generating]  # a group of scored rows (the torch backend): its next-token logits, rows in order
        records = sample_rows(self.text, [group[k].row for k in generating], logits)
        with self._cv:
            keep = [k for k in generating if not group[k].row.done and not group[k].cancelled]
            self._deliver([group[k] for k in generating], records)
            self.backend.join(keep)
            self._active.extend(group[k] for k in keep)
            self._prefill = []

    def _scored(self, slot: _Slot, scores: list[PositionScore]) -> None:
        """A chunk of a scored prompt, for its consumer (the loop's thread)."""
        self.largest_score_chunk = max(self.largest_score_chunk, len(scores))
        with self._cv:
            if not slot.cancelled:
                slot.channel.pending.append((slot.local, scores))
                self._cv.notify_all()

    def _step(self) -> None:
        with self._cv:
            for s in self._active:
                if s.cancelled and not s.done:
                    s.done = True
            keep = [k for k, s in enumerate(self._active) if not s.done]
            if len(keep) < len(self._active):
                self._select(keep)
            rows = [s.row for s in self._active]
            self._cv.notify_all()
        if not rows:
            return
        # Each row's feed: a generating row its newest token (and an
        # intervention's text), a fed row its next queued tokens.
        plans = [plan_feed(r.fed, self.prefill_chunk) if r.fed is not None else (generating_feed(r), None) for r in rows]
        feeds = [f for f, _ in plans]
        block = self.backend.step(rows, feeds)
        self.forward_passes += 1
        self.steps += 1
        self.peak_batch = max(self.peak_batch, len(rows))
        self.batch_sizes.append(sum(1 for f in feeds if f.ids))  # rows that fed tokens (an idle fed row feeds none)
        generating = [k for k, r in enumerate(rows) if r.fed is None]
        logits, injected, per_row = split_step([rows[k] for k in generating], feeds, block, generating)
        records = sample_rows(self.text, [rows[k] for k in generating], logits, injected)
        fed = {k: (score_feed(rows[k].fed, items, feeds[k].wanted, per_row[k], rows[k].request.params), len(items))
               for k, (_, items) in enumerate(plans) if items}
        with self._cv:
            for k, scored in fed.items():
                if not self._active[k].cancelled:
                    self._active[k].channel.pending.append((0, scored))
            self._deliver([self._active[k] for k in generating], records)
            keep = [k for k, s in enumerate(self._active) if not s.done]
            if len(keep) < len(self._active):
                self._select(keep)

    def _deliver(self, slots: Sequence[_Slot], records: Sequence[TokenRecord | Exception]) -> None:
        for s, record in zip(slots, records):
            if s.cancelled:
                s.done = True
                continue
            if isinstance(record, Exception):
                # This row's failure ends its request (every row of its
                # channel) after what it already has; no other row sees it.
                channel = s.channel
                if channel.error is None:
                    channel.error = record
                for other in channel.rows:
                    if not other.done:
                        other.cancelled = other.cancelled or "error"
                s.done = True
                continue
            for injected in s.row.injected:  # an intervention's tokens, before the token after them
                s.channel.pending.append((s.local, injected))
            s.channel.pending.append((s.local, record))
            if s.row.done:
                s.done = True
        self._cv.notify_all()

    def _select(self, keep: list[int]) -> None:
        """Keep only these active rows; the others leave the batch."""
        self._active = [self._active[k] for k in keep]
        self.backend.keep(keep)

    def _fail_all(self, exc: BaseException, *, keep_queue: bool = False) -> None:
        slots = self._active + self._prefill + ([] if keep_queue else list(self._queue))
        for s in slots:
            s.done = True
            if s.channel.error is None:
                s.channel.error = exc
        self._active, self._prefill, self._prefill_steps = [], [], None
        self.backend.reset()
        if not keep_queue:
            self._queue.clear()
        self._cv.notify_all()

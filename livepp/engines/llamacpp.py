"""The llama.cpp engine: GGUF models at native speed, with the full per-token
statistics of the torch engine.

llama.cpp (through llama-cpp-python's low-level API) computes the logits;
everything after them is livepp's own, shared with the torch engine: the
full-vocabulary raw logprob, entropy, top-k and DeepConf confidence, and the
sampling with the same parameters and seeded generators
(:func:`~livepp.engines.torch.sampling.batch_token_stats` on the ``[rows,
vocab]`` logits block of a step, wrapped without a copy), the same text side (EOS, stop strings, UTF-8-safe
incremental detokenization) and the Hugging Face tokenizer and chat template
of the same GGUF, so prompts are the same token ids on both engines.

Several sequences share one llama.cpp context (one sequence id per row): the
distinct prompts are prefilled once each (rows that share a prompt copy its
KV cells), then every step decodes one token for every active row in one
``llama_decode``. A row that ends leaves at once (its cells are removed); a
stream or batch that is closed computes nothing more.

Prompt processing is batched (``n_batch`` tokens per decode) unless the
engine is ``exact``: then every prompt token is its own decode, which makes
the numbers equal a token-by-token teacher-forced llama.cpp evaluation (its
batched kernels round differently; the README gives the figures).
"""

from __future__ import annotations

import ctypes
import os
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from livepp.core.events import PositionScore, TokenRecord, TopLogprob
from livepp.core.params import GenerationParams, LiveppError, PromptTooLong
from livepp.core.stream import RecordStream
from livepp.engines.protocol import Prompt
from livepp.engines.feeding import Feed
from livepp.engines.heap import settle
from livepp.engines.torch.batch import (Row, SteppedRows, batch_requests, generating_feed, injection_ids, new_row, next_logits,
                                       records_or_raise, sample_rows)
from livepp.engines.torch.decoder import alternatives, encode_prompt
from livepp.engines.torch.sampling import position_scores

__all__ = ["LlamaCppEngine", "LlamaContext", "LlamaBackend", "llama_cpp_available"]


def llama_cpp_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


def _import_llama() -> Any:
    try:
        import llama_cpp
    except ImportError:
        raise LiveppError("the llama.cpp engine needs llama-cpp-python: pip install 'livepp[llama]'") from None
    return llama_cpp


_silence: Any = None


def _quiet(llama_cpp: Any) -> None:
    """llama.cpp logs every load to stderr; livepp keeps its own output clean."""
    global _silence
    if _silence is None:
        _silence = llama_cpp.llama_log_callback(lambda level, text, data: None)
        llama_cpp.llama_log_set(_silence, ctypes.c_void_p(0))


class LlamaContext:
    """A GGUF model and one llama.cpp context with ``n_seq`` sequences."""

    def __init__(self, path: str | os.PathLike[str], *, n_ctx: int = 0, n_seq: int = 16, n_batch: int = 512,
                 n_threads: int | None = None, logits_all: bool = False) -> None:
        llama_cpp = self.lib = _import_llama()
        _quiet(llama_cpp)
        llama_cpp.llama_backend_init()
        mparams = llama_cpp.llama_model_default_params()
        self.model = llama_cpp.llama_model_load_from_file(os.fsencode(path), mparams)
        if not self.model:
            raise LiveppError(f"llama.cpp cannot load {path}")
        train_ctx = llama_cpp.llama_model_n_ctx_train(self.model)
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = n_ctx or min(train_ctx, 8192)
        cparams.n_batch = cparams.n_ubatch = n_batch
        cparams.n_seq_max = n_seq
        cparams.kv_unified = True  # the sequences share all cells: any one may use the whole context
        threads = n_threads or max(1, (os.cpu_count() or 1))
        cparams.n_threads = cparams.n_threads_batch = threads
        cparams.no_perf = True
        self.ctx = llama_cpp.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            raise LiveppError(f"llama.cpp cannot create a context for {path}")
        self.n_ctx = llama_cpp.llama_n_ctx(self.ctx)
        self.n_seq, self.n_batch = n_seq, n_batch
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        self.batch = llama_cpp.llama_batch_init(max(n_batch, n_seq), 0, n_seq)
        self.decode_calls = 0

    def special_eos(self) -> set[int]:
        ids = {self.lib.llama_vocab_eos(self.vocab), self.lib.llama_vocab_eot(self.vocab)}
        return {i for i in ids if i >= 0}

    def decode(self, entries: Sequence[tuple[int, int, int, bool]], *, copy: bool = True) -> torch.Tensor:
        """Decode ``(token, position, sequence, wants_logits)`` entries in one
        ``llama_decode``; the logits of those that want them, in order, as one
        fp32 ``[n, V]`` block (``copy=False``: a view of llama.cpp's buffer,
        valid until the next decode)."""
        b = self.batch
        for i, (token, pos, seq, logits) in enumerate(entries):
            b.token[i] = token
            b.pos[i] = pos
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = seq
            b.logits[i] = logits
        b.n_tokens = len(entries)
        rc = self.lib.llama_decode(self.ctx, b)
        self.decode_calls += 1
        if rc != 0:
            raise LiveppError(f"llama_decode failed ({rc}): the context of {self.n_ctx} cells is full or the batch is invalid")
        wanted = sum(1 for entry in entries if entry[3])
        if not wanted:
            return torch.empty((0, self.n_vocab))
        # llama.cpp keeps the wanted logits contiguous, in batch order.
        view = np.ctypeslib.as_array(self.lib.llama_get_logits(self.ctx), shape=(wanted, self.n_vocab))
        # llama.cpp reuses its buffer at the next decode.
        return torch.from_numpy(view.copy() if copy else view)

    def prefill(self, prompt: Sequence[int], seq: int, *, exact: bool) -> torch.Tensor:
        """Process a prompt into ``seq``; the next-token logits."""
        step = 1 if exact else self.n_batch
        logits = torch.empty(0)
        for start in range(0, len(prompt), step):
            chunk = prompt[start : start + step]
            last = start + len(chunk) == len(prompt)
            logits = self.decode([(t, start + k, seq, last and k == len(chunk) - 1) for k, t in enumerate(chunk)])
        return logits[0]

    def forget(self, seq: int) -> None:
        self.lib.llama_memory_seq_rm(self.memory, seq, -1, -1)

    def copy(self, src: int, dst: int) -> None:
        self.lib.llama_memory_seq_cp(self.memory, src, dst, -1, -1)

    def clear(self) -> None:
        self.lib.llama_memory_clear(self.memory, True)

    def close(self) -> None:
        if getattr(self, "ctx", None):
            self.lib.llama_batch_free(self.batch)
            self.lib.llama_free(self.ctx)
            self.lib.llama_model_free(self.model)
            self.ctx = None


class LlamaCppEngine:
    """The engine protocol on llama.cpp (see the module docstring). Serial:
    one batch or stream at a time (the service runs it through its runner)."""

    serial = True
    kind = "llama.cpp"
    device = torch.device("cpu")

    def __init__(self, path: str | os.PathLike[str] | None = None, *, n_ctx: int = 0, max_rows: int = 16, exact: bool = False,
                 n_threads: int | None = None) -> None:
        from livepp.engines.torch.models import gguf_and_tokenizer

        gguf, self.tokenizer, self.name = gguf_and_tokenizer(path)
        self.path = str(gguf)
        self.llama = LlamaContext(gguf, n_ctx=n_ctx, n_seq=max_rows, n_threads=n_threads)
        self.context_length = self.llama.n_ctx
        self.max_rows, self.exact = max_rows, exact
        eos = {self.tokenizer.eos_token_id} if isinstance(self.tokenizer.eos_token_id, int) else set()
        self.eos_ids = frozenset(eos | self.llama.special_eos())
        self._busy = False
        settle()  # the full collection the load leaves owed, now rather than during the first generation

    # ---- what the shared text side and sampler ask of an engine -------------
    def encode(self, prompt: Prompt, *, raw: bool = False) -> list[int]:
        return encode_prompt(self.tokenizer, prompt, raw=raw, name=self.name)

    def encode_text(self, text: str) -> list[int]:
        """A text's ids without special tokens (an injected text)."""
        return [int(i) for i in self.tokenizer(text, add_special_tokens=False)["input_ids"]]

    def check(self, prompt_ids: Sequence[int], params: GenerationParams) -> None:
        if not prompt_ids:
            raise LiveppError("the prompt has no tokens")
        if len(prompt_ids) >= self.context_length:
            raise PromptTooLong(f"the prompt has {len(prompt_ids)} tokens but the llama.cpp context is {self.context_length} "
                                "tokens (at least one must be left to generate)")

    def _alternatives(self, top: tuple[tuple[int, float], ...]) -> tuple[TopLogprob, ...]:
        return alternatives(self.tokenizer, top)

    # ---- the engine protocol ---------------------------------------------------
    def open(self, prompt: Prompt, params: GenerationParams) -> RecordStream:
        batch = self.open_batch([prompt], [params])
        return RecordStream((record for _, record in batch), prompt_token_ids=batch.prompt_token_ids[0], on_close=batch.close,
                            on_inject=lambda text: batch.inject(0, text))

    def open_batch(self, prompts: Sequence[Prompt], params: Sequence[GenerationParams]) -> "LlamaBatch":
        if len(prompts) > self.max_rows:
            raise LiveppError(f"this llama.cpp engine decodes at most {self.max_rows} rows at once, got {len(prompts)}")
        requests = batch_requests(self.encode, prompts, params)
        rows = [new_row(self, i, r) for i, r in enumerate(requests)]  # validates before any compute
        return LlamaBatch(self, rows)

    # ---- teacher-forced scoring (livepp score --engine llama.cpp) ------------
    @property
    def scoring_path(self) -> str:
        return ("llama.cpp logits, every token its own decode (exact: equals llama.cpp's token-by-token evaluation)" if self.exact else
                f"llama.cpp logits, {self.llama.n_batch} tokens per decode (its batched kernels may round differently from "
                "token-by-token decoding; --exact decodes token by token)")

    def window_logits(self, rows: Sequence[Sequence[int]], keep: int) -> torch.Tensor:
        """Teacher-forced logits of the last ``keep`` positions of each row: [rows, keep, V]."""
        if self._busy:
            raise LiveppError("the llama.cpp engine is busy with a stream; close it before scoring")
        llama, out = self.llama, []
        step = 1 if self.exact else llama.n_batch
        for row in rows:
            llama.clear()
            first, logits = len(row) - keep, []
            for start in range(0, len(row), step):
                chunk = row[start : start + step]
                logits += list(llama.decode([(t, start + k, 0, start + k >= first) for k, t in enumerate(chunk)]))
            out.append(torch.stack(logits))
        llama.clear()
        return torch.stack(out)

    def close(self) -> None:
        self.llama.close()


class LlamaBatch(SteppedRows):
    """Rows decoded together in one llama.cpp context, one decode per step."""

    def __init__(self, engine: LlamaCppEngine, rows: list[Row]) -> None:
        self.engine, self.rows = engine, rows
        super().__init__([r.request.prompt_ids for r in rows])

    def inject(self, index: int, text: str) -> None:
        """Append ``text`` to row ``index`` only (its sequence), fed at its next step."""
        row = self.rows[index]
        if not row.done:
            row.inject_ids += injection_ids(self.engine.encode_text, text, row.position + len(row.inject_ids), self.engine.context_length)

    def _run(self) -> Iterator[tuple[int, TokenRecord]]:
        engine, llama = self.engine, self.engine.llama
        if engine._busy:
            raise LiveppError("the llama.cpp engine runs one stream or batch at a time; close the other one first")
        engine._busy = True
        try:
            llama.clear()
            first: dict[tuple[int, ...], tuple[int, torch.Tensor]] = {}
            logits = []
            for r in self.rows:
                prompt = r.request.prompt_ids
                if prompt not in first:
                    first[prompt] = (r.index, llama.prefill(prompt, r.index, exact=engine.exact))
                else:
                    llama.copy(first[prompt][0], r.index)  # N samples of one prompt share its prefill
                logits.append(first[prompt][1])
            active, injected = list(self.rows), {}
            while active:
                yield from self._emit(active, records_or_raise(sample_rows(engine, active, logits, injected)))
                self._apply_stops(self.rows)
                for r in active:
                    if r.done:
                        llama.forget(r.index)  # the row leaves: its cells are freed
                active = [r for r in active if not r.done]
                if not active:
                    return
                logits, injected = decode_step(llama, active, [r.index for r in active])
        finally:
            llama.clear()
            engine._busy = False


def decode_step(llama: LlamaContext, rows: Sequence[Row], seqs: Sequence[int]) -> tuple[torch.Tensor, dict[int, tuple[list[int], torch.Tensor]]]:
    """One ``llama_decode`` for every row (row k in sequence ``seqs[k]``,
    :func:`~livepp.engines.torch.batch.generating_feed`): the next-token
    logits [rows, V] (a view of llama.cpp's buffer: read before the next
    decode) and each injecting row's ids and their logits."""
    feeds = [generating_feed(r) for r in rows]
    block = llama.decode([(t, f.start + j, seq, True) for f, seq in zip(feeds, seqs) for j, t in enumerate(f.ids)], copy=False)
    return next_logits(rows, feeds, block)


class LlamaBackend:
    """The llama.cpp engine's side of continuous batching (the service's
    scheduler): every row is a sequence of the one context; a new row is
    prefilled into a free sequence id and joins at the next step; a row that
    leaves frees its cells and its id. The scheduler owns the context."""

    def __init__(self, engine: LlamaCppEngine) -> None:
        if engine._busy:
            raise LiveppError("the llama.cpp engine is busy with a stream")
        engine._busy = True  # from now on only the scheduler decodes
        self.engine, self.name, self.kind = engine, engine.name, engine.kind
        self.text, self.llama = engine, engine.llama
        self.reset()

    def prefill(self, rows: Sequence[Row], chunk: int) -> Iterator[Any]:
        """One callable per decode; the last returns each row's next-token logits."""
        seqs = self._pending = [self._free.pop(0) for _ in rows]
        step = 1 if self.engine.exact else min(chunk, self.llama.n_batch)
        first: dict[tuple[int, ...], int] = {}
        logits_of: dict[int, Any] = {}
        work = []
        for r, seq in zip(rows, seqs):
            prompt = r.request.prompt_ids
            if prompt in first:
                continue
            first[prompt] = seq
            for start in range(0, len(prompt), step):
                work.append((prompt, seq, start, min(start + step, len(prompt))))

        def run(prompt: tuple[int, ...], seq: int, start: int, end: int, last: bool) -> Any:
            out = self.llama.decode([(prompt[k], k, seq, k == len(prompt) - 1) for k in range(start, end)])
            if len(out):
                logits_of[seq] = out[0]
            if not last:
                return None
            result = []
            for r, seq_r in zip(rows, seqs):
                src = first[r.request.prompt_ids]
                if src != seq_r:
                    self.llama.copy(src, seq_r)  # N samples of one prompt share its prefill
                result.append(logits_of[src])
            return result

        for i, (prompt, seq, start, end) in enumerate(work):
            yield (lambda a=(prompt, seq, start, end, i == len(work) - 1): run(*a))

    @property
    def vocab_size(self) -> int:
        return int(self.llama.n_vocab)

    def score_prefill(self, row: Row, chunk: int, on_scores: Callable[[list[PositionScore]], None],
                      busy: Callable[[], bool] | None = None) -> Iterator[Any]:
        """A prompt prefilled into a free sequence as ``livepp score`` does it
        (``n_batch`` tokens per decode, or one with ``exact``, whatever the
        service's chunk and whether rows run), its given tokens scored from
        ``row.request.score.first`` on, a decode's logits at a time; the last
        callable returns the next-token logits."""
        ids, spec = row.request.prompt_ids, row.request.score
        assert spec is not None
        n = len(ids)
        step = 1 if self.engine.exact else self.llama.n_batch
        seq = -1

        def wanted(k: int) -> bool:  # position k's logits: the distribution of the token at k + 1, or the next token's
            return spec.first <= k + 1 <= n - 1 or k == n - 1

        for start in range(0, n, step):
            end = min(start + step, n)

            def run(start: int = start, end: int = end) -> Any:
                nonlocal seq
                if seq < 0:
                    seq = self._free.pop(0)
                    self._pending = [seq]
                out = self.llama.decode([(ids[k], k, seq, wanted(k)) for k in range(start, end)])
                scored = [k for k in range(start, end) if spec.first <= k + 1 <= n - 1]
                if scored:
                    on_scores(position_scores(out[: len(scored)], [k + 1 for k in scored], [ids[k + 1] for k in scored], spec.top,
                        entropy=spec.entropy, rank=spec.rank))
                return out[-1][None] if end == n else None

            yield run

    def join(self, keep: list[int]) -> None:
        for k, seq in enumerate(self._pending):
            if k in keep:
                self._active.append(seq)
            else:
                self._leave(seq)
        self._pending = []

    def step(self, rows: Sequence[Row], feeds: Sequence[Feed]) -> Any:
        """One decode: each row its feed in its sequence; the wanted slots' logits, rows in order."""
        entries = []
        for seq, feed in zip(self._active, feeds):
            if feed.forget:
                self.llama.forget(seq)
            wanted = set(feed.wanted)
            entries += [(t, feed.start + j, seq, j in wanted) for j, t in enumerate(feed.ids)]
        return self.llama.decode(entries, copy=False)

    def join_empty(self) -> None:
        """A row with nothing to prefill (a fed row) joins the batch in a free sequence."""
        self._active.append(self._free.pop(0))

    def keep(self, keep: list[int]) -> None:
        kept = set(keep)
        for k, seq in enumerate(self._active):
            if k not in kept:
                self._leave(seq)
        self._active = [self._active[k] for k in keep]

    def _leave(self, seq: int) -> None:
        self.llama.forget(seq)
        self._free.append(seq)

    def close(self) -> None:
        self.reset()
        self.engine._busy = False

    def reset(self) -> None:
        self.llama.clear()
        self._free = list(range(self.engine.max_rows))
        self._active: list[int] = []
        self._pending: list[int] = []


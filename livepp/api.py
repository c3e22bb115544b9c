"""The one-call Python API: generate with live monitoring, on any engine.

``model`` is an engine (anything that follows :class:`~livepp.engines.protocol.Engine`:
the local torch engine, a remote ``OpenAIEngine``, your own), a ``Decoder``,
a loaded model, a path or cached Hub id, or None for the embedded default.
Torch is imported only when a local model is asked for.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable, Iterator, Sequence

from livepp.core.monitor import Monitor, Result, Sink
from livepp.core.params import GenerationParams, LiveppError
from livepp.core.policies import Policy
from livepp.core.tracker import Tracker
from livepp.engines.protocol import Prompt
from livepp.engines.select import ModelLike, as_engine

if TYPE_CHECKING:
    from livepp.engines.torch.decoder import Decoder
    from livepp.engines.torch.models import LoadedModel
    from livepp.scoring.teacher_forced import ScoreResult

__all__ = ["generate", "generate_many", "stream_many", "astream", "as_engine", "as_decoder", "greedy_token_scores"]

def as_decoder(model: "Decoder | LoadedModel | str | os.PathLike[str] | None", *, device: str = "cpu", dtype: str = "float32") -> "Decoder":
    """The local streaming decoder for ``model`` (a decoder, a loaded model,
    a path or cached Hub id, or None for the embedded default)."""
    from livepp.engines.torch.engine import torch_engine

    return torch_engine(model, device=device, dtype=dtype).decoder


def generate(
    prompt: Prompt,
    *,
    model: ModelLike = None,
    params: GenerationParams | None = None,
    policies: Sequence[Policy] = (),
    sinks: Sequence[Sink] = (),
    window: int = 32,
    ema_alpha: float = 0.1,
    confidence_window: int = 32,
) -> Result:
    """Generate a reply to ``prompt`` while tracking its perplexity live.

    Returns a :class:`Result` with every event; pass ``sinks`` to see events as
    they happen and ``policies`` (for example ``EarlyStop``) to act on them.

    >>> from livepp import generate, GenerationParams, EarlyStop
    >>> r = generate("What is 2+2?", params=GenerationParams(max_new_tokens=16))  # doctest: +SKIP
    >>> r.end.ppl  # doctest: +SKIP
    """
    params = params or GenerationParams()
    engine = as_engine(model)
    stream = engine.open(prompt, params)  # validates before any compute
    monitor = Monitor(
        policies=policies,
        sinks=sinks,
        tracker_factory=lambda: Tracker(window=window, ema_alpha=ema_alpha, confidence_window=confidence_window),
    )
    run_params: dict[str, Any] = params.to_dict() | {
        "window": window,
        "ema_alpha": ema_alpha,
        "confidence_window": confidence_window,
    }
    return monitor.run(stream, model=engine.name, params=run_params, engine=engine.kind)


def greedy_token_scores(
    prompt: str,
    *,
    model: "Decoder | LoadedModel | str | os.PathLike[str] | None" = None,
    max_new_tokens: int = 256,
    raw: bool = False,
) -> "ScoreResult":
    """Generate greedily and return every generated token with its logprob.

    The LMDeploy recipe does this in two passes (generate, then score
    prompt+answer teacher-forced); the decoder already has the raw
    logprob of each token it picks, so one pass gives the same numbers.
    """
    from livepp.scoring.teacher_forced import ScoredToken, ScoreResult

    decoder = as_decoder(model)
    params = GenerationParams(max_new_tokens=max_new_tokens, raw=raw, top_logprobs=0, confidence_k=0)
    prompt_ids = decoder.encode(prompt, raw=raw)
    tokens = [
        ScoredToken(r.token_id, r.text, r.logprob, r.entropy if r.entropy is not None else float("nan"))
        for r in decoder.stream(prompt_ids, params)
    ]
    return ScoreResult(tokens=tokens, first_token_rule="generated tokens only, each conditioned on the prompt and the tokens before it")


def prompt_rows(prompts: Sequence[Prompt], n: int, params: GenerationParams) -> tuple[list[Prompt], list[GenerationParams]]:
    """Prompts in order, then samples: sample i = prompt i // n, draw i % n.
    Draw j of a seeded request uses seed + j, so samples differ and repeat."""
    from dataclasses import replace

    if isinstance(prompts, str) or not prompts:
        raise LiveppError("give a list of one or more prompts")
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise LiveppError(f"n must be an integer >= 1, got {n!r}")
    rows, row_params = [], []
    for prompt in prompts:
        for j in range(n):
            rows.append(prompt)
            row_params.append(params if params.seed is None or j == 0 else replace(params, seed=params.seed + j))
    return rows, row_params


def stream_many(
    prompts: Sequence[Prompt],
    *,
    n: int = 1,
    model: ModelLike = None,
    params: GenerationParams | None = None,
    policies: Callable[[], Sequence[Policy]] = lambda: [],
    window: int = 32,
    ema_alpha: float = 0.1,
    confidence_window: int = 32,
    steps: str | None = None,
) -> Iterator[tuple[int, Any]]:
    """Decode every prompt × ``n`` samples as one batch; yield ``(sample, event)``.

    Each sample has its own tracker and a fresh set of ``policies()``; a
    policy stop takes that sample out of the batch at once. Closing the
    iterator stops every sample.
    """
    from livepp.core.batch_monitor import MonitoredBatch

    params = params or GenerationParams()
    rows, row_params = prompt_rows(prompts, n, params)
    engine = as_engine(model)
    settings = {"window": window, "ema_alpha": ema_alpha, "confidence_window": confidence_window}
    batch = MonitoredBatch(engine.open_batch(rows, row_params), row_params, model=engine.name, engine=engine.kind,
                           policies=lambda i: list(policies()), tracker_factory=lambda: Tracker(**settings), run_params=settings,
                           steps=steps)
    yield from batch


def generate_many(
    prompts: Sequence[Prompt],
    *,
    n: int = 1,
    model: ModelLike = None,
    params: GenerationParams | None = None,
    policies: Callable[[], Sequence[Policy]] = lambda: [],
    sinks: Sequence[Sink] = (),
    window: int = 32,
    ema_alpha: float = 0.1,
    confidence_window: int = 32,
    steps: str | None = None,
) -> list[Result]:
    """:func:`stream_many` to the end: one :class:`Result` per sample (prompts
    in order, then samples). ``sinks`` see every event; a sink with an
    ``emit_sample(sample, event)`` method gets the sample index too."""
    from livepp.core.events import EndEvent, TokenEvent

    count = len(prompts) * n if not isinstance(prompts, str) else 0
    results = [Result() for _ in range(max(count, 0))]
    from livepp.core.batch_monitor import sample_emitter

    emitters = [sample_emitter(s) for s in sinks]
    for sample, event in stream_many(prompts, n=n, model=model, params=params, policies=policies, window=window,
                                     ema_alpha=ema_alpha, confidence_window=confidence_window, steps=steps):
        r = results[sample]
        r.events.append(event)
        if isinstance(event, TokenEvent):
            r.token_ids.append(event.token_id)
        elif isinstance(event, EndEvent):
            r.end = event
        for emit in emitters:
            emit(sample, event)
    return results


async def astream(prompts: Sequence[str], **options: Any) -> AsyncIterator[tuple[int, Any]]:
    """:func:`stream_many` for applications that live in an event loop:
    ``async for sample, event in astream(prompts, n=..., ...)``.

    The batch decodes in a worker thread and hands each event to the loop;
    leaving the loop early (``break``, ``aclose()``, task cancellation) stops
    the batch within one step and cancels the samples still running.
    """
    import asyncio
    import threading

    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Any] = asyncio.Queue()
    stop = threading.Event()
    done = object()

    def work() -> None:
        events = stream_many(prompts, **options)
        try:
            for item in events:
                loop.call_soon_threadsafe(queue.put_nowait, item)
                if stop.is_set():
                    break
        except BaseException as exc:  # handed to the consumer
            loop.call_soon_threadsafe(queue.put_nowait, exc)
        finally:
            events.close()
            loop.call_soon_threadsafe(queue.put_nowait, done)

    worker = loop.run_in_executor(None, work)
    try:
        while True:
            item = await queue.get()
            if item is done:
                break
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        await asyncio.shield(worker)

"""`livepp watch`: proxy-model PPL of a text stream, live."""

from __future__ import annotations

import sys
import time
from typing import Any, Iterator

import click

from livepp.cli.options import device_options, local_engine
from livepp.core.params import GenerationParams, LiveppError

__all__ = ["watch_cmd", "read_blocks"]


def read_blocks(source: str, *, follow: bool, idle: float, poll: float = 0.1) -> Iterator[bytes]:
    """Bytes of ``source`` ('-': standard input) as they arrive. A file is read
    to its end; with ``follow`` it is watched while it grows and ends once it
    has not grown for ``idle`` seconds."""
    if source == "-":
        return _stdin_blocks()
    try:
        handle = open(source, "rb")  # now, so a missing file is an error before anything starts
    except OSError as exc:
        raise LiveppError(f"cannot read {source}: {exc.strerror or exc}") from None
    return _file_blocks(handle, follow=follow, idle=idle, poll=poll)


def _stdin_blocks() -> Iterator[bytes]:
    stdin = getattr(sys.stdin, "buffer", sys.stdin)
    while block := stdin.read1(1 << 16):  # whatever has arrived, without waiting for more
        yield block


def _file_blocks(handle: Any, *, follow: bool, idle: float, poll: float) -> Iterator[bytes]:
    with handle:
        quiet_since = time.monotonic()
        while True:
            block = handle.read(1 << 16)
            if block:
                quiet_since = time.monotonic()
                yield block
                continue
            if not follow or time.monotonic() - quiet_since >= idle:
                return
            time.sleep(poll)


@click.command("watch")
@click.argument("source", required=False, default="-", metavar="[FILE|-]")
@click.option("--prompt", default=None, help="The text the watched text continues (scored given it, as `score --prompt`).")
@click.option("--chat", is_flag=True, help="Wrap --prompt as a user turn in the chat template; the watched text is the reply.")
@click.option("--model", "model_path", metavar="PATH", help="The proxy model: a Hugging Face model directory or .gguf (default: the embedded one).")
@click.option("--follow", is_flag=True, help="FILE is being written: keep reading as it grows (like tail -f).")
@click.option("--idle", type=click.FloatRange(min=0), default=10.0, show_default=True,
              help="With --follow: end once FILE has not grown for this many seconds.")
@click.option("--max-length", type=click.IntRange(min=2), default=None,
              help="Window length in tokens (default: the model's context, stride half of it, as `score` does for a long text).")
@click.option("--stride", type=click.IntRange(min=1), default=None, help="Tokens between window starts (default: --max-length).")
@click.option("--window", type=click.IntRange(min=1), default=32, show_default=True, help="Tokens in the window PPL.")
@click.option("--top-logprobs", type=click.IntRange(0, 100), default=5, show_default=True, help="Alternatives reported per token (0 = off).")
@click.option("--policy", "policy_specs", multiple=True, metavar="SPEC",
              help="A policy to run (repeatable), e.g. 'early-stop:threshold=20,metric=window_ppl'; a stop stops reading.")
@click.option("--steps", "show_steps", is_flag=True, help="Cut the text into reasoning steps and emit each step's PPL.")
@click.option("--step-regex", metavar="REGEX", default=None, help="Where a step ends instead (implies --steps).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON event per line instead of the live view.")
@device_options
def watch_cmd(source, prompt, chat, model_path, follow, idle, max_length, stride, window, top_logprobs, policy_specs,
              show_steps, step_regex, as_json, engine_kind, device, dtype, exact) -> None:
    """Score a text stream with a local proxy model as it arrives: FILE (with
    --follow, while it is being written) or standard input.

    Tokens are scored once each, when no later text can change them, with a
    KV cache (memory and time per token stay flat on long streams); the
    final numbers equal `livepp score` on the whole text. The PPL is the
    proxy model's, not that of whatever wrote the text. For a remote engine
    that returns no logprobs: `livepp generate --remote URL --proxy`.

    \b
    Examples:
      some-generator | livepp watch --prompt "Why is the sky blue?" --chat
      livepp watch answer.txt --follow --policy early-stop:threshold=30,metric=window_ppl
    """
    from livepp.cli.common import command_failed, monitor_one

    try:
        if engine_kind not in ("torch", "auto") or exact:
            raise LiveppError("watch scores with the torch engine (--engine torch), which has one path: no --exact")
        if source == "-" and sys.stdin.isatty():
            raise LiveppError("give a FILE, or pipe the text into standard input")
        if follow and source == "-":
            raise LiveppError("--follow is for a FILE being written; standard input is followed until it closes")
        from livepp.core.policies import parse_policy
        from livepp.core.steps import step_rule

        policies = [parse_policy(spec) for spec in policy_specs]
        steps = step_rule(step_regex if step_regex is not None else show_steps)
        engine: Any = local_engine(model_path, device=device, dtype=dtype, engine="torch")
        loaded = getattr(engine, "loaded", None)
        if loaded is None:
            raise LiveppError("watch scores with a local torch model; this engine has none")
        from livepp.engines.torch.proxy import ProxyStream, decode_chunks

        params = GenerationParams(top_logprobs=top_logprobs)
        chunks = decode_chunks(read_blocks(source, follow=follow, idle=idle))
        stream = ProxyStream(loaded, chunks, params, prompt=prompt, chat=chat, max_length=max_length, stride=stride)
        run = {"source": source, "proxy": loaded.name, "max_length": stream.scorer.max_length, "stride": stream.scorer.stride,
               "top_logprobs": top_logprobs}
        monitor_one(stream, name=loaded.name, kind="proxy", params=run, policies=policies, window=window, steps=steps, as_json=as_json)
    except BaseException as exc:
        command_failed(exc, as_json=as_json)

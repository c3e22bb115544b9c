"""`livepp serve`: the websocket service and live page."""

from __future__ import annotations

import asyncio
from typing import Any

import click

from livepp.cli.options import device_options, local_engine
from livepp.core.params import LiveppError

__all__ = ["serve_cmd"]


@click.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind; anything but loopback exposes the model.")
@click.option("--port", type=click.IntRange(0, 65535), default=8765, show_default=True, help="0 picks a free port.")
@click.option("--model", "model_path", metavar="PATH", help="A local .gguf file or Hugging Face model directory.")
@click.option("--token", default=None, envvar="LIVEPP_TOKEN", show_envvar=True,
              help="Require this secret: ws://HOST:PORT/ws?token=... or 'Authorization: Bearer ...'. Prefer the LIVEPP_TOKEN variable: arguments show in ps.")
@click.option("--max-new-tokens-cap", type=click.IntRange(min=1), default=1024, show_default=True)
@click.option("--max-requests-per-connection", type=click.IntRange(min=1), default=4, show_default=True)
@click.option("--remote", metavar="URL", help="Serve an OpenAI-compatible engine's streams instead of a local model.")
@click.option("--remote-model", metavar="NAME", help="Model name at --remote.")
@click.option("--api-key-env", metavar="VAR", help="Environment variable holding the remote API key.")
@click.option("--calibration", metavar="FILE", help="CAR calibration for route messages (default: the shipped one).")
@click.option("--allow-origin", "allowed_origins", multiple=True, metavar="ORIGIN", help="Also accept websocket connections from this page origin.")
@click.option("--allow-host", "allowed_hosts", multiple=True, metavar="HOST",
              help="Also accept requests whose Host header names HOST (besides localhost, 127.0.0.1, [::1] and the bound address); '*' accepts any.")
@click.option("--max-batch", type=click.IntRange(min=1), default=None,
              help="Requests decoded together in one forward pass per step (continuous batching); 1 runs them one token at a time in turn. "
                   "Default: 8 on a CPU, 32 on a GPU.")
@click.option("--max-queue", type=click.IntRange(min=0), default=24, show_default=True,
              help="Requests that may wait for room in the batch (they get a 'queued' event); past it a request gets a 'busy' error.")
@click.option("--prefill-chunk", type=click.IntRange(min=16), default=256, show_default=True,
              help="A longer prompt is prefilled this many tokens at a time, so running requests wait at most one chunk.")
@click.option("--policy", "policy_specs", multiple=True, metavar="SPEC",
              help="A policy every request runs (repeatable), besides its own, e.g. 'early-stop:threshold=8,metric=window_ppl'.")
@click.option("--send-timeout", type=click.FloatRange(min=0, min_open=True), default=60.0, show_default=True, metavar="SECONDS",
              help="A client that takes nothing for this long while output waits for it is disconnected and its requests cancelled.")
@click.option("--max-jobs", type=click.IntRange(min=1), default=None,
              help="Requests running at once, all connections (past it: busy / HTTP 429). Default: 32 or the batch plus its queue "
                   "with a local model; 512 with --remote.")
@click.option("--max-connections", type=click.IntRange(min=1), default=None,
              help="Websocket connections at once (HTTP connections: twice this, plus --max-jobs). Default: 64 with a local model; 1024 "
                   "with --remote.")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="With --remote: this many gateway processes on the one port, /metrics and /status covering them all.")
@click.option("--vocab-size", type=click.IntRange(min=2), default=None,
              help="With --remote: the engine's vocabulary size, for the upper bound of remote tokens' entropy (default: asked of the "
                   "engine's /tokenizer_info, else none).")
@device_options
def serve_cmd(host, port, model_path, token, max_new_tokens_cap, max_requests_per_connection, remote, remote_model, api_key_env, calibration,
              allowed_origins, allowed_hosts, max_batch, max_queue, prefill_chunk, policy_specs, send_timeout, max_jobs, max_connections,
              workers, vocab_size, engine_kind, device, dtype, exact) -> None:
    """Serve the live page at / , the websocket API at /ws, the
    OpenAI-compatible API at /v1 and /healthz. With --remote, a monitoring
    gateway: /v1 requests go on to that engine, each one monitored, stoppable
    by policies and shown on the page.

    \b
    Examples:
      livepp serve                      # then open http://127.0.0.1:8765/
      livepp serve --port 0 --token s3cret
      livepp serve --remote http://127.0.0.1:8000/v1 --remote-model qwen --policy early-stop:threshold=8
      livepp serve --remote http://gpu-box:8000/v1 --remote-model qwen --workers 2 --host 0.0.0.0 --token "$T"
    """
    from livepp.cli.common import fail as _fail

    try:
        from livepp.engines.heap import settle
        from livepp.serve.app import LOOPBACK_HOSTS, LiveppServer, ServerConfig, serve_forever

        if host.lower() not in LOOPBACK_HOSTS:
            if token is None:
                click.echo(f"livepp: warning: serving on {host} without --token (or LIVEPP_TOKEN): anyone who can reach this address can use the model", err=True)
            if not allowed_hosts:
                click.echo("livepp: note: requests must name the server as localhost, 127.0.0.1 or the bound address in their Host header; "
                           "add the names clients use with --allow-host", err=True)
        if workers > 1 and remote is None:
            raise LiveppError("--workers runs several gateway processes: it goes with --remote (a local model lives in one process)")
        if remote is not None:
            from livepp.engines.remote import probe_vocab_size, source_from_options

            engine: Any = source_from_options(remote, remote_model, api_key_env=api_key_env)
            engine.vocab_size = vocab_size or probe_vocab_size(engine)
            name = f"{remote_model} at {remote}"
        else:
            engine = local_engine(model_path, device=device, dtype=dtype, engine=engine_kind, exact=exact)
            name = engine.name
        if max_batch is None:
            on_gpu = getattr(getattr(engine, "decoder", None), "device", None)
            max_batch = 32 if on_gpu is not None and on_gpu.type == "cuda" else 8
        config = ServerConfig(host=host, port=port, token=token, max_new_tokens_cap=max_new_tokens_cap,
                              max_requests_per_connection=max_requests_per_connection, allowed_origins=tuple(allowed_origins),
                              allowed_hosts=tuple(allowed_hosts), calibration=calibration, max_batch=max_batch, max_queue=max_queue,
                              prefill_chunk=prefill_chunk, default_policies=tuple(policy_specs), send_timeout=send_timeout,
                              max_running_jobs=max_jobs or (512 if remote is not None else max(32, max_batch + max_queue)),
                              max_connections=max_connections or (1024 if remote is not None else 64))
        if workers > 1:
            from livepp.serve.workers import serve_workers

            serve_workers(engine, config, workers, ready=lambda bound: click.echo(
                f"livepp: serving {name} on http://{host}:{bound}/ ({workers} gateway workers; OpenAI API /v1, websocket /ws, "
                "health /healthz, metrics /metrics); Ctrl-C stops", err=True))
            click.echo("livepp: stopped", err=True)
            return
        server = LiveppServer(engine, config)
        batching = f"continuous batching of up to {max_batch}, queue {max_queue}" if server.scheduler is not None else "one request step at a time"

        def ready(bound: int) -> None:
            click.echo(f"livepp: serving {name} on http://{host}:{bound}/ ({batching}; websocket /ws, OpenAI API /v1, health /healthz, "
                       "metrics /metrics); Ctrl-C stops", err=True)

        settle(freeze=True)  # livepp's own process: what the start made leaves every later collection
        asyncio.run(serve_forever(server, ready=ready))
        click.echo("livepp: stopped", err=True)
    except LiveppError as exc:
        _fail(str(exc), as_json=False, code=2)
    except OSError as exc:
        _fail(f"cannot serve on {host}:{port}: {exc.strerror or exc}", as_json=False, code=2)

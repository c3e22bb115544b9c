"""`livepp generate`: one stream, or several prompts and samples as one batch, watched live."""

from __future__ import annotations

import sys
from typing import Any

import click

from livepp.cli.common import command_failed, monitor_one, read_prompt
from livepp.cli.options import device_options, local_engine
from livepp.core.params import GenerationParams, LiveppError

__all__ = ["generate"]


@click.command()
@click.argument("prompts", nargs=-1, metavar="[PROMPT]...")
@click.option("-n", "--samples", type=click.IntRange(min=1), default=1, show_default=True,
              help="Samples per prompt; several prompts and/or samples decode as one batch.")
@click.option("--model", "model_path", metavar="PATH", help="A local .gguf file or Hugging Face model directory. Default: the embedded SmolLM2-135M-Instruct.")
@click.option("--max-new-tokens", type=int, default=256, show_default=True, help="Most tokens to generate.")
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0 = greedy; > 0 samples.")
@click.option("--top-k", type=int, default=0, show_default=True, help="Sample from the K most likely tokens (0 = off).")
@click.option("--top-p", type=float, default=1.0, show_default=True, help="Nucleus sampling mass, in (0, 1].")
@click.option("--min-p", type=float, default=0.0, show_default=True, help="Drop tokens below MIN_P x the top probability.")
@click.option("--seed", type=int, default=None, help="Seed for reproducible sampling.")
@click.option("--stop", "stop_strings", multiple=True, metavar="TEXT", help="Stop when TEXT appears (repeatable).")
@click.option("--top-logprobs", type=int, default=5, show_default=True, help="Alternatives reported per token (0 = off).")
@click.option("--window", type=click.IntRange(min=1), default=32, show_default=True, help="Tokens in the window PPL.")
@click.option("--stop-ppl", type=float, default=None, metavar="X", help="Stop when the cumulative PPL exceeds X.")
@click.option("--stop-window-ppl", type=float, default=None, metavar="X", help="Stop when the window PPL exceeds X.")
@click.option("--min-tokens", type=click.IntRange(min=1), default=8, show_default=True, help="Tokens before a stop threshold is checked.")
@click.option("--patience", type=click.IntRange(min=1), default=1, show_default=True, help="Consecutive tokens over a threshold before stopping.")
@click.option("--steps", "show_steps", is_flag=True, help="Cut the reply into reasoning steps (a blank line, or a line starting 'Step N' / 'N.') and emit a 'step' event with each step's PPL as it ends.")
@click.option("--step-regex", metavar="REGEX", default=None, help="Where a step ends instead: after each match of REGEX (implies --steps).")
@click.option("--policy", "policy_specs", multiple=True, metavar="SPEC",
              help="A policy in the spec syntax of `livepp replay` (repeatable), e.g. confidence-stop:threshold=12,min_tokens=16, "
                   "spike:z=3, varentropy-stop:threshold=6,patience=2, early-stop:threshold=8,metric=ppl.")
@click.option("--ignore-eos", is_flag=True, help="Keep generating past end-of-sequence (for benchmarks).")
@click.option("--raw", is_flag=True, help="Send the prompt as raw text, without the chat template.")
@click.option("--compile", "use_compile", is_flag=True, help="torch.compile the decode step (slow first start, faster decoding).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON event per line instead of the live view.")
@click.option("--remote", metavar="URL", help="Monitor an OpenAI-compatible engine instead, e.g. http://127.0.0.1:8000/v1.")
@click.option("--remote-model", metavar="NAME", help="Model name to ask the remote engine for.")
@click.option("--remote-api", type=click.Choice(["chat", "completions"]), default="chat", show_default=True)
@click.option("--api-key-env", metavar="VAR", help="Environment variable holding the remote API key.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=60.0, show_default=True, help="Seconds to wait for the remote engine.")
@click.option("--proxy", is_flag=True, help="With --remote: ask for text only and score it live with a local proxy model "
              "(for engines that return no logprobs); the numbers are the proxy's PPL of the text, not the generator's.")
@click.option("--proxy-model", "proxy_model_path", metavar="PATH", help="The proxy model (default: the embedded SmolLM2-135M-Instruct).")
@device_options
def generate(
    prompts: tuple[str, ...],
    samples: int,
    model_path: str | None,
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    top_p: float,
    min_p: float,
    seed: int | None,
    stop_strings: tuple[str, ...],
    top_logprobs: int,
    window: int,
    stop_ppl: float | None,
    stop_window_ppl: float | None,
    min_tokens: int,
    patience: int,
    show_steps: bool,
    step_regex: str | None,
    policy_specs: tuple[str, ...],
    ignore_eos: bool,
    raw: bool,
    use_compile: bool,
    as_json: bool,
    remote: str | None,
    remote_model: str | None,
    remote_api: str,
    api_key_env: str | None,
    timeout: float,
    proxy: bool,
    proxy_model_path: str | None,
    engine_kind: str,
    device: str,
    dtype: str,
    exact: bool,
) -> None:
    """Generate a reply to PROMPT ('-' or nothing: read standard input) and
    show each token coloured by surprisal with live PPL, window PPL and entropy.

    Several PROMPTs and/or -n N samples decode together as one batch (one
    forward pass per step for all of them); --json events then carry
    "sample": i, numbering prompts in order, then samples (a seeded run uses
    seed + j for draw j).

    \b
    Examples:
      livepp generate "Why is the sky blue?"
      livepp generate "Tell me a story" --stop-window-ppl 8 --min-tokens 16
      livepp generate "Prove that 17 is prime." --policy confidence-stop:threshold=12,min_tokens=16
      echo "2+2=" | livepp generate - --raw --max-new-tokens 4 --json
      livepp generate "Name a colour." "Name a fruit." -n 4 --temperature 0.8 --seed 1 --json
    """
    try:
        params = GenerationParams(
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            min_p=min_p,
            seed=seed,
            stop=tuple(stop_strings),
            ignore_eos=ignore_eos,
            top_logprobs=top_logprobs,
            raw=raw,
        )
        from livepp.core.policies import parse_policy

        policies = _early_stops(stop_ppl, stop_window_ppl, min_tokens=min_tokens, patience=patience)
        policies += [parse_policy(spec) for spec in policy_specs]
        from livepp.core.steps import step_rule

        steps = step_rule(step_regex if step_regex is not None else show_steps)  # a bad regex: a usage error, now
        if remote is not None:
            from livepp.engines.remote import source_from_options

            engine: Any = source_from_options(remote, remote_model, api=remote_api, api_key_env=api_key_env, timeout=timeout)
            start_params = {"remote": remote, "api": remote_api}
        else:
            engine = local_engine(model_path, device=device, dtype=dtype, engine=engine_kind, exact=exact)
            start_params = {}
        if use_compile:
            from livepp.engines.torch.engine import TorchEngine

            if not isinstance(engine, TorchEngine) or len(prompts) > 1 or samples > 1:
                raise LiveppError("--compile is for one stream of a local model: not with --remote, several prompts or -n")
            engine.decoder.compile()
        if len(prompts) > 1 or samples > 1:
            _generate_batch(list(prompts), samples, engine, params, policies, window, as_json, steps)
            return
        text = read_prompt(prompts[0] if prompts else None)
        if proxy:
            if remote is None:
                raise LiveppError("--proxy scores a remote engine's text: give --remote URL too (or use `livepp watch` for a file)")
            from livepp.engines.torch.proxy import BufferedText, ProxyStream

            loaded = getattr(local_engine(proxy_model_path, device=device, dtype=dtype, engine="torch"), "loaded", None)
            if loaded is None:
                raise LiveppError("--proxy scores with a local torch model; this engine has none")
            upstream = engine.open_text(text, params)
            # Read ahead in a thread: when scoring falls behind, the backlog is scored in one pass.
            stream: Any = ProxyStream(loaded, BufferedText(r.text for r in upstream), params, prompt=text, chat=remote_api == "chat",
                                      on_close=upstream.abort)
            name, kind = f"{loaded.name} (proxy for {engine.name})", "proxy"
            start_params |= {"proxy": loaded.name}
        else:
            stream, name, kind = engine.open(text, params), engine.name, engine.kind
        monitor_one(stream, name=name, kind=kind, params=params.to_dict() | start_params, policies=policies,
                    window=window, steps=steps, as_json=as_json)
    except BaseException as exc:
        command_failed(exc, as_json=as_json)


class _SampleJsonl:
    """JSON lines of several samples, each event tagged with "sample"."""

    def emit_sample(self, sample: int, event: Any) -> None:
        from livepp.core.events import dumps, to_json_dict

        sys.stdout.write(dumps(to_json_dict(event) | {"sample": sample}) + "\n")
        sys.stdout.flush()


def _generate_batch(prompts: list[str], samples: int, engine: Any, params: GenerationParams, policies: list[Any],
                    window: int, as_json: bool, steps: str | None = None) -> None:
    import copy

    from livepp.api import generate_many

    prompts = [read_prompt(p) if p == "-" else p for p in prompts]
    if as_json:
        sink: Any = _SampleJsonl()
    else:
        from livepp.cli.terminal import SamplesView

        sink = SamplesView([f"#{i} p{i // samples}" + (f".{i % samples}" if samples > 1 else "") for i in range(len(prompts) * samples)])
    # Each sample gets its own fresh copy of the command line's policies.
    generate_many(prompts, n=samples, model=engine, params=params, policies=lambda: copy.deepcopy(policies),
                  sinks=[sink], window=window, steps=steps)


def _early_stops(stop_ppl: float | None, stop_window_ppl: float | None, *, min_tokens: int, patience: int) -> list[Any]:
    from livepp.core.policies import EarlyStop

    policies = []
    for metric, threshold in (("ppl", stop_ppl), ("window_ppl", stop_window_ppl)):
        if threshold is None:
            continue
        try:
            policies.append(EarlyStop(threshold, metric=metric, min_tokens=min_tokens, patience=patience))
        except ValueError as exc:
            raise LiveppError(f"--stop-{metric.replace('_', '-')}: {exc}") from exc
    return policies

"""`livepp score`: perplexity of given text, a target given a prompt, or JSONL records."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any, Callable

import click

from livepp.cli.options import device_options
from livepp.core.events import dumps
from livepp.core.jsonl import iter_jsonl
from livepp.core.params import LiveppError

__all__ = ["score"]


def _read_input(source: str) -> str:
    """Read FILE or '-' as strict UTF-8, with a clear error otherwise."""
    if source == "-":
        data = sys.stdin.buffer.read()
        name = "standard input"
    else:
        path = Path(source)
        if not path.is_file():
            raise LiveppError(f"no such file: {source}")
        data = path.read_bytes()
        name = source
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise LiveppError(f"{name} is not valid UTF-8 (bad byte at offset {exc.start}); convert it first, e.g. with iconv") from exc


def _records(text: str, name: str) -> list[dict[str, Any]]:
    records = []
    for where, rec in iter_jsonl(text, name):
        if not isinstance(rec, dict) or not ({"text"} <= set(rec) or {"prompt", "target"} <= set(rec)):
            raise LiveppError(f'{where}: each line needs {{"text": ...}} or {{"prompt": ..., "target": ...}}')
        records.append(rec)
    if not records:
        raise LiveppError(f"{name} has no records")
    return records


class _Progress:
    """A rich progress bar on stderr, only when stderr is a terminal."""

    def __init__(self) -> None:
        self._bar: Any = None
        self._task: Any = None

    def plan(self, windows: int) -> None:
        if windows < 2 or not sys.stderr.isatty():
            return
        from rich.console import Console
        from rich.progress import Progress

        self.close()
        self._bar = Progress(console=Console(stderr=True), transient=True)
        self._bar.start()
        self._task = self._bar.add_task("scoring windows", total=windows)

    def advance(self, n: int) -> None:
        if self._bar is not None:
            self._bar.advance(self._task, n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


def _describe(summary: dict[str, Any]) -> str:
    lines = [
        f"PPL {summary['ppl']:.4f} · mean NLL {summary['mean_nll']:.4f} nats · "
        f"{summary['bits_per_token']:.4f} bits/token · {summary['n_tokens']} tokens scored",
        f"first token: {summary['first_token_rule']}",
    ]
    if "max_length" in summary:
        forced = " (forced: the text is longer than the context)" if summary["forced_windows"] else ""
        lines.append(f"windows: {summary['windows']} (max_length {summary['max_length']}, stride {summary['stride']}){forced}")
    for note in summary.get("notes", []):
        lines.append(f"note: {note}")
    return "\n".join(lines)


@click.command()
@click.argument("source", required=False, metavar="[FILE|-]")
@click.option("--prompt", default=None, help="Score --target given this prompt.")
@click.option("--target", default=None, help="The continuation whose PPL is wanted (with --prompt).")
@click.option("--chat", is_flag=True, help="Wrap the prompt as a user turn in the chat template; the target is the reply.")
@click.option("--jsonl", "as_jsonl", is_flag=True, help='FILE holds one {"text"} or {"prompt","target"} record per line (default for *.jsonl).')
@click.option("--max-length", type=click.IntRange(min=2), default=None, help="Window length in tokens (sliding-window PPL).")
@click.option("--stride", type=click.IntRange(min=1), default=None, help="Tokens between window starts (default: max-length).")
@click.option("--batch-size", type=click.IntRange(min=1), default=1, show_default=True, help="Windows per forward pass.")
@click.option("--convention", type=click.Choice(["hf", "lm-eval"]), default="hf", show_default=True,
              help="Which tokens of a text are scored: hf = the tokenizer's own special tokens, the first token unscored "
                   "when no BOS is added (the Hugging Face guide); lm-eval = every token, after a prefix token, in "
                   "lm-evaluation-harness's loglikelihood_rolling windows.")
@click.option("--prefix-token", default=None, metavar="bos|eos|ID", help="lm-eval: the token before the text (default: BOS, else EOS).")
@click.option("--model", "model_path", metavar="PATH", help="A local .gguf file or Hugging Face model directory.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON, with every scored token.")
@click.option("--remote", metavar="URL", help="Score on an OpenAI-compatible server that serves prompt logprobs (vLLM, SGLang, "
              "livepp serve), e.g. http://127.0.0.1:8000/v1: /v1/completions with echo, logprobs 0, max_tokens 1.")
@click.option("--remote-model", metavar="NAME", help="The model name at --remote.")
@click.option("--api-key-env", metavar="VAR", help="Environment variable holding the remote API key.")
@device_options
def score(source, prompt, target, chat, as_jsonl, max_length, stride, batch_size, convention, prefix_token, model_path, as_json,
          remote, remote_model, api_key_env, engine_kind, device, dtype, exact) -> None:
    """Perplexity of a text (FILE, or '-' for standard input), or of --target
    given --prompt, or of every record of a JSONL file.

    \b
    Examples:
      livepp score /usr/share/common-licenses/GPL-3 --max-length 512 --stride 256
      livepp score --prompt "The capital of France is" --target " Paris."
      livepp score --chat --prompt "What is 2+3?" --target "2 + 3 = 5"
      livepp score records.jsonl --json
      livepp score notes.txt --max-length 512 --convention lm-eval
      livepp score notes.txt --remote http://127.0.0.1:8000/v1 --remote-model my-model
    """
    from livepp.cli.common import fail as _fail

    try:
        if stride is not None and max_length is None:
            raise LiveppError("--stride needs --max-length")
        if (prompt is None) != (target is None):
            raise LiveppError("--prompt and --target go together")
        if prompt is not None and source is not None:
            raise LiveppError("give either FILE or --prompt/--target, not both")
        if prompt is None and source is None:
            if sys.stdin.isatty():
                raise LiveppError("give a FILE, '-' for standard input, or --prompt and --target")
            source = "-"
        if convention == "lm-eval":
            if stride is not None:
                raise LiveppError("--convention lm-eval has its own windows; --stride does not apply")
            if prompt is not None:
                raise LiveppError("--convention lm-eval scores whole texts; for --prompt/--target both conventions agree (the tokenizer's own rule)")
        elif prefix_token is not None:
            raise LiveppError("--prefix-token goes with --convention lm-eval")
        prefix: str | int | None = prefix_token
        if prefix_token is not None and prefix_token not in ("bos", "eos"):
            try:
                prefix = int(prefix_token)
            except ValueError:
                raise LiveppError(f"--prefix-token must be bos, eos or a token id, got {prefix_token!r}") from None
        options = dict(max_length=max_length, stride=stride, batch_size=batch_size)
        text = _read_input(source) if source is not None else None
        jsonl = as_jsonl or (source is not None and source.endswith(".jsonl"))
        records = _records(text, source) if jsonl else None

        if remote is not None:
            _score_remote(remote, remote_model, api_key_env, text, records, prompt, target, chat=chat, convention=convention,
                          max_length=max_length, stride=stride, exact=exact, as_json=as_json)
            return
        if remote_model is not None:
            raise LiveppError("--remote-model goes with --remote")
        from livepp.scoring.teacher_forced import score_target, score_text, score_text_lm_eval

        from livepp.cli.options import engine_kind_for

        engine_kind = engine_kind_for(model_path, engine_kind)
        if exact and engine_kind != "llama.cpp":
            raise LiveppError("--exact is for --engine llama.cpp (the torch engine has one path)")
        if engine_kind == "llama.cpp":
            from livepp.engines.llamacpp import LlamaCppEngine

            if device not in ("auto", "cpu") or dtype not in ("auto", "float32"):
                raise LiveppError("--engine llama.cpp runs the .gguf's own weights on the CPU: no --device or --dtype")
            loaded: Any = LlamaCppEngine(model_path, exact=exact)
            path_note = loaded.scoring_path
        else:
            from livepp.engines.torch.models import load_model

            loaded = load_model(model_path, device=device, dtype=dtype)
            path_note = None
        progress = _Progress()
        options |= dict(progress=progress.advance, on_plan=progress.plan)

        def one(rec: dict[str, Any]) -> Any:
            try:
                if "prompt" in rec:
                    result = score_target(loaded, rec["prompt"], rec["target"], chat=chat, **options)
                elif convention == "lm-eval":
                    opts = {k: v for k, v in options.items() if k != "stride"}
                    result = score_text_lm_eval(loaded, rec["text"], prefix_token=prefix, **opts)
                else:
                    result = score_text(loaded, rec["text"], **options)
                if path_note:
                    result.notes.append(path_note)  # which llama.cpp path made the numbers
                return result
            finally:
                progress.close()

        if records is None:
            rec = {"prompt": prompt, "target": target} if prompt is not None else {"text": text}
            result = one(rec)
            _print_single(result, as_json)
        else:
            _print_records(records, one, as_json)
    except LiveppError as exc:
        _fail(str(exc), as_json=as_json, code=2)
    except Exception as exc:
        _fail(f"{type(exc).__name__}: {exc}", as_json=as_json, code=1)


def _score_remote(url: str, model: str | None, api_key_env: str | None, text: str | None, records: list[dict[str, Any]] | None,
                  prompt: str | None, target: str | None, *, chat: bool, convention: str, max_length: int | None, stride: int | None,
                  exact: bool, as_json: bool) -> None:
    import os

    from livepp.scoring.remote import RemoteScorer

    if model is None:
        raise LiveppError("--remote needs --remote-model NAME")
    if chat or convention != "hf" or exact:
        raise LiveppError("--remote scores by the server's tokenization: no --chat, --convention lm-eval or --exact")
    api_key = None
    if api_key_env is not None:
        api_key = os.environ.get(api_key_env)
        if not api_key:
            raise LiveppError(f"the environment variable {api_key_env} is not set")
    scorer = RemoteScorer(url, model, api_key=api_key)

    def one(rec: dict[str, Any]) -> Any:
        if "prompt" in rec:
            if max_length is not None:
                raise LiveppError("--max-length scores whole texts; a --prompt/--target pair is scored in one request")
            return scorer.score_target(rec["prompt"], rec["target"])
        return scorer.score_text(rec["text"], max_length=max_length, stride=stride)

    if records is None:
        _print_single(one({"prompt": prompt, "target": target} if prompt is not None else {"text": text}), as_json)
    else:
        _print_records(records, one, as_json)


def _print_single(result: Any, as_json: bool) -> None:
    summary = result.summary()
    if as_json:
        tokens = [{"token_id": t.token_id, "text": t.text, "logprob": t.logprob, "entropy": t.entropy} for t in result.tokens]
        click.echo(dumps({"type": "score", **summary, "tokens": tokens}))
    else:
        click.echo(_describe(summary))


def _print_records(records: list[dict[str, Any]], one: Callable[[dict[str, Any]], Any], as_json: bool) -> None:
    results = []
    for index, rec in enumerate(records):
        try:
            result = one(rec)
        except LiveppError as exc:
            raise LiveppError(f"record {index + 1}: {exc}") from exc
        results.append(result)
        summary = result.summary()
        if as_json:
            tokens = [{"token_id": t.token_id, "text": t.text, "logprob": t.logprob, "entropy": t.entropy} for t in result.tokens]
            row = summary
            click.echo(dumps({"type": "record", "index": index, **row, "tokens": tokens}))
        else:
            click.echo(f"record {index + 1}: PPL {summary['ppl']:.4f} · {summary['n_tokens']} tokens")
    n = sum(r.n_tokens for r in results)
    corpus_nll = math.fsum(r.sum_nll for r in results) / n
    macro = math.fsum(r.ppl for r in results) / len(results)
    corpus = {
        "records": len(results),
        "n_tokens": n,
        "corpus_mean_nll": corpus_nll,
        "corpus_ppl": math.exp(corpus_nll),
        "macro_mean_ppl": macro,
        "first_token_rule": results[0].first_token_rule,
    }
    if as_json:
        click.echo(dumps({"type": "corpus", **corpus}))
    else:
        click.echo(
            f"corpus PPL (token-weighted, exp of mean NLL over all {n} tokens): {corpus['corpus_ppl']:.4f}\n"
            f"macro mean of per-record PPLs ({len(results)} records): {macro:.4f}"
        )

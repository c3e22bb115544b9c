"""`livepp think`: DeepConf parallel thinking over sampled traces."""

from __future__ import annotations

import sys
from typing import Any

import click

from livepp.cli.options import device_options, local_engine
from livepp.core.events import dumps
from livepp.core.params import LiveppError

__all__ = ["think_cmd"]


@click.command("think")
@click.argument("question", required=False)
@click.option("--traces", type=click.IntRange(min=1), default=16, show_default=True, help="Traces in all (warm-up included).")
@click.option("--warmup", type=click.IntRange(min=1), default=4, show_default=True, help="Online: warm-up traces that set the threshold.")
@click.option("--eta", type=click.FloatRange(0, 100, min_open=True), default=90, show_default=True,
              help="Keep the most confident ETA %: 90 = DeepConf-high (the reference's default), 10 = DeepConf-low.")
@click.option("--group", type=click.IntRange(min=1), default=None,
              help="Tokens in a group confidence window. Default: 1/16 of --max-new-tokens, 8 to 2048 (the paper's 2048 is "
                   "1/16 of the reference's 32k budget); a window longer than --max-new-tokens can never stop a trace.")
@click.option("--score", "score_kind", type=click.Choice(["lowest", "tail", "bottom10", "mean"]), default="lowest", show_default=True,
              help="A trace's score for the vote: lowest group confidence, tail (mean of the last --tail-tokens), mean of the "
                   "lowest 10% of groups, or mean confidence. Offline it also picks the top ETA %; online the threshold and "
                   "the stop use the lowest group confidence, as the reference.")
@click.option("--tail-tokens", type=click.IntRange(min=1), default=None, help="--score tail: how many last tokens (default: the group window).")
@click.option("--mode", type=click.Choice(["online", "offline"]), default="online", show_default=True)
@click.option("--consensus", type=click.FloatRange(0.5, 1, min_open=True), default=None, help="Online: stop once the leading answer holds this share of the weighted vote (e.g. 0.95).")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--temperature", type=click.FloatRange(0, min_open=True), default=0.7, show_default=True)
@click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=0.95, show_default=True)
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Trace j uses seed + j.")
@click.option("--prompt", "template", default="{question}\nThink step by step, then give the final answer on the last line.",
              show_default=True, help="How the question is asked ({question} is replaced).")
@click.option("--model", "model_path", metavar="PATH", help="A local .gguf file or Hugging Face model directory.")
@click.option("--json", "as_json", is_flag=True, help="Every trace's events tagged \"sample\", then a vote line.")
@click.option("--answer", "answers", multiple=True, metavar="TEXT",
              help="An accepted answer (repeatable): the vote line says whether each vote got it right, and a recording is labelled.")
@click.option("--sweep-eta", "sweep_eta", metavar="LO..HI:STEP",
              help="Sweep eta over recorded traces instead of one vote: DeepConf online and offline at every value, from traces run "
                   "to the end once (QUESTION, or --recorded FILE: no new decoding), printed and plotted.")
@click.option("--recorded", "recorded_path", metavar="FILE", help="--sweep-eta: runs recorded by think --mode offline --json (labelled by --answer).")
@click.option("--plot", "plot_path", metavar="FILE", help="--sweep-eta: where to write the PNG (default: think-sweep-eta.png, or beside --recorded).")
@device_options
def think_cmd(question, traces, warmup, eta, group, score_kind, tail_tokens, mode, consensus, max_new_tokens, temperature, top_p, seed, template,
              model_path, as_json, answers, sweep_eta, recorded_path, plot_path, engine_kind, device, dtype, exact) -> None:
    """Answer QUESTION by DeepConf: sample several reasoning traces as one
    batch, score each by its lowest group confidence, stop weak traces early
    (online) and take a confidence-weighted vote.

    \b
    Examples:
      livepp think "What is 17 + 25?"
      livepp think "What is 17 + 25?" --traces 8 --warmup 3 --eta 10 --max-new-tokens 96
      livepp think "What is 17 + 25?" --mode offline --traces 8 --score tail --json --answer 42 > run.jsonl
      livepp think --sweep-eta 10..90:10 --recorded run.jsonl
      livepp think "What is 17 + 25?" --sweep-eta 10..90:20 --answer 42
    """
    from livepp.cli.common import fail as _fail

    try:
        if "{question}" not in template:
            raise LiveppError("--prompt must contain {question}")
        if sweep_eta is not None:
            _sweep(question, sweep_eta, recorded_path, plot_path, answers, as_json, warmup=warmup, group=group, score=score_kind,
                   tail_tokens=tail_tokens, run=lambda: _record_offline(question, answers, traces=traces, group=group, max_new_tokens=max_new_tokens,
                                                                         temperature=temperature, top_p=top_p, seed=seed, template=template,
                                                                         model_path=model_path, engine_kind=engine_kind, device=device,
                                                                         dtype=dtype, exact=exact))
            return
        if recorded_path or plot_path:
            raise LiveppError("--recorded and --plot go with --sweep-eta")
        if not question:
            raise LiveppError("give a QUESTION")
        import warnings

        from livepp.car.deepconf import default_group, think, window_warning
        from livepp.core.params import GenerationParams

        group = default_group(max_new_tokens) if group is None else group
        note = window_warning(group, max_new_tokens, mode)
        if note:
            click.echo(f"livepp: warning: {note}", err=True)
        engine = local_engine(model_path, device=device, dtype=dtype, engine=engine_kind, exact=exact)
        params = GenerationParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
        sink: Any = _JsonTraces() if as_json else _Progress(traces)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # said above, once, as a livepp warning
            result = think(question, engine=engine, traces=traces, warmup=warmup, eta=eta, group=group, mode=mode, params=params,
                           prompt=template, consensus=consensus, sinks=[sink], score=score_kind, tail_tokens=tail_tokens)
        from livepp.car.tasks import answer_matches

        right = {"answers": list(answers), "right": result.answer is not None and answer_matches(result.answer, answers)} if answers else {}
        if as_json:
            click.echo(dumps(result.vote_dict() | right))
            return
        click.echo("", err=True)
        for o in result.traces:
            click.echo(f"trace {o.sample:>2} {'(warm-up) ' if o.warmup else ''}{o.status:<9} score {o.score:7.3f} · lowest group "
                       f"{o.lowest:7.3f} · {o.n_tokens:>4} tokens · answer {o.answer!r}")
        counts = " · ".join(f"{len(result.samples(s))} {s.replace('_', ' ')}" for s in ("voted", "stopped", "excluded", "no_answer", "cancelled")
                            if result.samples(s))
        click.echo(f"threshold {result.threshold:.3f} ({mode}, eta {eta:g}, group {group}, score {score_kind}) · {counts} · "
                   f"{result.tokens} tokens in all")
        click.echo(click.style(f"answer: {result.answer}", bold=True) +
                   f"  (majority {result.majority!r}, mean-confidence vote {result.mean_confidence_answer!r})" +
                   (f" · {'right' if right['right'] else 'wrong'}" if right else ""))
    except LiveppError as exc:
        _fail(str(exc), as_json=as_json, code=2)


def _record_offline(question: str | None, answers: Any, **opts: Any) -> Any:
    """One offline run, every trace to its end, as a recording to sweep."""
    from livepp.car.deepconf import default_group, think
    from livepp.car.deepconf_sweep import RecordedRun, RecordedTrace
    from livepp.core.events import TokenRecord
    from livepp.core.params import GenerationParams

    if not question:
        raise LiveppError("--sweep-eta needs a QUESTION to decode once, or --recorded FILE")
    engine = local_engine(opts["model_path"], device=opts["device"], dtype=opts["dtype"], engine=opts["engine_kind"], exact=opts["exact"])
    params = GenerationParams(max_new_tokens=opts["max_new_tokens"], temperature=opts["temperature"], top_p=opts["top_p"], seed=opts["seed"])
    group = opts["group"] or default_group(opts["max_new_tokens"])
    tokens: dict[int, list[TokenRecord]] = {}

    class Keep:
        def emit_sample(self, sample: int, event: Any) -> None:
            if event.type == "token":
                tokens.setdefault(sample, []).append(TokenRecord(event.token_id, event.text, event.logprob, confidence=event.confidence))

    result = think(question, engine=engine, traces=opts["traces"], mode="offline", group=group, params=params, prompt=opts["template"],
                   sinks=[Keep(), _Progress(opts["traces"])])
    click.echo("", err=True)
    traces = [RecordedTrace(o.sample, tokens.get(o.sample, []), o.text, o.reason) for o in result.traces]
    return [RecordedRun(traces, group, tuple(answers) or None, question)]


def _sweep(question: str | None, spec: str, recorded: str | None, plot: str | None, answers: Any, as_json: bool, *, run: Any,
           **opts: Any) -> None:
    from pathlib import Path

    from livepp.car.curves import plot_eta_sweep
    from livepp.car.deepconf_sweep import eta_sweep, read_runs
    from livepp.core.sweep import pareto_front, parse_range

    etas = parse_range(spec)
    if recorded and question:
        raise LiveppError("give QUESTION (decoded once) or --recorded FILE, not both")
    runs = read_runs(recorded) if recorded else run()
    if answers:
        for r in runs:
            r.answers = tuple(answers)
    points = eta_sweep(runs, etas, **opts)
    labelled = points[0]["online_accuracy"] is not None
    front = pareto_front([(-p["online_tokens"], p["online_right"]) for p in points]) if labelled else [False] * len(points)
    where = Path(plot) if plot else (Path(recorded).with_name(f"{Path(recorded).stem}-sweep-eta.png") if recorded else Path("think-sweep-eta.png"))
    n = len(runs)
    title = (f"DeepConf eta sweep: {n} run(s), {points[0]['traces'] // n} traces each, warm-up {opts['warmup']}, score {opts['score']}"
             + ("" if labelled else " (unlabelled)"))
    png = plot_eta_sweep(points, where, title=title)
    if as_json:
        for p, f in zip(points, front):
            click.echo(dumps({"type": "sweep_point", "pareto": f, **p}))
        click.echo(dumps({"type": "sweep", "sweep": f"eta={spec}", "plot": str(png)}))
        return
    click.echo(title)
    click.echo(f"  {'eta':>5}  {'tokens online / all':>22}        {'stopped':>9}  {'excluded':>8}" +
               (f"  {'online right':>12}  {'offline right':>13}  {'majority right':>14}  pareto" if labelled else ""))
    for p, f in zip(points, front):
        row = (f"  {p['eta']:>5g}  {p['online_tokens']:>9}/{p['all_tokens']:<6} {100 * (1 - p['online_tokens'] / max(p['all_tokens'], 1)):4.1f}%"
               f" saved  {p['stopped']:>4}/{p['after_warmup']:<4}  {p['excluded']:>8}")
        if labelled:
            row += f"  {p['online_right']:>8}/{n:<3}  {p['offline_right']:>9}/{n:<3}  {p['majority_right']:>10}/{n:<3}  {'*' if f else ''}"
        click.echo(row)
    click.echo(f"wrote {png}" + (" (* = Pareto front: no other eta uses fewer tokens and gets as many right)" if labelled else ""))


class _JsonTraces:
    def emit_sample(self, sample: int, event: Any) -> None:
        from livepp.core.events import to_json_dict

        sys.stdout.write(dumps(to_json_dict(event) | {"sample": sample}) + "\n")
        sys.stdout.flush()


class _Progress:
    """One stderr line: traces finished so far and tokens generated."""

    def __init__(self, total: int) -> None:
        self.total, self.done, self.tokens = total, 0, 0
        self.live = sys.stderr.isatty()

    def emit_sample(self, sample: int, event: Any) -> None:
        if not self.live:
            return
        if event.type == "token":
            self.tokens += 1
        elif event.type == "end":
            self.done += 1
        else:
            return
        sys.stderr.write(f"\rtraces finished {self.done}/{self.total} · {self.tokens} tokens")
        sys.stderr.flush()

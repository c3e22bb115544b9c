"""`livepp calibrate`, `livepp route` and `livepp replay`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from livepp.cli.options import device_options, local_engine
from livepp.core.events import dumps
from livepp.core.params import LiveppError

__all__ = ["calibrate_cmd", "route_cmd", "replay_cmd"]


def _fail(message: str, as_json: bool, code: int) -> None:
    from livepp.cli.common import fail

    fail(message, as_json=as_json, code=code)


@click.command("calibrate")
@click.argument("data")
@click.option("--out", "out_path", metavar="FILE", help="Where to write the calibration JSON (not with --eval).")
@click.option("--eval", "eval_path", metavar="FILE", help="Do not fit: score DATA (questions the file was not fitted on) with this calibration.")
@click.option("--folds", type=click.IntRange(min=2), default=5, show_default=True, help="k of the k-fold cross-validation behind the held-out figures.")
@click.option("--report", "report_dir", metavar="DIR", help="Write reliability.png, histograms.png and labelled.jsonl here (default: beside --out).")
@click.option("--model", "model_path", metavar="PATH", help="Model to calibrate (default: the embedded model).")
@click.option("--threshold", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.5, show_default=True, help="Route when P(correct | PPL) is below this.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Use only the first N questions.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=24, show_default=True, help="Length cap of a short answer.")
@click.option("--measure-long", is_flag=True, help="Also answer every question by the step-by-step long route and label it, so the "
              "routing curve shows CAR with that long route, not only with a perfect one (slower).")
@click.option("--long-max-tokens", type=click.IntRange(min=1), default=256, show_default=True, help="--measure-long: length cap of a long answer.")
@click.option("--json", "as_json", is_flag=True, help="Print the calibration as JSON.")
@device_options
def calibrate_cmd(data, out_path, eval_path, folds, report_dir, model_path, threshold, limit, max_new_tokens, measure_long, long_max_tokens, as_json,
                  engine_kind, device, dtype, exact) -> None:
    """Fit CAR's PPL model on labelled questions, with held-out figures.

    DATA is a JSONL file of {"question": ..., "answers": [accepted answers]}
    lines, or a built-in task: builtin:TASK[:SPLIT] with TASK one of sums,
    products, two-digit-sums, units, capitals, mixed and SPLIT calib (default)
    or eval (disjoint halves). AUROC, ECE and Brier score are reported
    in-sample and from k-fold cross-validation (everything fitted inside the
    folds); a temperature is fitted on the held-out posteriors; early routing
    gets one model per prefix length. The report has the routing curve:
    accuracy and the fraction routed at every threshold, on held-out answers.

    \b
    Examples:
      livepp calibrate builtin:sums --out calib.json
      livepp calibrate builtin:sums --out calib.json --measure-long --long-max-tokens 96
      livepp calibrate my_questions.jsonl --out calib.json --report report/
      livepp calibrate builtin:sums:eval --eval calib.json
    """
    try:
        if (out_path is None) == (eval_path is None):
            raise LiveppError("give --out FILE to fit a calibration, or --eval FILE to score one on DATA")
        from livepp.car.calibrate import (calibrate, evaluate, heldout_routing_curve, label_long_answers, label_short_answers, write_labelled,
                                          write_report)
        from livepp.car.calibration import Calibration
        from livepp.car.tasks import load_questions

        questions = load_questions(data, limit=limit)
        engine = local_engine(model_path, device=device, dtype=dtype, engine=engine_kind, exact=exact)
        err = sys.stderr

        def progress(i: int, item: Any) -> None:
            mark = "✓" if item.correct else "✗"
            err.write(f"\r[{i + 1}/{len(questions)}] {mark} PPL {item.ppl:7.3f}  {item.question[:50]:<50}")
            err.flush()

        fitted = Calibration.load(eval_path) if eval_path else None
        labelled = label_short_answers(engine, questions, max_new_tokens=max_new_tokens, progress=progress)
        err.write("\n")
        if measure_long:
            if fitted is not None:
                raise LiveppError("--measure-long goes with --out (it draws the routing curve of a fit)")

            def long_progress(i: int, item: Any) -> None:
                err.write(f"\r[{i + 1}/{len(questions)}] long {'✓' if item.long_correct else '✗'} {item.question[:50]:<50}")
                err.flush()

            labelled = label_long_answers(engine, labelled, max_new_tokens=long_max_tokens, progress=long_progress)
            err.write("\n")
        if fitted is not None:
            result = evaluate(fitted, labelled)
            if as_json:
                click.echo(dumps(result))
                return
            click.echo(f"{result['n']} questions · {result['n_correct']} correct · scored with {eval_path}")
            click.echo(f"AUROC {result['auroc']:.3f} · ECE {result['ece']:.3f} · Brier {result['brier']:.3f}")
            click.echo(f"accuracy short only {result['accuracy_short_only']:.3f} · CAR with a perfect long route "
                       f"{result['accuracy_car_perfect_long']:.3f} · routed {100 * result['fraction_routed']:.0f}%")
            return
        out = Path(out_path)
        report = Path(report_dir or out.parent / f"{out.stem}-report")
        kept = write_labelled(labelled, report / "labelled.jsonl")
        try:
            cal = calibrate(labelled, model=engine.name, threshold=threshold, folds=folds)
        except LiveppError as exc:
            raise LiveppError(f"{exc} (the labelled answers are saved in {kept})") from exc
        out.parent.mkdir(parents=True, exist_ok=True)
        cal.save(out)
        files = write_report(cal, labelled, report)
        curve = heldout_routing_curve(labelled, cal) if cal.cv_folds else None
        if as_json:
            click.echo(dumps({"type": "calibration", **cal.to_dict(), "files": [str(f) for f in files], "routing_curve": curve}))
            return
        n = len(labelled)
        click.echo(f"{n} questions · {cal.n_correct} correct ({100 * cal.n_correct / n:.0f}%) · {cal.n_incorrect} incorrect")
        click.echo(f"in-sample: AUROC of PPL as a predictor of error {cal.auroc:.3f} (0.5 = chance) · ECE {cal.ece:.3f}")
        if cal.cv_folds is None:
            click.echo(f"held-out: not computed; {folds}-fold cross-validation needs at least 4 answers of each class")
        else:
            r = cal.cv_routing or {}
            temps = ", ".join(f"{t:.2f}" for t in cal.cv_fold_temperatures or [])
            click.echo(f"held-out ({cal.cv_folds}-fold, everything fitted inside the folds): AUROC {cal.cv_auroc:.3f} · "
                       f"ECE {cal.cv_ece:.3f} → {cal.cv_ece_scaled:.3f} · Brier {cal.cv_brier:.3f} → {cal.cv_brier_scaled:.3f} · "
                       f"NLL {cal.cv_nll:.3f} → {cal.cv_nll_scaled:.3f} after temperature scaling (T per fold {temps}; shipped T = {cal.temperature:.3f})")
            click.echo(f"held-out routing: accuracy short only {r['accuracy_short_only']:.3f} · CAR with a perfect long route "
                       f"{r['accuracy_car_perfect_long']:.3f} · routed {100 * r['fraction_routed']:.0f}%")
            click.echo(_early_line(cal))
        if curve:
            click.echo(_curve_table(curve))
        click.echo(f"fitted on {cal.space}: {cal.why_space}")
        click.echo(f"correct: mean {cal.mean_correct:.3f}, var {cal.var_correct:.4f} · incorrect: mean {cal.mean_incorrect:.3f}, var {cal.var_incorrect:.4f} · prior {cal.prior_correct:.2f}")
        click.echo(f"wrote {out} and {', '.join(str(f) for f in files)}")
    except LiveppError as exc:
        _fail(str(exc), as_json, 2)


def _curve_table(curve: list[dict[str, Any]]) -> str:
    """The routing curve at thresholds 0.1 ... 0.9 (routing.png has every 0.05)."""
    measured = curve[0].get("accuracy_car_measured_long") is not None
    rows = ["held-out routing curve: threshold · routed · accuracy with a perfect long route" +
            (" · with the measured long route" if measured else "")]
    for c in curve:
        if not (0 < c["threshold"] < 1 and abs(c["threshold"] * 10 - round(c["threshold"] * 10)) < 1e-9):
            continue
        row = f"  {c['threshold']:.1f} · {100 * c['fraction_routed']:3.0f}% · {c['accuracy_car_perfect_long']:.3f}"
        rows.append(row + (f" · {c['accuracy_car_measured_long']:.3f}" if measured else ""))
    if measured:
        best = max(curve, key=lambda c: (c["accuracy_car_measured_long"], -c["fraction_routed"]))
        rows.append(f"  short only {curve[0]['accuracy_short_only']:.3f}, long only {curve[0]['accuracy_long_only']:.3f}; with the measured "
                    f"long route the best threshold is {best['threshold']:.2f} ({best['accuracy_car_measured_long']:.3f}, "
                    f"{100 * best['fraction_routed']:.0f}% routed)")
    return "\n".join(rows)


def _early_line(cal: Any) -> str:
    models = len(cal.prefix_models or [])
    if cal.cv_early is None:
        return f"early routing: prefix models for {models} lengths; off (too few answers of a class to choose where it starts)"
    e = cal.cv_early
    rule = f"early routes of correct answers within {100 * e['margin']:.0f}% of answers out of fold, and some answer routed before its end"
    start = (f"from token {cal.early_min_tokens} (the shortest prefix with {rule})" if cal.early_min_tokens is not None else
             f"off (no prefix has {rule})")
    return (f"early routing: prefix models for {models} lengths; {start}; nested held-out: adds routes of correct answers "
            f"{100 * e['extra_correct_routed']:.1f}%, of wrong ones {100 * e['extra_wrong_routed']:.1f}%, saves "
            f"{100 * e['short_tokens_saved']:.1f}% of short-answer tokens")


@click.command("route")
@click.argument("question", required=False)
@click.option("--calibration", "calibration_path", metavar="FILE", help="Calibration from `livepp calibrate` (default: the shipped one for the embedded model).")
@click.option("--task", metavar="NAME", help="Use the shipped calibration of a built-in task (sums, products, two-digit-sums, units, capitals, mixed).")
@click.option("--early", is_flag=True, help="Route as soon as the running PPL makes 'incorrect' more likely (per-prefix calibration).")
@click.option("--model", "model_path", metavar="PATH", help="Model for the short answer (default: embedded).")
@click.option("--long-model", "long_model_path", metavar="PATH", help="Model for the long stage (default: the same model).")
@click.option("--long-remote", metavar="URL", help="Take the long stage to an OpenAI-compatible engine (with --long-remote-model).")
@click.option("--long-remote-model", metavar="NAME", help="Model name at --long-remote.")
@click.option("--long-route", type=click.Choice(["step", "vote", "deepconf"]), default="step", show_default=True,
              help="step: step-by-step reasoning; vote: majority of sampled short answers; deepconf: 8 sampled step-by-step traces, "
                   "DeepConf online (3 warm-up, eta 90, group 16), confidence-weighted vote.")
@click.option("--long-max-tokens", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--short-max-tokens", type=click.IntRange(min=1), default=24, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="JSON events of both stages, the decision and the answer.")
@device_options
def route_cmd(question, calibration_path, task, early, model_path, long_model_path, long_remote, long_remote_model, long_route, long_max_tokens, short_max_tokens, as_json, engine_kind, device, dtype, exact) -> None:
    """Answer QUESTION by CAR routing: a short answer first; if its PPL says the
    model is unsure, long reasoning instead.

    \b
    Examples:
      livepp route "What is 7 * 8?"
      livepp route "What is 47 + 38?" --early --json
      livepp route "What is the capital of Peru?" --task capitals
      livepp route "What is 47 + 38?" --calibration calib.json --long-model big.gguf
      livepp route "..." --long-remote http://127.0.0.1:8000/v1 --long-remote-model Qwen2.5-7B
    """
    try:
        from livepp.api import as_engine
        from livepp.car.calibration import Calibration, shipped_calibration
        from livepp.car.routing import DeepConfRoute, StepByStep, Vote, route
        from livepp.core.sinks import JsonlSink

        if question is None or question == "-":
            if question is None and sys.stdin.isatty():
                raise LiveppError("give a QUESTION argument, or '-' to read it from standard input")
            question = sys.stdin.read()
        if not question.strip():
            raise LiveppError("the question is empty")
        if calibration_path and task:
            raise LiveppError("give --calibration FILE or --task NAME, not both")
        cal = Calibration.load(calibration_path or shipped_calibration(task))
        engine = local_engine(model_path, device=device, dtype=dtype, engine=engine_kind, exact=exact)
        if early and cal.early_min_tokens is None:
            click.echo("livepp: warning: this calibration has no prefix to start early routing from (no prefix kept correct answers "
                       "out of fold, or too few answers of a class); --early will route only at the end of the short answer", err=True)
        if cal.model != engine.name:
            click.echo(f"livepp: warning: the calibration was fitted for {cal.model!r}, not {engine.name!r}; "
                       f"its PPL scale may not fit this model (run livepp calibrate)", err=True)
        if long_remote is not None:
            from livepp.engines.remote import OpenAIEngine

            if long_model_path or not long_remote_model:
                raise LiveppError("--long-remote needs --long-remote-model and excludes --long-model")
            long_engine: Any = OpenAIEngine(long_remote, long_remote_model)
        else:
            long_engine = as_engine(long_model_path, device=device, dtype=dtype) if long_model_path else engine
        if long_route == "step":
            long: Any = StepByStep(long_engine, max_new_tokens=long_max_tokens)
        elif long_route == "vote":
            long = Vote(long_engine)
        else:
            long = DeepConfRoute(long_engine, max_new_tokens=long_max_tokens)

        class Staged(JsonlSink):
            def __init__(self, stage: str) -> None:
                super().__init__(sys.stdout)
                self.stage = stage

            def emit(self, event: Any) -> None:
                self.emit_sample(None, event)

            def emit_sample(self, sample: int | None, event: Any) -> None:
                from livepp.core.events import to_json_dict

                extra = {"stage": self.stage} | ({} if sample is None else {"sample": sample})
                self.stream.write(dumps({**to_json_dict(event), **extra}) + "\n")
                self.stream.flush()

        def sinks_for(stage: str) -> list[Any]:
            if as_json:
                return [Staged(stage)]
            from livepp.cli.terminal import TerminalView

            click.echo(click.style(f"── {stage} answer ──", bold=True))
            return [TerminalView()]

        def on_decision(outcome: Any) -> None:
            d = outcome.decision_dict()
            if as_json:
                click.echo(dumps(d))
            else:
                verdict = "route to long reasoning" + (" (early, short answer not finished)" if outcome.early else "") if outcome.routed else "keep the short answer"
                click.echo(click.style(
                    f"decision: PPL {outcome.ppl:.3f} → P(correct) {outcome.posterior:.3f} vs threshold {outcome.threshold:g}: {verdict}", fg="yellow", bold=True))

        outcome = route(question, engine=engine, calibration=cal, long_route=long, early=early,
                        short_max_new_tokens=short_max_tokens, sinks_for=sinks_for, on_decision=on_decision)
        a = outcome.answer_dict()
        if as_json:
            click.echo(dumps(a))
        else:
            click.echo(click.style(f"answer ({a['answer_from']}): {a['text'].strip()}", bold=True))
            click.echo(f"tokens: short {a['tokens_short']} + long {a['tokens_long']} = {a['tokens_total']}")
    except LiveppError as exc:
        _fail(str(exc), as_json, 2)


@click.command("replay")
@click.argument("traces")
@click.option("--policy", "specs", multiple=True, metavar="SPEC",
              help="NAME[:key=value,...], e.g. early-stop:threshold=8,metric=window_ppl,min_tokens=16 (repeatable).")
@click.option("--sweep", "sweep_specs", multiple=True, metavar="SPEC",
              help="A policy with one option stepped as key=LO..HI:STEP, e.g. early-stop:threshold=1.5..6:0.25 (repeatable): "
                   "the trade-off at every value, printed and plotted.")
@click.option("--plot", "plot_path", metavar="FILE", help="With one --sweep: where to write its PNG (default: beside TRACES).")
@click.option("--json", "as_json", is_flag=True)
def replay_cmd(traces, specs, sweep_specs, plot_path, as_json) -> None:
    """Run recorded `livepp generate --json` traces through other policies.

    Reports, per policy, where it would have fired, the tokens it would have
    saved and, for traces labelled with "correct", how many correct answers it
    keeps and how many wrong ones it cuts short. --sweep runs a policy at
    every value of one option and prints and plots the trade-off (tokens
    saved against right answers kept and wrong answers stopped), with the
    Pareto front (the values no other value beats on both) marked.

    \b
    Examples:
      livepp replay traces.jsonl --policy early-stop:threshold=6 --policy confidence-stop:threshold=9
      livepp replay traces.jsonl --policy spike:z=3 --json
      livepp replay traces.jsonl --sweep early-stop:threshold=1.5..6:0.25,min_tokens=16
      livepp replay traces.jsonl --sweep confidence-stop:threshold=8..14:0.5 --plot conf.png
    """
    try:
        from livepp.core.policies import parse_policy
        from livepp.core.replay import read_traces, replay
        from livepp.core.sweep import parse_sweep

        if not specs and not sweep_specs:
            raise LiveppError("give --policy SPEC or --sweep SPEC")
        if plot_path and len(sweep_specs) != 1:
            raise LiveppError("--plot names the PNG of one --sweep")
        for spec in specs:
            parse_policy(spec)  # reject bad specs before any work
        for spec in sweep_specs:
            parse_sweep(spec)
        loaded = read_traces(traces)
        for spec in specs:
            report = replay(loaded, spec, lambda: parse_policy(spec))
            if as_json:
                click.echo(dumps({"type": "replay", **report.to_dict()}))
                continue
            click.echo(_replay_line(spec, report))
            click.echo("  fired at token: " + ", ".join("–" if i is None else str(i) for i in report.fired_at))
        for n, spec in enumerate(sweep_specs):
            default = Path(traces).with_name(f"{Path(traces).stem}-sweep{'-' + str(n + 1) if len(sweep_specs) > 1 else ''}.png")
            _print_sweep(loaded, spec, Path(plot_path) if plot_path else default, as_json)
    except LiveppError as exc:
        _fail(str(exc), as_json, 2)


def _replay_line(spec: str, report: Any) -> str:
    line = (f"{spec}: fired on {report.fired}/{report.traces} traces · tokens saved "
            f"{report.tokens_saved}/{report.tokens_total} ({100 * report.to_dict()['saved_fraction']:.1f}%)")
    if report.labelled:
        line += (f" · correct kept {report.correct_kept}/{report.correct_total}"
                 f" · incorrect stopped {report.incorrect_stopped}/{report.incorrect_total}")
    return line


def _print_sweep(loaded: Any, spec: str, plot: Path, as_json: bool) -> None:
    from livepp.car.curves import plot_policy_sweep
    from livepp.core.sweep import pareto_front, sweep

    s, reports = sweep(loaded, spec)
    labelled = bool(reports[0].correct_total)
    front = pareto_front([(r.tokens_saved, r.correct_kept) for r in reports]) if labelled else [False] * len(reports)
    title = f"{spec} over {reports[0].traces} traces" + (f" ({reports[0].correct_total} right, {reports[0].incorrect_total} wrong)"
                                                        if labelled else "")
    png = plot_policy_sweep(s.key, s.values, reports, plot, title=title)
    if as_json:
        for value, r, f in zip(s.values, reports, front):
            click.echo(dumps({"type": "sweep_point", "sweep": spec, s.key: value, "pareto": f, **r.to_dict()}))
        click.echo(dumps({"type": "sweep", "sweep": spec, "plot": str(png)}))
        return
    click.echo(title)
    head = f"  {s.key:>10}  {'fired':>9}  {'tokens saved':>20}"
    click.echo(head + (f"  {'right kept':>10}  {'wrong stopped':>13}  pareto" if labelled else ""))
    for value, r, f in zip(s.values, reports, front):
        saved = f"{r.tokens_saved}/{r.tokens_total} {100 * r.tokens_saved / max(r.tokens_total, 1):5.1f}%"
        row = f"  {value:>10g}  {f'{r.fired}/{r.traces}':>9}  {saved:>20}"
        if labelled:
            row += f"  {f'{r.correct_kept}/{r.correct_total}':>10}  {f'{r.incorrect_stopped}/{r.incorrect_total}':>13}  {'*' if f else ''}"
        click.echo(row)
    click.echo(f"wrote {png}" + (" (* = Pareto front: no other value saves as many tokens and keeps as many right answers)" if labelled else ""))

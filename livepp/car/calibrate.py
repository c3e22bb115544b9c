"""Calibrating CAR on labelled questions, and the report that comes with it."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from dataclasses import replace

from livepp.core.events import dumps
from livepp.car.calibration import Calibration, auroc, expected_calibration_error, fit_calibration
from livepp.car.early import choose_early_min_tokens, early_report, prefix_models
from livepp.car.heldout import brier, heldout_report, nested_posteriors, routing_curve, routing_outcome, with_heldout
from livepp.engines.protocol import Engine
from livepp.core.params import LiveppError
from livepp.car.routing import StepByStep, short_answer
from livepp.car.tasks import Question, answer_matches

__all__ = ["LabelledAnswer", "label_short_answers", "label_long_answers", "calibrate", "evaluate", "heldout_posteriors", "heldout_routing_curve",
           "write_labelled", "write_report"]


@dataclass(frozen=True)
class LabelledAnswer:
    question: str
    answers: tuple[str, ...]
    reply: str
    ppl: float
    n_tokens: int
    correct: bool
    # The running PPL after each token of the answer (for early routing).
    prefix_ppls: tuple[float, ...] = ()
    # Whether the long route answered the question right, when measured (label_long_answers).
    long_correct: bool | None = None
    long_tokens: int | None = None


def label_short_answers(
    engine: Engine,
    questions: Sequence[Question],
    *,
    max_new_tokens: int = 24,
    progress: Callable[[int, LabelledAnswer], None] | None = None,
) -> list[LabelledAnswer]:
    """Generate a greedy short answer to each question and label it."""
    out = []
    for i, q in enumerate(questions):
        result = short_answer(engine, q.question, max_new_tokens=max_new_tokens)
        assert result.end is not None
        item = LabelledAnswer(q.question, q.answers, result.text, result.end.ppl, result.end.n_tokens,
                              answer_matches(result.text, q.answers), tuple(e.ppl for e in result.tokens))
        out.append(item)
        if progress is not None:
            progress(i, item)
    return out


def label_long_answers(
    engine: Engine,
    labelled: Sequence[LabelledAnswer],
    *,
    max_new_tokens: int = 256,
    progress: Callable[[int, LabelledAnswer], None] | None = None,
) -> list[LabelledAnswer]:
    """Answer each question by the step-by-step long route too (greedy) and
    label that answer, so the routing curve can show CAR with the long route
    as it is rather than a perfect one."""
    route = StepByStep(engine, max_new_tokens=max_new_tokens)
    out = []
    for i, a in enumerate(labelled):
        long = route.run(a.question, [])
        item = replace(a, long_correct=answer_matches(long.text, a.answers), long_tokens=long.n_tokens)
        out.append(item)
        if progress is not None:
            progress(i, item)
    return out


def calibrate(labelled: Sequence[LabelledAnswer], *, model: str, threshold: float = 0.5, folds: int = 5, seed: int = 0) -> Calibration:
    """Fit on every answer; add k-fold held-out figures (everything fitted
    inside the folds: space, Gaussians, temperature), the temperature to
    ship, and the per-prefix models for early routing with the shortest
    prefix worth routing on, chosen out of fold and judged nested (see
    :mod:`livepp.car.heldout` and :mod:`livepp.car.early`)."""
    ppls, labels = [a.ppl for a in labelled], [a.correct for a in labelled]
    cal = fit_calibration(ppls, labels, model=model, threshold=threshold)
    try:
        report = heldout_report(ppls, labels, k=folds, seed=seed, threshold=threshold)
    except LiveppError:
        return cal  # too few of a class to cross-validate: the in-sample fit alone
    cal = with_heldout(cal, report)
    usable = [(a.prefix_ppls, a.correct) for a in labelled if math.isfinite(a.ppl)]  # as the held-out figures
    if usable and all(p for p, _ in usable):
        prefixes, ys = [p for p, _ in usable], [y for _, y in usable]
        models = prefix_models(prefixes, ys, space=cal.space, k=folds, seed=seed, threshold=threshold)
        chosen, judged = None, None
        if models:
            try:
                chosen = choose_early_min_tokens(prefixes, ys, k=folds, seed=seed, threshold=threshold)
                judged = early_report(prefixes, ys, k=folds, seed=seed, threshold=threshold)
            except LiveppError:
                pass  # too few of a class: early routing stays off
        cal = replace(cal, prefix_models=models, early_min_tokens=chosen, cv_early=judged)
    return cal


def heldout_posteriors(labelled: Sequence[LabelledAnswer], cal: Calibration, *, seed: int = 0) -> list[float]:
    """The held-out P(correct) of each answer, scaled by temperatures fitted
    inside the folds (the nested posteriors of the held-out figures)."""
    finite = [i for i, a in enumerate(labelled) if math.isfinite(a.ppl)]  # the answers the held-out figures use
    nested = nested_posteriors([labelled[i].ppl for i in finite], [labelled[i].correct for i in finite], k=cal.cv_folds or 5, seed=seed,
                               threshold=cal.threshold)["scaled"]
    # An infinite PPL (a token of probability 0) is in no fold: the shipped calibration's posterior for it.
    out = [cal.posterior_correct(a.ppl) for a in labelled]
    for i, p in zip(finite, nested):
        out[i] = p
    return out


def heldout_routing_curve(labelled: Sequence[LabelledAnswer], cal: Calibration, *, held: Sequence[float] | None = None) -> list[dict[str, float]]:
    """Accuracy and the fraction routed at every routing threshold, on the
    held-out posteriors; with the measured long route when every answer has one."""
    held = heldout_posteriors(labelled, cal) if held is None else held
    long = [a.long_correct for a in labelled]
    return routing_curve(held, [a.correct for a in labelled], long_labels=long if all(x is not None for x in long) else None)


def evaluate(cal: Calibration, labelled: Sequence[LabelledAnswer]) -> dict[str, object]:
    """Score a fitted calibration on answers it was not fitted on."""
    posts = [cal.posterior_correct(a.ppl) for a in labelled]
    labels = [a.correct for a in labelled]
    return {
        "type": "evaluation", "n": len(labelled), "n_correct": sum(labels),
        "auroc": auroc([a.ppl for a in labelled], [not y for y in labels]),
        "ece": expected_calibration_error(posts, labels), "brier": brier(posts, labels),
        **routing_outcome(posts, labels, cal.threshold),
    }


def write_report(cal: Calibration, labelled: Sequence[LabelledAnswer], directory: str | Path) -> list[Path]:
    """Reliability diagram, class histograms with the fitted curves and (with
    held-out figures) the routing curve, as PNG, plus the labelled answers as
    JSONL. Returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    posts = [cal.posterior_correct(a.ppl) for a in labelled]
    correct = [a.correct for a in labelled]
    held = heldout_posteriors(labelled, cal) if cal.cv_folds else None

    def binned(ps: list[float]) -> tuple[list[float], list[float], list[int]]:
        # Mean predicted P(correct) against observed accuracy per bin.
        xs, ys, ns = [], [], []
        for b in range(10):
            idx = [i for i, p in enumerate(ps) if min(int(p * 10), 9) == b]
            if idx:
                xs.append(sum(ps[i] for i in idx) / len(idx))
                ys.append(sum(correct[i] for i in idx) / len(idx))
                ns.append(len(idx))
        return xs, ys, ns

    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    if held is not None:
        xs, ys, ns = binned(held)
        ax.scatter(xs, ys, s=[20 + 8 * n for n in ns], color="tab:blue", label=f"held-out ({cal.cv_folds}-fold, T fitted inside the folds)")
        ax.plot(xs, ys, color="tab:blue")
    xs, ys, ns = binned(posts)
    ax.scatter(xs, ys, s=[10 + 4 * n for n in ns], color="tab:grey", alpha=0.5, label="in-sample")
    ax.set_xlabel("predicted P(correct | PPL)")
    ax.set_ylabel("observed accuracy")
    title = f"ECE in-sample {cal.ece:.3f}"
    if cal.cv_ece is not None:
        title = f"held-out ECE {cal.cv_ece:.3f} → {cal.cv_ece_scaled:.3f} scaled, AUROC {cal.cv_auroc:.3f}"
    ax.set_title(title, fontsize=9)
    ax.legend(loc="upper left")
    reliability = d / "reliability.png"
    fig.tight_layout()
    fig.savefig(reliability, dpi=100)
    plt.close(fig)

    # Histograms of the fitted variable per class with the two Gaussians.
    f = math.log if cal.space == "log_ppl" else (lambda v: v)
    xc = [f(a.ppl) for a in labelled if a.correct and math.isfinite(a.ppl)]
    xi = [f(a.ppl) for a in labelled if not a.correct and math.isfinite(a.ppl)]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.hist([xc, xi], bins=20, density=True, alpha=0.6, label=[f"correct ({len(xc)})", f"incorrect ({len(xi)})"], color=["tab:green", "tab:red"])
    lo, hi = min(xc + xi), max(xc + xi)
    grid = [lo + (hi - lo) * k / 200 for k in range(201)]
    for mean, var, colour in ((cal.mean_correct, cal.var_correct, "tab:green"), (cal.mean_incorrect, cal.var_incorrect, "tab:red")):
        ax.plot(grid, [math.exp(-0.5 * (x - mean) ** 2 / var) / math.sqrt(2 * math.pi * var) for x in grid], color=colour)
    ax.set_xlabel("log PPL of the short answer" if cal.space == "log_ppl" else "PPL of the short answer")
    ax.set_ylabel("density")
    ax.set_title("Short-answer perplexity by outcome, with fitted Gaussians")
    ax.legend()
    histograms = d / "histograms.png"
    fig.tight_layout()
    fig.savefig(histograms, dpi=100)
    plt.close(fig)

    files = [reliability, histograms]
    if held is not None:
        from livepp.car.curves import plot_routing_curve

        measured = "" if labelled[0].long_correct is None else ", with the step-by-step long route measured"
        files.append(plot_routing_curve(heldout_routing_curve(labelled, cal, held=held), d / "routing.png", threshold=cal.threshold,
                                        title=f"CAR on {len(labelled)} held-out answers ({cal.cv_folds}-fold, nested){measured}"))
    files.append(write_labelled(labelled, d / "labelled.jsonl", posteriors=posts, heldout=held))
    return files


def write_labelled(labelled: Sequence[LabelledAnswer], path: str | Path, *, posteriors: Sequence[float] | None = None,
                   heldout: Sequence[float] | None = None) -> Path:
    """The generated short answers with their labels, one JSON object per line
    (with the in-sample and held-out posteriors once fitted, and the long
    route's outcome when measured).

    Written before fitting too, so a failed fit (too few of a class) never
    loses the minutes of generation that produced them."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with p.open("w", encoding="utf-8") as fh:
        for i, a in enumerate(labelled):
            row = {"question": a.question, "answers": list(a.answers), "reply": a.reply, "ppl": a.ppl, "n_tokens": a.n_tokens,
                   "correct": a.correct, "prefix_ppls": list(a.prefix_ppls)}
            if a.long_correct is not None:
                row |= {"long_correct": a.long_correct, "long_tokens": a.long_tokens}
            if posteriors is not None:
                row["posterior_correct"] = posteriors[i]
            if heldout is not None:
                row["heldout_posterior_correct"] = heldout[i]
            fh.write(dumps(row) + "\n")
    return p

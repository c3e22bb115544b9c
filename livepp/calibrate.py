"""Calibrating CAR on labelled questions, and the report that comes with it."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from .events import dumps
from .car import Calibration, fit_calibration
from .decoder import Decoder
from .routing import short_answer
from .tasks import Question, answer_matches

__all__ = ["LabelledAnswer", "label_short_answers", "calibrate", "write_labelled", "write_report"]


@dataclass(frozen=True)
class LabelledAnswer:
    question: str
    answers: tuple[str, ...]
    reply: str
    ppl: float
    n_tokens: int
    correct: bool


def label_short_answers(
    decoder: Decoder,
    questions: Sequence[Question],
    *,
    max_new_tokens: int = 24,
    progress: Callable[[int, LabelledAnswer], None] | None = None,
) -> list[LabelledAnswer]:
    """Generate a greedy short answer to each question and label it."""
    out = []
    for i, q in enumerate(questions):
        result = short_answer(decoder, q.question, max_new_tokens=max_new_tokens)
        assert result.end is not None
        item = LabelledAnswer(q.question, q.answers, result.text, result.end.ppl, result.end.n_tokens, answer_matches(result.text, q.answers))
        out.append(item)
        if progress is not None:
            progress(i, item)
    return out


def calibrate(labelled: Sequence[LabelledAnswer], *, model: str, threshold: float = 0.5) -> Calibration:
    return fit_calibration([a.ppl for a in labelled], [a.correct for a in labelled], model=model, threshold=threshold)


def write_report(cal: Calibration, labelled: Sequence[LabelledAnswer], directory: str | Path) -> list[Path]:
    """Reliability diagram and class histograms with the fitted curves (PNG),
    plus the labelled answers as JSONL. Returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    posts = [cal.posterior_correct(a.ppl) for a in labelled]
    correct = [a.correct for a in labelled]

    # Reliability diagram: mean predicted P(correct) against observed accuracy per bin.
    bins = 10
    fig, ax = plt.subplots(figsize=(5, 5))
    xs, ys, ns = [], [], []
    for b in range(bins):
        idx = [i for i, p in enumerate(posts) if min(int(p * bins), bins - 1) == b]
        if idx:
            xs.append(sum(posts[i] for i in idx) / len(idx))
            ys.append(sum(correct[i] for i in idx) / len(idx))
            ns.append(len(idx))
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    ax.scatter(xs, ys, s=[20 + 8 * n for n in ns], color="tab:blue", label="bins (size = count)")
    ax.plot(xs, ys, color="tab:blue")
    ax.set_xlabel("predicted P(correct | PPL)")
    ax.set_ylabel("observed accuracy")
    ax.set_title(f"Reliability — ECE {cal.ece:.3f}, AUROC {cal.auroc:.3f}")
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

    answers = write_labelled(labelled, d / "labelled.jsonl", posteriors=posts)
    return [reliability, histograms, answers]


def write_labelled(labelled: Sequence[LabelledAnswer], path: str | Path, *, posteriors: Sequence[float] | None = None) -> Path:
    """The generated short answers with their labels, one JSON object per line.

    Written before fitting too, so a failed fit (too few of a class) never
    loses the minutes of generation that produced them."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with p.open("w", encoding="utf-8") as fh:
        for i, a in enumerate(labelled):
            row = {"question": a.question, "answers": list(a.answers), "reply": a.reply, "ppl": a.ppl, "n_tokens": a.n_tokens, "correct": a.correct}
            if posteriors is not None:
                row["posterior_correct"] = posteriors[i]
            fh.write(dumps(row) + "\n")
    return p

"""Curves to choose thresholds from, as PNG files: a policy swept over
recorded traces (``replay --sweep``), DeepConf's η swept over recorded
traces (``think --sweep-eta``), and CAR's routing threshold against
accuracy (``calibrate``). The Pareto points (no other point is at least as
good on both axes and better on one) are drawn large and joined.

matplotlib is imported when a curve is drawn, never before.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from livepp.core.sweep import pareto_front

__all__ = ["plot_policy_sweep", "plot_eta_sweep", "plot_routing_curve"]


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str | Path) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(p, dpi=100)
    _pyplot().close(fig)
    return p


def _front(ax: Any, xs: Sequence[float], ys: Sequence[float], labels: Sequence[str], colour: str, name: str) -> None:
    """Every point, its label, and the Pareto front on (x, y) joined in x order."""
    front = pareto_front(list(zip(xs, ys)))
    ax.scatter(xs, ys, s=18, color=colour, alpha=0.45, label=name)
    on = sorted((x, y) for x, y, f in zip(xs, ys, front) if f)
    ax.plot([x for x, _ in on], [y for _, y in on], "-o", color=colour, markersize=7, markeredgecolor="black",
            label=f"{name}: Pareto front")
    for x, y, label, f in zip(xs, ys, labels, front):
        if f:
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)


def plot_policy_sweep(key: str, values: Sequence[float], reports: Sequence[Any], path: str | Path, *, title: str) -> Path:
    """Tokens saved against right answers kept and wrong answers stopped, one
    point per value (labelled traces), else tokens saved against the value."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 5))
    saved = [100 * r.tokens_saved / r.tokens_total if r.tokens_total else 0.0 for r in reports]
    labels = [f"{key}={v:g}" for v in values]
    if reports and reports[0].correct_total:
        kept = [100 * r.correct_kept / r.correct_total for r in reports]
        _front(ax, saved, kept, labels, "tab:green", "right answers kept")
        if reports[0].incorrect_total:
            stopped = [100 * r.incorrect_stopped / r.incorrect_total for r in reports]
            ax.plot(saved, stopped, "^", color="tab:red", alpha=0.7, label="wrong answers stopped")
        ax.set_ylabel("% of right answers kept / of wrong answers stopped")
        ax.set_xlabel("tokens saved (%)")
    else:
        ax.plot(values, saved, "-o", color="tab:blue", label="tokens saved")
        ax.set_xlabel(key)
        ax.set_ylabel("tokens saved (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return _save(fig, path)


def plot_eta_sweep(points: Sequence[dict[str, Any]], path: str | Path, *, title: str) -> Path:
    """DeepConf online at each η: accuracy against tokens (as a share of
    running every trace to the end), with offline DeepConf and plain majority
    at the full budget for reference."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 5))
    xs = [100 * p["online_tokens"] / p["all_tokens"] for p in points]
    labelled = points and points[0].get("online_accuracy") is not None
    if labelled:
        _front(ax, [100 - x for x in xs], [100 * p["online_accuracy"] for p in points], [f"η={p['eta']:g}" for p in points],
               "tab:blue", "DeepConf online")
        ax.scatter([0] * len(points), [100 * p["offline_accuracy"] for p in points], marker="s", color="tab:purple", alpha=0.5,
                   label="DeepConf offline (all traces run)")
        ax.axhline(100 * points[0]["majority_accuracy"], color="grey", linestyle="--", label="plain majority (all traces run)")
        ax.set_ylabel("accuracy (%)")
    else:
        ax.plot([p["eta"] for p in points], [100 - x for x in xs], "-o", color="tab:blue", label="DeepConf online")
        ax.set_ylabel("tokens saved (%)")
    ax.set_xlabel("tokens saved against running every trace (%)" if labelled else "η")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return _save(fig, path)


def plot_routing_curve(curve: Sequence[dict[str, Any]], path: str | Path, *, threshold: float, title: str) -> Path:
    """CAR accuracy against the routing threshold: short answers only, CAR if
    the long route were always right, CAR with the measured long route (when
    measured); the fraction routed on the right axis."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 5))
    ts = [c["threshold"] for c in curve]
    ax.plot(ts, [100 * c["accuracy_short_only"] for c in curve], "--", color="grey", label="short answers only")
    ax.plot(ts, [100 * c["accuracy_car_perfect_long"] for c in curve], "-", color="tab:green", label="CAR, a perfect long route")
    if curve and curve[0].get("accuracy_car_measured_long") is not None:
        ax.plot(ts, [100 * c["accuracy_car_measured_long"] for c in curve], "-o", markersize=3, color="tab:blue",
                label="CAR, the measured long route")
        ax.axhline(100 * curve[0]["accuracy_long_only"], color="tab:blue", linestyle=":", label="long route only")
    ax.axvline(threshold, color="black", linewidth=0.8, label=f"threshold in the file ({threshold:g})")
    ax.set_xlabel("routing threshold on held-out P(correct | PPL)")
    ax.set_ylabel("accuracy (%)")
    routed = ax.twinx()
    routed.plot(ts, [100 * c["fraction_routed"] for c in curve], color="tab:orange", alpha=0.8, label="routed (%)")
    routed.set_ylabel("questions routed to the long route (%)", color="tab:orange")
    routed.set_ylim(-2, 102)
    lines = ax.get_legend_handles_labels()
    more = routed.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], fontsize=8, loc="lower left")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    return _save(fig, path)

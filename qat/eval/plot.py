"""report.png: perplexity (or another quality metric) against weight size, one labelled point per run, the float model marked.

Drawn on a bare `Figure` with the Agg canvas: no pyplot global state, no display needed.
"""
from __future__ import annotations

from pathlib import Path

MB = 1e6
QAT_COLOR, PTQ_COLOR, FLOAT_COLOR = "tab:blue", "tab:orange", "black"


def _log_scale_needed(values: list[float]) -> bool:
    """Log perplexity once the spread passes 5x (a W2 run at 1e5 flattens everything else)."""
    values = [v for v in values if v and v > 0]
    return bool(values) and max(values) / min(values) > 5


def _label_points(ax, points: list[tuple[float, float, str]], fontsize: int = 9) -> None:
    """Name each point beside it, pushing a label down while it would overlap one already placed
    (recipes of nearly equal size, such as sym and asym of one bit width, sit on top of each other)."""
    ax.get_xlim(), ax.get_ylim()  # settle autoscaling so data -> pixel transforms are final
    placed: list[tuple[float, float, float]] = []  # (left, bottom, right) in pixels
    line = fontsize * 1.4  # label height in pixels at dpi 100 points; ample at 120
    for x, y, name in sorted(points, key=lambda p: -p[1]):
        px, py = ax.transData.transform((x, y))
        dy, width = 4.0, 0.6 * fontsize * len(name) * ax.figure.dpi / 72
        while any(abs(py + dy - b) < line and px < r and px + width > l for l, b, r in placed):
            dy -= line
        placed.append((px, py + dy, px + width))
        ax.annotate(name, (x, y), textcoords="offset pixels", xytext=(6, dy), fontsize=fontsize,
                    va="bottom")


def plot_sweep(rows, baseline: dict, path: str | Path, title: str = "Perplexity vs weight size",
               metric: str = "ppl",
               ylabel: str = "perplexity on the eval set (lower is better)"):
    """Save the scatter of `metric` against size to `path` (PNG).

    Args:
        rows: `qat.eval.report.RunRow`s; runs without a size or the metric are left out.
        baseline: {"ppl": float model perplexity or None, "bf16_bytes": its bf16 size or None,
            and the float model's value of any other metric}.
        path: the PNG to write.
        title: the figure title.
        metric: a RunRow metric (ppl, kl_mean, kl_p99, top1, cloze_acc); only ppl has the
            before-training points (PTQ ppl).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 5.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    runs = [r for r in rows if r.size_bytes is not None and r.scheme != "float"
            and r.metric(metric) is not None]
    xs = [r.size_bytes / MB for r in runs]
    ys = [r.metric(metric) for r in runs]
    ax.scatter(xs, ys, color=QAT_COLOR, zorder=3, label=f"after training ({metric})")
    ptq = [r for r in runs if r.ptq_ppl is not None] if metric == "ppl" else []
    if ptq:
        ax.scatter([r.size_bytes / MB for r in ptq], [r.ptq_ppl for r in ptq], facecolors="none",
                   edgecolors=PTQ_COLOR, zorder=3, label="before training (PTQ ppl)")
        for r in ptq:  # the arrow is what training bought
            ax.annotate("", xy=(r.size_bytes / MB, r.ppl), xytext=(r.size_bytes / MB, r.ptq_ppl),
                        arrowprops={"arrowstyle": "->", "color": "grey", "lw": 0.8})
    reference = baseline.get(metric)
    if reference is not None:
        ax.axhline(reference, color=FLOAT_COLOR, ls="--", lw=1,
                   label=f"float model ({reference:.3f})")
        if baseline.get("bf16_bytes"):
            x = baseline["bf16_bytes"] / MB
            ax.scatter([x], [reference], marker="*", s=160, color=FLOAT_COLOR, zorder=4,
                       label="float model at bf16 size")
            ax.annotate("float (bf16)", (x, reference), textcoords="offset points",
                        xytext=(-8, 8), ha="right", fontsize=9)
    if metric == "ppl" and _log_scale_needed(ys + [r.ptq_ppl for r in ptq] + [reference]):
        ax.set_yscale("log")
    ax.set_xlabel("model weight size (MB, 1 MB = 10^6 bytes)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.margins(x=0.15, y=0.1)
    _label_points(ax, [(x, y, r.recipe) for r, x, y in zip(runs, xs, ys)])
    ax.legend(loc="best", fontsize=9)
    fig.tight_layout()
    fig.savefig(str(path), format="png")
    return path

"""PNG helpers shared by tune, ablate and report: matplotlib's Agg backend, imported only when a plot is drawn,
and atomic writes so a killed run never leaves half a PNG."""

from __future__ import annotations

import os


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | os.PathLike, dpi: int = 110) -> str:
    from chatforge.io import atomic_path

    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    pyplot().close(fig)
    return str(path)


def bar_chart(labels: list[str], values: list[float], path: str | os.PathLike, ylabel: str, title: str = "",
              annotate: str = "{:.3f}") -> str:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    bars = ax.bar(labels, values, color="#4c72b0")
    for bar, v in zip(bars, values):
        ax.annotate(annotate.format(v), (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                    va="bottom", fontsize=9)
    lo, hi = min(values), max(values)
    if lo > 0 and hi > lo:  # zoom in on differences; bars of nearly equal height say nothing otherwise
        ax.set_ylim(max(0.0, lo - 2 * (hi - lo)), hi + 0.5 * (hi - lo))
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    return save_figure(fig, path)


def curves(series: dict[str, tuple[list[float], list[float]]], path: str | os.PathLike, xlabel: str, ylabel: str,
           title: str = "") -> str:
    """One line per name: (x values, y values)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for name, (xs, ys) in series.items():
        ax.plot(xs, ys, "o-", ms=3, lw=1.5, label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, path)

"""PNG line plots of benchmark rows: one panel per model, one line per setup."""

from __future__ import annotations

from collections.abc import Callable

from bench.load import RESULTS, BenchError


def lines(stem: str, rows: list[dict], *, series: str, x: str, y: Callable[[dict], float], title: str,
          xlabel: str, ylabel: str, log2_x: bool = True) -> None:
    """bench/results/<stem>.png: a panel per rows' "model", a line per value of row[series], x on a log2
    scale (client counts double) unless log2_x is False."""
    try:
        import matplotlib
    except ImportError:
        raise BenchError("matplotlib is missing: pip install -e '.[dev]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    labels = list(dict.fromkeys(r[series] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models):
        for label in labels:
            points = [(r[x], y(r)) for r in rows if r["model"] == model and r[series] == label]
            ax.plot(*zip(*points), "-o", label=label)
        xs = sorted({r[x] for r in rows})
        if log2_x:
            ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [f"{v:g}" for v in xs])
        ax.set_title(f"{model}, {title}")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / f"{stem}.png", dpi=110)
    plt.close(fig)
    print(f"wrote bench/results/{stem}.png")

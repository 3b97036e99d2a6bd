"""PNG line plots of benchmark rows: one panel per model, one line per setup."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from bench.load import RESULTS, BenchError, shown


def lines(stem: str, rows: list[dict], *, series: str, x: str, y: Callable[[dict], float], title: str,
          xlabel: str, ylabel: str, log2_x: bool = True, results_dir: Path = RESULTS,
          y_range: Callable[[dict], tuple[float, float] | None] | None = None) -> None:
    """<results_dir>/<stem>.png (bench/results by default): a panel per rows' "model", a line per value of
    row[series], x on a log2 scale (client counts double) unless log2_x is False; y_range(row), when given,
    draws each point's (min, max) across rounds as an error bar."""
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
            mine = [r for r in rows if r["model"] == model and r[series] == label]
            xs_, ys_ = [r[x] for r in mine], [y(r) for r in mine]
            ranges = [y_range(r) for r in mine] if y_range else []
            if ranges and all(ranges):
                err = [[v - lo for v, (lo, _) in zip(ys_, ranges)], [hi - v for v, (_, hi) in zip(ys_, ranges)]]
                ax.errorbar(xs_, ys_, yerr=err, fmt="-o", capsize=3, label=label)
            else:
                ax.plot(xs_, ys_, "-o", label=label)
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
    Path(results_dir).mkdir(parents=True, exist_ok=True)
    fig.savefig(Path(results_dir) / f"{stem}.png", dpi=110)
    plt.close(fig)
    print(f"wrote {shown(Path(results_dir) / stem)}.png")

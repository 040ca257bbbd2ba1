"""The one plotting helper: line charts to PNG through matplotlib's Agg backend (no display,
no system fonts: matplotlib ships its own). Used by the demo's loss curves and the
efficiency bench's scaling curves."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

Series = Mapping[str, Sequence[tuple[float, float]]]


def line_charts(panels: Sequence[dict], path, width: float = 9.0, height: float = 4.5):
    """One PNG (to a path or a binary file object) with a panel per dict: ``series`` (name -> (x, y) points), ``title``,
    ``x_label``, ``y_label`` and optional ``log_x`` / ``log_y`` (base 2 / 10)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not any(points for panel in panels for points in panel["series"].values()):
        raise ValueError("line_charts: nothing to plot")
    figure, axes = plt.subplots(1, len(panels), figsize=(width * len(panels) ** 0.5, height), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        for name, points in panel["series"].items():
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, marker="." if len(points) < 40 else None, label=name)
        if panel.get("log_x"):
            ax.set_xscale("log", base=2)
        if panel.get("log_y"):
            ax.set_yscale("log")
        ax.set(title=panel["title"], xlabel=panel["x_label"], ylabel=panel["y_label"])
        ax.grid(alpha=0.3)
        ax.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100, format="png")
    plt.close(figure)
    return path


def line_chart(series: Series, path: str | Path, title: str, x_label: str, y_label: str) -> Path:
    return line_charts([{"series": series, "title": title, "x_label": x_label, "y_label": y_label}], path)

"""Small line plots drawn with matplotlib (Agg): loss curves and likeness vs step.

Parse-time cheap: matplotlib is imported inside the functions.
"""

from __future__ import annotations

import math
import os
import textwrap
from pathlib import Path

from tifactory.fileio import atomic_path

COLOURS = ["#9ecae1", "#08519c", "#d94801", "#238b45", "#6a51a3", "#cb181d"]


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round tick values covering [low, high] (1/2/5 × 10^k spacing)."""
    if not math.isfinite(low) or not math.isfinite(high):
        return []
    if high <= low:
        high = low + (abs(low) or 1.0)
    raw = (high - low) / max(1, count)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.ceil(low / step - 1e-9) * step
    ticks, value = [], first
    while value <= high + step * 1e-9:
        ticks.append(round(value, 12))
        value += step
    return ticks


def smooth(values: list[float], weight: float = 0.9) -> list[float]:
    """Exponential moving average with bias correction (TensorBoard-style smoothing)."""
    out, average = [], 0.0
    for index, value in enumerate(values, start=1):
        average = weight * average + (1 - weight) * value
        out.append(average / (1 - weight ** index))
    return out


def y_range(values: list[float], least: tuple[float, float] | None = None) -> tuple[float, float]:
    """The y axis limits for `values` (5% margin): at least `least` when given; a constant series gets a range
    around its value (all zeros: 0 to 1), not matplotlib's -1..1 around 0 (which suggests negative values)."""
    low, high = min(values), max(values)
    if least is not None:
        low, high = min(low, least[0]), max(high, least[1])
    if high == low:
        low, high = (0.0, 1.0) if low == 0 else (low - abs(low) * 0.1, high + abs(high) * 0.1)
    margin = (high - low) * 0.05
    return low - margin, high + margin


def line_plot(path: str | os.PathLike, series: list[dict], *, title: str, xlabel: str, ylabel: str,
              marker_x: float | None = None, marker_label: str = "", note: str = "",
              size: tuple[int, int] = (900, 500), ylim: tuple[float, float] | None = None) -> Path:
    """A PNG of `size` pixels drawn with matplotlib. series: dicts with label, x, y (lists), optional colour,
    width, points (draw dots). Non-finite y values are skipped. `note` is written under the plot area (e.g.
    'not scored'). `ylim`: the least y range to show (the data widen it), e.g. (0, 1) for shares; without it a
    constant series gets a range around its value (all zeros: 0 to 1), not -1..1."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    dpi = 100
    figure = Figure(figsize=(size[0] / dpi, size[1] / dpi), dpi=dpi, layout="constrained")
    axes = figure.add_subplot()
    axes.set_title(title, fontsize=11, loc="left")
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.grid(True, color="#eeeeee")
    finite = [[(x, y) for x, y in zip(s["x"], s["y"]) if y is not None and math.isfinite(y)] for s in series]
    values = [y for points in finite for _, y in points]
    if not values:
        axes.text(0.5, 0.5, textwrap.fill(note or "no data", 70), transform=axes.transAxes, ha="center",
                  va="center", color="#cb181d")
        axes.set_xticks([])
        axes.set_yticks([])
    else:
        for index, (entry, points) in enumerate(zip(series, finite)):
            colour = entry.get("colour", COLOURS[index % len(COLOURS)])
            style = "-o" if entry.get("points") or len(points) == 1 else "-"
            axes.plot([x for x, _ in points], [y for _, y in points], style, color=colour,
                      linewidth=entry.get("width", 2), markersize=5, label=entry["label"])
        axes.set_ylim(*y_range(values, ylim))
        if marker_x is not None:
            axes.axvline(marker_x, color="#cb181d", linewidth=2, label=marker_label or None)
        axes.legend(loc="best", fontsize=9, framealpha=0.9)
        if note:
            axes.set_xlabel(f"{xlabel}\n{textwrap.fill(note, 110)}")  # under the axis: it covers no curve
    with atomic_path(path) as tmp_path:
        figure.savefig(tmp_path, format="png", dpi=dpi)
    return Path(path)


def read_loss_tsv(path: str | os.PathLike) -> tuple[list[int], list[float]]:
    """(steps, losses) from a loss.tsv written by training (step, loss, lr, seconds)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"loss table not found: {path}")
    lines = path.read_text(encoding="utf-8").splitlines()
    header = lines[0].split("\t") if lines else []
    if "step" not in header or "loss" not in header:
        raise FileNotFoundError(f"{path}: not a loss table (header {header}, expected step and loss columns)")
    steps, losses = [], []
    for number, line in enumerate(lines[1:], start=2):
        cells = dict(zip(header, line.split("\t")))
        try:
            steps.append(int(cells["step"]))
            losses.append(float(cells["loss"]))
        except (KeyError, ValueError):
            raise FileNotFoundError(f"{path}, line {number}: unreadable row {line!r}") from None
    return steps, losses


def plot_loss(loss_tsv: str | os.PathLike, out_png: str | os.PathLike, *, subject: str = "",
              smoothing: float = 0.9) -> Path:
    """loss.png: raw loss per step and its smoothed curve."""
    steps, losses = read_loss_tsv(loss_tsv)
    series = [{"label": "loss", "x": steps, "y": losses, "colour": COLOURS[0], "width": 1},
              {"label": f"smoothed (EMA {smoothing:g})", "x": steps, "y": smooth(losses, smoothing),
               "colour": COLOURS[1], "width": 3}]
    return line_plot(out_png, series, title=f"{subject} training loss".strip(), xlabel="step", ylabel="loss",
                     note="" if steps else "no steps logged")

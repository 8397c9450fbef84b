"""Small line plots drawn with PIL (no plotting library): loss curves and likeness vs step.

Parse-time cheap: PIL is imported inside the functions.
"""

from __future__ import annotations

import math
import os
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


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def smooth(values: list[float], weight: float = 0.9) -> list[float]:
    """Exponential moving average with bias correction (TensorBoard-style smoothing)."""
    out, average = [], 0.0
    for index, value in enumerate(values, start=1):
        average = weight * average + (1 - weight) * value
        out.append(average / (1 - weight ** index))
    return out


def line_plot(path: str | os.PathLike, series: list[dict], *, title: str, xlabel: str, ylabel: str,
              marker_x: float | None = None, marker_label: str = "", note: str = "",
              size: tuple[int, int] = (900, 500)) -> Path:
    """series: dicts with label, x, y (lists), optional colour, width, points (draw dots).
    Non-finite y values are skipped. `note` is written in the plot area (e.g. 'not scored')."""
    from PIL import Image, ImageDraw, ImageFont

    try:
        font = ImageFont.load_default(size=15)
    except TypeError:
        font = ImageFont.load_default()
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    left, right, top, bottom = 80, size[0] - 20, 40, size[1] - 60
    points = [(x, y) for s in series for x, y in zip(s["x"], s["y"]) if y is not None and math.isfinite(y)]
    draw.text((left, 10), title, fill="black", font=font)
    draw.rectangle([left, top, right, bottom], outline="black")
    draw.text(((left + right) // 2 - len(xlabel) * 4, bottom + 32), xlabel, fill="black", font=font)
    draw.text((8, top - 22), ylabel, fill="black", font=font)
    if not points:
        draw.text((left + 20, (top + bottom) // 2), note or "no data", fill="#cb181d", font=font)
    else:
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        x0, x1 = min(xs), max(xs)
        y0, y1 = min(ys), max(ys)
        if x1 == x0:
            x0, x1 = x0 - 1, x1 + 1
        if y1 == y0:
            y0, y1 = y0 - (abs(y0) * 0.1 or 1), y1 + (abs(y1) * 0.1 or 1)
        margin = (y1 - y0) * 0.05
        y0, y1 = y0 - margin, y1 + margin

        def to_px(x, y):
            return (left + (x - x0) / (x1 - x0) * (right - left), bottom - (y - y0) / (y1 - y0) * (bottom - top))

        for tick in nice_ticks(y0, y1):
            if y0 <= tick <= y1:
                _, py = to_px(x0, tick)
                draw.line([(left, py), (right, py)], fill="#eeeeee")
                draw.text((8, py - 8), _fmt(tick), fill="black", font=font)
        for tick in nice_ticks(x0, x1, 8):
            if x0 <= tick <= x1:
                px, _ = to_px(tick, y0)
                draw.line([(px, bottom), (px, bottom + 5)], fill="black")
                draw.text((px - 10, bottom + 8), _fmt(tick), fill="black", font=font)
        if marker_x is not None:
            px, _ = to_px(marker_x, y0)
            draw.line([(px, top), (px, bottom)], fill="#cb181d", width=2)
            draw.text((px + 4, top + 4), marker_label, fill="#cb181d", font=font)
        legend_y = top + 6
        for index, s in enumerate(series):
            colour = s.get("colour", COLOURS[index % len(COLOURS)])
            line = [to_px(x, y) for x, y in zip(s["x"], s["y"]) if y is not None and math.isfinite(y)]
            if len(line) > 1:
                draw.line(line, fill=colour, width=s.get("width", 2))
            if s.get("points") or len(line) == 1:
                for px, py in line:
                    draw.ellipse([px - 4, py - 4, px + 4, py + 4], fill=colour)
            draw.line([(right - 190, legend_y + 8), (right - 165, legend_y + 8)], fill=colour, width=3)
            draw.text((right - 160, legend_y), s["label"], fill="black", font=font)
            legend_y += 20
        if note:
            draw.text((left + 10, bottom - 24), note, fill="#cb181d", font=font)
    with atomic_path(path) as tmp_path:
        image.save(tmp_path, format="PNG")
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

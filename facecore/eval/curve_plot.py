"""Line charts (a metric against the training step) as a PNG drawn with Pillow, like roc_plot.py."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

from .roc_plot import COLORS, GRID, INK, label_axes, new_canvas, save_png


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """About ``count`` round tick values (1, 2 or 5 times a power of ten apart) covering [lo, hi]."""
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / count
    power = 10.0 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.floor(lo / step) * step
    return [first + i * step for i in range(int(math.ceil((hi - first) / step + 1e-9)) + 1)]


def plot_curves(
    curves: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    path: str | Path | None = None,
    title: str = "",
    x_label: str = "step",
    y_label: str = "",
    size: tuple[int, int] = (720, 480),
) -> Any:
    """Draw ``{label: (xs, ys)}`` as lines with dots on linear axes; save as PNG when ``path`` is given."""
    width, height = size
    left, right, top, bottom = 60, 20, 30, 50
    img, draw, font = new_canvas(size)
    xs_all = [float(x) for xs, _ in curves.values() for x in xs]
    ys_all = [float(y) for _, ys in curves.values() for y in ys if math.isfinite(float(y))]
    x_ticks = nice_ticks(0.0, max(xs_all, default=1.0))
    y_ticks = nice_ticks(min(ys_all, default=0.0), max(ys_all, default=1.0))
    x_lo, x_hi, y_lo, y_hi = x_ticks[0], x_ticks[-1], y_ticks[0], y_ticks[-1]
    plot_w, plot_h = width - left - right, height - top - bottom

    def to_px(x: float, y: float) -> tuple[float, float]:
        return (left + (x - x_lo) / (x_hi - x_lo) * plot_w, top + (1.0 - (y - y_lo) / (y_hi - y_lo)) * plot_h)

    for t in x_ticks:
        x, _ = to_px(t, y_lo)
        draw.line([(x, top), (x, top + plot_h)], fill=GRID)
        label = f"{t:g}"
        draw.text((x - draw.textlength(label, font=font) / 2, top + plot_h + 6), label, fill=INK, font=font)
    for t in y_ticks:
        _, y = to_px(x_lo, t)
        draw.line([(left, y), (left + plot_w, y)], fill=GRID)
        label = f"{t:.4g}"
        draw.text((left - 6 - draw.textlength(label, font=font), y - 6), label, fill=INK, font=font)
    draw.rectangle([left, top, left + plot_w, top + plot_h], outline=INK)
    label_axes(draw, font, left, top, plot_w, height, title, x_label, y_label)

    for i, (label, (xs, ys)) in enumerate(curves.items()):
        color = COLORS[i % len(COLORS)]
        points = [to_px(float(x), float(y)) for x, y in zip(xs, ys) if math.isfinite(float(y))]
        if len(points) > 1:
            draw.line(points, fill=color, width=2)
        for px, py in points:
            draw.ellipse([px - 2.5, py - 2.5, px + 2.5, py + 2.5], fill=color)
        y = top + plot_h - 18 * (len(curves) - i)  # legend in the lower right corner
        x = left + plot_w - 8 - 26 - max(draw.textlength(k, font=font) for k in curves)
        draw.line([(x, y + 6), (x + 20, y + 6)], fill=color, width=3)
        draw.text((x + 26, y), label, fill=INK, font=font)

    return save_png(img, path)


__all__ = ["nice_ticks", "plot_curves"]

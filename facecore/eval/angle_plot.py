"""The histogram of label-cleaning angles as a PNG drawn with Pillow (no plotting library needed).

One bar per ``bin_width`` degrees over [0, 180], kept images' bins in blue and dropped ones in red,
the threshold as a vertical line; the legend gives both counts.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from .roc_plot import COLORS, GRID, INK, new_canvas, save_png

KEPT, DROPPED = COLORS[0], COLORS[1]


def _nice_step(top: float, ticks: int = 5) -> int:
    """A round count step (1, 2, 5 x 10^n) giving about ``ticks`` grid lines up to ``top``."""
    raw = max(top / ticks, 1.0)
    power = 10 ** math.floor(math.log10(raw))
    return int(next(m * power for m in (1, 2, 5, 10) if m * power >= raw))


def plot_angle_histogram(
    angles: np.ndarray,
    threshold: float,
    path: str | Path | None = None,
    title: str = "angle to the class's dominant sub-center",
    bin_width: float = 2.0,
    size: tuple[int, int] = (720, 420),
) -> Any:
    """Draw the histogram of ``angles`` (degrees) with ``threshold`` marked; save it as PNG when ``path`` is given.

    Images with an angle above ``threshold`` are the dropped ones; a bin is red when its centre is
    above the threshold. Returns the PIL image.
    """

    angles = np.asarray(angles, dtype=np.float64)
    edges = np.arange(0.0, 180.0 + bin_width / 2, bin_width)
    counts, _ = np.histogram(np.clip(angles, 0.0, 180.0), bins=edges)
    width, height = size
    left, right, top, bottom = 64, 20, 48, 50
    plot_w, plot_h = width - left - right, height - top - bottom
    highest = max(int(counts.max()), 1)
    step = _nice_step(highest)
    y_max = step * math.ceil(highest * 1.08 / step)  # headroom above the highest bar
    img, draw, font = new_canvas(size)

    def x_px(deg: float) -> float:
        return left + deg / 180.0 * plot_w

    def y_px(count: float) -> float:
        return top + (1.0 - count / y_max) * plot_h

    for deg in range(0, 181, 15):  # vertical grid every 15 degrees
        x = x_px(deg)
        draw.line([(x, top), (x, top + plot_h)], fill=GRID)
        label = f"{deg}"
        draw.text((x - draw.textlength(label, font=font) / 2, top + plot_h + 6), label, fill=INK, font=font)
    for count in range(0, y_max + 1, step):
        y = y_px(count)
        draw.line([(left, y), (left + plot_w, y)], fill=GRID)
        label = f"{count:,}"
        draw.text((left - 8 - draw.textlength(label, font=font), y - 6), label, fill=INK, font=font)
    for lo, count in zip(edges[:-1], counts):
        if count:
            colour = DROPPED if lo + bin_width / 2 > threshold else KEPT
            draw.rectangle([x_px(lo) + 0.5, y_px(count), x_px(lo + bin_width) - 0.5, y_px(0)], fill=colour)
    draw.rectangle([left, top, left + plot_w, top + plot_h], outline=INK)
    x = x_px(threshold)
    for y in range(top, top + plot_h, 8):  # dashed threshold line
        draw.line([(x, y), (x, min(y + 4, top + plot_h))], fill=INK, width=2)
    label = f"{threshold:.4g} deg"
    draw.rectangle([x + 3, top + 3, x + 6 + draw.textlength(label, font=font), top + 16], fill="white")
    draw.text((x + 4, top + 4), label, fill=INK, font=font)

    dropped = int(np.count_nonzero(angles > threshold))
    kept = angles.size - dropped
    share = lambda n: f"{100 * n / angles.size:.1f}%" if angles.size else "-"  # noqa: E731
    legend = [(KEPT, f"kept {kept:,} ({share(kept)})"), (DROPPED, f"dropped {dropped:,} ({share(dropped)})")]
    lx = left + plot_w - 170
    for i, (colour, text) in enumerate(legend):
        y = top + 8 + 16 * i
        draw.rectangle([lx, y + 2, lx + 10, y + 10], fill=colour)
        draw.text((lx + 16, y), text, fill=INK, font=font)
    draw.text((left + plot_w / 2 - 40, height - 20), "angle (degrees)", fill=INK, font=font)
    draw.text((8, top - 18), "images", fill=INK, font=font)
    draw.text((left + plot_w / 2 - draw.textlength(title, font=font) / 2, 10), title, fill=INK, font=font)
    return save_png(img, path)

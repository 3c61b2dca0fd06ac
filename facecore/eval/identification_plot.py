"""1:N plots as PNGs drawn with Pillow, like roc_plot: the CMC curve and the TPIR-vs-FPIR trade-off.

CMC: share of mated probes with their mate within rank r (linear axes). TPIR vs FPIR (DET-style):
FPIR on a log axis down to the finest step the non-mated probes resolve, TPIR linear.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from .roc_plot import COLORS, GRID, INK, label_axes, new_canvas, save_png, thin_polyline

SIZE = (640, 480)
LEFT, RIGHT, TOP, BOTTOM = 60, 20, 30, 50


def _canvas(title: str, x_label: str, y_label: str) -> tuple[Any, Any, Any, int, int]:
    img, draw, font = new_canvas(SIZE)
    plot_w, plot_h = SIZE[0] - LEFT - RIGHT, SIZE[1] - TOP - BOTTOM
    for k in range(11):  # horizontal grid every 0.1
        y = TOP + (1 - k / 10) * plot_h
        draw.line([(LEFT, y), (LEFT + plot_w, y)], fill=GRID)
        draw.text((LEFT - 30, y - 6), f"{k / 10:.1f}", fill=INK, font=font)
    label_axes(draw, font, LEFT, TOP, plot_w, SIZE[1], title, x_label, y_label)
    return img, draw, font, plot_w, plot_h


def _finish(img: Any, draw: Any, font: Any, plot_w: int, plot_h: int, curves: list[tuple[str, np.ndarray, np.ndarray]],
            to_px: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]], path: str | Path | None) -> Any:
    draw.rectangle([LEFT, TOP, LEFT + plot_w, TOP + plot_h], outline=INK)
    for i, (label, xs, ys) in enumerate(curves):
        color = COLORS[i % len(COLORS)]
        px, py = to_px(xs, ys)
        points = thin_polyline(px, py) if px.size > 1 else [(float(px[0]), float(py[0]))] * 2 if px.size else []
        if points:
            draw.line(points, fill=color, width=2)
        y = TOP + plot_h - 18 * (len(curves) - i)  # legend in the lower right corner
        x = LEFT + plot_w - 200
        draw.line([(x, y + 6), (x + 20, y + 6)], fill=color, width=3)
        draw.text((x + 26, y), label, fill=INK, font=font)
    return save_png(img, path)


def plot_cmc(curves: Mapping[str, np.ndarray], path: str | Path | None = None, title: str = "CMC") -> Any:
    """Draw ``{label: cmc}`` (the share at rank 1..depth) on one chart; save as PNG when ``path``; return the image."""
    img, draw, font, plot_w, plot_h = _canvas(title, "rank", "identification rate")
    depth = max([c.size for c in curves.values()] + [2])
    for r in range(1, depth + 1):
        if r == 1 or r % 5 == 0 or r == depth:
            x = LEFT + (r - 1) / (depth - 1) * plot_w
            draw.line([(x, TOP), (x, TOP + plot_h)], fill=GRID)
            draw.text((x - draw.textlength(str(r), font=font) / 2, TOP + plot_h + 6), str(r), fill=INK, font=font)

    def to_px(rank: np.ndarray, rate: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return LEFT + (rank - 1) / (depth - 1) * plot_w, TOP + (1.0 - np.nan_to_num(rate)) * plot_h

    lines = [(f"{label} (rank-1 {100 * c[0]:.2f}%)" if c.size and math.isfinite(c[0]) else label,
              np.arange(1, c.size + 1, dtype=float), c) for label, c in curves.items()]
    return _finish(img, draw, font, plot_w, plot_h, lines, to_px, path)


def plot_tpir(curves: Mapping[str, tuple[np.ndarray, np.ndarray]], path: str | Path | None = None,
              title: str = "TPIR vs FPIR") -> Any:
    """Draw ``{label: (fpir, tpir)}`` with FPIR on a log axis; save as PNG when ``path``; return the image."""
    finest = min([float(f[f > 0].min()) for f, _ in curves.values() if (f > 0).any()] + [1.0])
    lo = max(10.0 ** math.floor(math.log10(finest) + 1e-9), 1e-6) if finest < 1 else 0.1
    decades = max(1, round(-math.log10(lo)))
    img, draw, font, plot_w, plot_h = _canvas(title, "false positive identification rate (log)",
                                              "true positive identification rate")
    for k in range(decades + 1):
        x = LEFT + k * plot_w / decades
        draw.line([(x, TOP), (x, TOP + plot_h)], fill=GRID)
        label = f"1e-{decades - k}" if k < decades else "1"
        draw.text((x - draw.textlength(label, font=font) / 2, TOP + plot_h + 6), label, fill=INK, font=font)

    def to_px(fpir: np.ndarray, tpir: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = (np.log10(np.clip(fpir, lo, 1.0)) - math.log10(lo)) / decades
        return LEFT + x * plot_w, TOP + (1.0 - tpir) * plot_h

    lines = [(label, f[f > 0], t[f > 0]) for label, (f, t) in curves.items()]  # FPIR 0 has no place on a log axis
    return _finish(img, draw, font, plot_w, plot_h, lines, to_px, path)


__all__ = ["plot_cmc", "plot_tpir"]

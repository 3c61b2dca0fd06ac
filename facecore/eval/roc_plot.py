"""ROC curves as a PNG drawn with Pillow's ImageDraw (no plotting library needed).

FPR runs on a log axis (face verification cares about low false-accept rates), TPR on a linear
one; the legend gives each curve's AUC.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from .evaluation import RocCurve, roc_auc

COLORS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189),
          (140, 86, 75), (227, 119, 194), (127, 127, 127)]
GRID = (225, 225, 225)
INK = (40, 40, 40)


def new_canvas(size: tuple[int, int]) -> tuple[Any, Any, Any]:
    """A white RGB image of ``size`` with its drawing context and the default font: every chart starts here."""
    from PIL import Image, ImageDraw, ImageFont

    img = Image.new("RGB", size, "white")
    return img, ImageDraw.Draw(img), ImageFont.load_default()


def label_axes(draw: Any, font: Any, left: int, top: int, plot_w: int, height: int, title: str, x_label: str,
               y_label: str) -> None:
    """The centred title above the plot, the x label centred under it and the y label at its top left."""
    draw.text((left + plot_w / 2 - draw.textlength(x_label, font=font) / 2, height - 20), x_label, fill=INK, font=font)
    draw.text((8, top - 20), y_label, fill=INK, font=font)
    draw.text((left + plot_w / 2 - draw.textlength(title, font=font) / 2, 8), title, fill=INK, font=font)


def save_png(img: Any, path: str | Path | None) -> Any:
    """Write ``img`` as PNG at ``path`` (its folder made) when a path is given; return the image."""
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        img.save(path, format="PNG")
    return img


def fpr_floor(curves: Mapping[str, RocCurve]) -> float:
    """Left end of the log FPR axis: the decade of the finest FPR step of any curve, 1e-6 at the deepest."""
    finest = 1.0
    for roc in curves.values():
        positive = roc.fpr[roc.fpr > 0]
        if positive.size:
            finest = min(finest, float(positive.min()))
    return max(10.0 ** math.floor(math.log10(finest) + 1e-9), 1e-6) if finest < 1 else 0.1


def thin_polyline(xs: np.ndarray, ys: np.ndarray) -> list[tuple[float, float]]:
    """Pixel points of a monotone curve, keeping only the first and last point of each pixel column."""
    cols = np.round(xs).astype(np.int64)
    first = np.flatnonzero(np.r_[True, cols[1:] != cols[:-1]])
    last = np.r_[first[1:] - 1, cols.size - 1]
    keep = np.unique(np.r_[first, last])
    return [(float(xs[i]), float(ys[i])) for i in keep]


def plot_roc(
    curves: Mapping[str, RocCurve],
    path: str | Path | None = None,
    title: str = "ROC",
    size: tuple[int, int] = (640, 480),
) -> Any:
    """Draw ``{label: RocCurve}`` on one chart; save it as PNG when ``path`` is given; return the PIL image."""
    width, height = size
    left, right, top, bottom = 60, 20, 30, 50
    img, draw, font = new_canvas(size)
    lo = fpr_floor(curves)
    decades = round(-math.log10(lo))
    plot_w, plot_h = width - left - right, height - top - bottom

    def to_px(fpr: np.ndarray, tpr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = (np.log10(np.clip(fpr, lo, 1.0)) - math.log10(lo)) / decades
        return left + x * plot_w, top + (1.0 - np.asarray(tpr, dtype=float)) * plot_h

    for k in range(decades + 1):  # vertical grid at each decade, labelled 1e-6 ... 1e+00
        x = left + k * plot_w / decades
        draw.line([(x, top), (x, top + plot_h)], fill=GRID)
        label = f"1e-{decades - k}" if k < decades else "1"
        tw = draw.textlength(label, font=font)
        draw.text((x - tw / 2, top + plot_h + 6), label, fill=INK, font=font)
    for k in range(11):  # horizontal grid every 0.1 TPR
        y = top + (1 - k / 10) * plot_h
        draw.line([(left, y), (left + plot_w, y)], fill=GRID)
        draw.text((left - 30, y - 6), f"{k / 10:.1f}", fill=INK, font=font)
    draw.rectangle([left, top, left + plot_w, top + plot_h], outline=INK)
    draw.text((left + plot_w / 2 - 60, height - 20), "false accept rate (log)", fill=INK, font=font)
    draw.text((8, top - 20), "true accept rate", fill=INK, font=font)
    draw.text((left + plot_w / 2 - draw.textlength(title, font=font) / 2, 8), title, fill=INK, font=font)

    legend = {label: f"{label} (AUC {roc_auc(roc):.4f})" for label, roc in curves.items()}
    x = left + plot_w - 8 - 26 - max([draw.textlength(t, font=font) for t in legend.values()], default=0)
    x = max(float(left + 4), min(x, float(left + plot_w - 170)))  # legend in the lower right corner, as wide as its text
    for i, (label, roc) in enumerate(curves.items()):
        color = COLORS[i % len(COLORS)]
        xs, ys = to_px(roc.fpr, roc.tpr)
        draw.line(thin_polyline(xs, ys), fill=color, width=2)
        y = top + plot_h - 18 * (len(curves) - i)
        draw.line([(x, y + 6), (x + 20, y + 6)], fill=color, width=3)
        draw.text((x + 26, y), legend[label], fill=INK, font=font)
    return save_png(img, path)


__all__ = ["fpr_floor", "label_axes", "new_canvas", "plot_roc", "save_png", "thin_polyline"]

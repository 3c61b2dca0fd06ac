"""Batch augmentations ``flip``, ``random_crop``, ``low_resolution``, ``photometric``, ``grayscale``, ``blur``.

Each is called as ``aug(images, u)``: ``images`` (M, 3, H, W) float in [-1, 1] on the training
device (the images of the batch chosen for it), ``u`` (M, aug.draws) uniform numbers in [0, 1)
on the CPU, from which it takes every random parameter. Per-image parameters are applied
vectorized (sampling grids, grouped convolutions, batched matrix products, broadcasting); the
only Python loops run over a handful of interpolation modes or orders, or look up cached
per-image matrices, never run arithmetic per image. ``random_crop``,
``low_resolution`` and ``photometric`` follow AdaFace's training recipe (Kim et al. 2022):
RandomResizedCrop's scale and ratio ranges, a down- then up-sampling to a side of 0.2-1.0 of
the original with random interpolations, and ColorJitter's brightness, contrast and saturation.
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import Sequence

import torch
import torch.nn.functional as F

from facecore import hookimpl

BLACK = -1.0  # pixel value 0 in the networks' [-1, 1] scale
GREY_WEIGHTS = (0.2989, 0.587, 0.114)  # ITU-R 601 luma, as torchvision's rgb_to_grayscale
CROP_TRIES = 10  # RandomResizedCrop's attempts at a box that fits, before it falls back to the centre
SHRINK_MODES = ("nearest", "bilinear", "area")
ENLARGE_MODES = ("nearest", "bilinear", "bicubic")
ORDERS = tuple(itertools.permutations(range(3)))  # photometric: brightness, contrast, saturation in any order


def _between(u: torch.Tensor, ends: Sequence[float]) -> torch.Tensor:
    """Uniform numbers ``u`` mapped onto the range between ``ends[0]`` and ``ends[1]`` (float64)."""
    lo, hi = float(ends[0]), float(ends[1])
    return lo + (hi - lo) * u.double()


def _pick(u: torch.Tensor, count: int) -> torch.Tensor:
    """Uniform numbers to indices 0..count-1."""
    return (u.double() * count).long().clamp_(max=count - 1)


def _groups(index: torch.Tensor, count: int) -> list[tuple[int, torch.Tensor]]:
    """(value, rows) for each value of the CPU ``index`` tensor that occurs."""
    return [(k, rows) for k in range(count) if (rows := (index == k).nonzero().squeeze(1)).numel()]


def _per_group(images: torch.Tensor, index: torch.Tensor, count: int, fn) -> torch.Tensor:
    """``fn(k, rows, images[rows])`` for each group of rows with ``index == k``, put back in place."""
    groups = _groups(index, count)
    if len(groups) == 1:
        k, rows = groups[0]
        return fn(k, rows, images)
    out = torch.empty_like(images)
    for k, rows in groups:
        on_device = rows.to(images.device, non_blocking=True)
        out.index_copy_(0, on_device, fn(k, rows, images.index_select(0, on_device)))
    return out


def _column(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-image values as an (M, 1, 1, 1) tensor on ``like``'s device and dtype."""
    return values.to(like.device, like.dtype, non_blocking=True).view(-1, 1, 1, 1)


def _grey(x: torch.Tensor) -> torch.Tensor:
    """(M, 1, H, W) luma of [-1, 1] images, on the same scale (the [0, 1] luma mapped to [-1, 1])."""
    r, g, b = GREY_WEIGHTS
    return (r * x[:, 0:1]).add_(x[:, 1:2], alpha=g).add_(x[:, 2:3], alpha=b).add_(sum(GREY_WEIGHTS) - 1)


def _range_schema(description: str, default: list[float], **item_bounds: float) -> dict:
    return {
        "type": "array",
        "items": {"type": "number", **item_bounds},
        "minItems": 2,
        "maxItems": 2,
        "default": default,
        "description": description + " Two numbers, the ends of a uniform range.",
    }


def _schema(properties: dict) -> dict:
    return {"type": "object", "additionalProperties": False, "properties": properties}


def _norm(coord: torch.Tensor, size: int) -> torch.Tensor:
    """Pixel-index coordinates (0 .. size - 1) to grid_sample's [-1, 1] with align_corners=True."""
    return coord * (2.0 / max(size - 1, 1)) - 1.0


def _grid(ys: torch.Tensor, xs: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """An (M, len(y), len(x), 2) sampling grid on ``like``'s device from per-image row and column
    coordinates (M, len) on the CPU; only the coordinates cross to the device."""
    ys = ys.to(like.device, like.dtype, non_blocking=True)
    xs = xs.to(like.device, like.dtype, non_blocking=True)
    grid = like.new_empty(ys.shape[0], ys.shape[1], xs.shape[1], 2)
    grid[..., 0] = xs[:, None, :]
    grid[..., 1] = ys[:, :, None]
    return grid


# --------------------------------------------------------------------------- flip


class Flip:
    """Mirror left-right."""

    draws = 0

    def __call__(self, images: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return images.flip(3)


# --------------------------------------------------------------------------- random_crop


class RandomCrop:
    """A random box of ``scale`` of the area and aspect ratio in ``ratio`` (torchvision's
    RandomResizedCrop draw), resized to the full frame (``resize``) or kept in place with the
    rest black (``pad``, as AdaFace does)."""

    def __init__(self, scale: Sequence[float] = (0.2, 1.0), ratio: Sequence[float] = (0.75, 4 / 3),
                 mode: str = "resize"):
        self.scale, self.ratio, self.mode = tuple(scale), tuple(ratio), mode
        self.draws = 2 * CROP_TRIES + 2

    def boxes(self, u: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, ...]:
        """(top, left, box height, box width) per image, in whole pixels, from its uniforms."""
        area = height * width
        target = area * _between(u[:, 0:2 * CROP_TRIES:2], self.scale)
        lo, hi = math.log(min(self.ratio)), math.log(max(self.ratio))
        aspect = torch.exp(_between(u[:, 1:2 * CROP_TRIES:2], (lo, hi)))
        w = torch.sqrt(target * aspect).round()
        h = torch.sqrt(target / aspect).round()
        fits = (w >= 1) & (w <= width) & (h >= 1) & (h <= height)
        first = fits.to(torch.uint8).argmax(1, keepdim=True)  # the first try that fits, as torchvision
        w, h = w.gather(1, first).squeeze(1), h.gather(1, first).squeeze(1)
        # none fits: torchvision's fallback, the largest centred box of an allowed aspect ratio
        in_ratio = width / height
        if in_ratio < min(self.ratio):
            fw, fh = width, round(width / min(self.ratio))
        elif in_ratio > max(self.ratio):
            fw, fh = round(height * max(self.ratio)), height
        else:
            fw, fh = width, height
        none = ~fits.any(1)
        w = torch.where(none, torch.full_like(w, fw), w)
        h = torch.where(none, torch.full_like(h, fh), h)
        top = torch.floor(u[:, -2].double() * (height - h + 1))
        left = torch.floor(u[:, -1].double() * (width - w + 1))
        top = torch.where(none, (height - h) // 2, top)
        left = torch.where(none, (width - w) // 2, left)
        return top, left, h, w

    def __call__(self, images: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        m, _, height, width = images.shape
        top, left, h, w = self.boxes(u, height, width)
        if self.mode == "pad":
            box = torch.stack([top, top + h, left, left + w], 1).long().to(images.device, non_blocking=True)
            rows = torch.arange(height, device=images.device).view(1, 1, height, 1)
            cols = torch.arange(width, device=images.device).view(1, 1, 1, width)
            inside = ((rows >= box[:, 0, None, None, None]) & (rows < box[:, 1, None, None, None])
                      & (cols >= box[:, 2, None, None, None]) & (cols < box[:, 3, None, None, None]))
            return torch.where(inside, images, images.new_full((), BLACK))
        # each output pixel's centre mapped into the box; edges repeat the box's own (crop, then resize)
        ys = top[:, None] + (torch.arange(height)[None, :] + 0.5) * (h[:, None] / height) - 0.5
        xs = left[:, None] + (torch.arange(width)[None, :] + 0.5) * (w[:, None] / width) - 0.5
        ys = torch.minimum(torch.maximum(ys, top[:, None]), (top + h - 1)[:, None])
        xs = torch.minimum(torch.maximum(xs, left[:, None]), (left + w - 1)[:, None])
        return F.grid_sample(images, _grid(_norm(ys, height), _norm(xs, width), images), mode="bilinear",
                             padding_mode="border", align_corners=True)


# --------------------------------------------------------------------------- low_resolution


CUBIC_A = -0.75  # the bicubic kernel's parameter in cv2, PIL's "bicubic" family and torch's grid_sample


def _taps(weights: torch.Tensor, index: torch.Tensor, columns: int) -> torch.Tensor:
    """Rows of a resampling matrix: ``weights`` (M, out, taps) at column ``index`` (same shape), summed
    where taps meet (clamped edge indices), as an (M, out, columns) float64 tensor."""
    m, out, _ = weights.shape
    return torch.zeros(m, out, columns, dtype=torch.float64).scatter_add_(2, index, weights)


def _cubic(t: torch.Tensor) -> torch.Tensor:
    """The four cubic-convolution weights for fractional offsets ``t`` in [0, 1): taps -1, 0, 1, 2."""
    a = CUBIC_A
    d = torch.stack([t + 1, t, 1 - t, 2 - t], -1)
    near = ((a + 2) * d - (a + 3)) * d * d + 1  # |d| <= 1
    far = ((a * d - 5 * a) * d + 8 * a) * d - 4 * a  # 1 < |d| < 2
    return torch.where(d <= 1, near, far)


def shrink_matrix(n: int, small: torch.Tensor, mode: str) -> torch.Tensor:
    """(M, n, n) float64: row ``i < small[m]`` of matrix ``m`` maps ``n`` input pixels to small pixel ``i``
    (rows from ``small[m]`` on are 0). ``nearest`` and ``bilinear`` sample each small pixel's centre
    (edges repeated); ``area`` averages the input over the small pixel's footprint, exactly."""
    size = small.double()[:, None, None]  # (M, 1, 1)
    i = torch.arange(n, dtype=torch.float64)[None, :, None]  # small pixel index (n rows; the first `small` count)
    valid = i < size
    step = n / size
    if mode == "area":
        j = torch.arange(n, dtype=torch.float64)[None, None, :]  # input pixel [j, j + 1)
        lo, hi = i * step, (i + 1) * step
        overlap = (torch.minimum(hi, j + 1) - torch.maximum(lo, j)).clamp_(min=0)
        return torch.where(valid, overlap / step, 0.0)
    y = (i + 0.5) * step - 0.5  # the small pixel's centre in input pixel indices, (M, n, 1)
    if mode == "nearest":
        weights, index = torch.ones_like(y), torch.round(y).clamp(0, n - 1).long()
    else:  # bilinear
        y = y.clamp(0, n - 1)
        base = torch.floor(y)
        t = y - base
        weights, index = torch.cat([1 - t, t], -1), torch.cat([base, base + 1], -1).clamp(0, n - 1).long()
    return torch.where(valid, _taps(weights, index.expand_as(weights), n), 0.0)


def enlarge_matrix(n: int, small: torch.Tensor, mode: str) -> torch.Tensor:
    """(M, n, n) float64: maps the first ``small[m]`` pixels back to ``n`` (half-pixel centres, edges
    repeated, as cv2.resize and torch's interpolate without antialiasing)."""
    size = small.double()[:, None, None]
    i = torch.arange(n, dtype=torch.float64)[None, :, None]
    y = (i + 0.5) * (size / n) - 0.5  # (M, n, 1)
    if mode != "bicubic":  # cubic taps reach past the edge and repeat it there; the others clamp the centre
        y = torch.minimum(y.clamp(min=0), size - 1)
    last = (size - 1).long()
    if mode == "nearest":
        weights, index = torch.ones_like(y), torch.round(y).long()
    else:
        base = torch.floor(y)
        t = y - base
        if mode == "bilinear":
            weights, offsets = torch.cat([1 - t, t], -1), torch.arange(2, dtype=torch.float64)
        else:  # bicubic
            weights, offsets = _cubic(t.squeeze(-1)), torch.arange(-1, 3, dtype=torch.float64)
        index = base + offsets
    index = torch.minimum(index.clamp(min=0).long(), last)
    return _taps(weights, index.expand_as(weights), n)


@functools.lru_cache(maxsize=4096)
def resampling_matrix(n: int, side: int, down: str, up: str) -> torch.Tensor:
    """The (n, n) float32 matrix of shrinking ``n`` pixels to ``side`` with ``down`` and enlarging back
    with ``up``; cached, as there are only n x 9 of them per image size (about 45 KiB each at 112)."""
    small = torch.tensor([side])
    return (enlarge_matrix(n, small, up) @ shrink_matrix(n, small, down))[0].float()


def resample(images: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``rows[m] @ image[m] @ cols[m].T`` for every channel: a separable resampling, (M, n, n) CPU
    matrices moved to the images' device once."""
    rows = rows.to(images.device, images.dtype, non_blocking=True)[:, None]
    cols = cols.to(images.device, images.dtype, non_blocking=True)[:, None]
    return torch.matmul(torch.matmul(rows, images), cols.transpose(-1, -2))


class LowResolution:
    """Down-sample to a random side (``scale`` of the original) with a random interpolation from
    ``down``, then back up with one from ``up``: the blur and blockiness of a small face.

    Shrinking then enlarging is linear along each axis, so both steps are one (H x H) matrix for
    the rows and one (W x W) for the columns per image, built on the CPU from the per-image
    sides and modes; the device does two batched matrix products.
    """

    draws = 3

    def __init__(self, scale: Sequence[float] = (0.2, 1.0), down: Sequence[str] = SHRINK_MODES,
                 up: Sequence[str] = ENLARGE_MODES):
        self.scale, self.down, self.up = tuple(scale), tuple(down), tuple(up)

    def sides(self, u: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The small image's (height, width) per image, whole pixels >= 1."""
        ratio = _between(u[:, 0], self.scale)
        sh = torch.floor(ratio * height).long().clamp_(1, height)
        sw = torch.floor(ratio * width).long().clamp_(1, width)
        return sh, sw

    def matrices(self, u: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-image (M, H, H) row and (M, W, W) column matrices of the down- then up-sampling."""
        sh, sw = self.sides(u, height, width)
        down, up = _pick(u[:, 1], len(self.down)), _pick(u[:, 2], len(self.up))
        modes = [(self.down[d], self.up[e]) for d, e in zip(down.tolist(), up.tolist())]
        rows = torch.stack([resampling_matrix(height, side, *m) for side, m in zip(sh.tolist(), modes)])
        if height == width:  # square images: the same sides, the same matrices
            return rows, rows
        return rows, torch.stack([resampling_matrix(width, side, *m) for side, m in zip(sw.tolist(), modes)])

    def __call__(self, images: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        _, _, height, width = images.shape
        rows, cols = self.matrices(u, height, width)
        return resample(images, rows, cols).clamp_(-1.0, 1.0)


# --------------------------------------------------------------------------- photometric


# ColorJitter's operations on [0, 1] pixels, rewritten for [-1, 1] ones: v -> 2v - 1 commutes with
# blending two images, and brightness f*v becomes f*y + (f - 1).
def _brightness(y: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return (y * f).add_(f - 1).clamp_(-1, 1)


def _contrast(y: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    mean = _grey(y).mean((1, 2, 3), keepdim=True)
    return (y * f).add_(mean * (1 - f)).clamp_(-1, 1)


def _saturation(y: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return (y * f).add_(_grey(y) * (1 - f)).clamp_(-1, 1)


class Photometric:
    """Brightness, contrast and saturation, each scaled by a factor in [1 - s, 1 + s], in a random
    order (torchvision's ColorJitter without hue)."""

    draws = 4

    def __init__(self, brightness: float = 0.5, contrast: float = 0.5, saturation: float = 0.5):
        self.strengths = (brightness, contrast, saturation)

    def __call__(self, images: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        factors = torch.stack([_between(u[:, i], (max(0.0, 1 - s), 1 + s)) for i, s in enumerate(self.strengths)], 1)
        ops = (_brightness, _contrast, _saturation)

        def jitter(k: int, rows: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
            for op in ORDERS[k]:
                x = ops[op](x, _column(factors[rows, op], x))
            return x

        return _per_group(images, _pick(u[:, 3], len(ORDERS)), len(ORDERS), jitter)


# --------------------------------------------------------------------------- grayscale, blur


class Grayscale:
    """Replace the colours by their luma (the same value in the three channels)."""

    draws = 0

    def __call__(self, images: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return _grey(images).clamp_(-1, 1).repeat(1, 3, 1, 1)


class Blur:
    """Gaussian blur with a per-image sigma (pixels) from ``sigma``: two depthwise 1-D convolutions
    with one kernel per image, edges repeated."""

    draws = 1

    def __init__(self, sigma: Sequence[float] = (0.1, 2.0)):
        self.sigma = tuple(sigma)
        self.radius = max(1, math.ceil(3 * max(self.sigma)))

    def kernels(self, u: torch.Tensor) -> torch.Tensor:
        """(M, 2 * radius + 1) normalized Gaussian kernels."""
        sigma = _between(u[:, 0], self.sigma)
        t = torch.arange(-self.radius, self.radius + 1, dtype=torch.float64)
        k = torch.exp(-(t[None, :] ** 2) / (2 * sigma[:, None] ** 2))
        return k / k.sum(1, keepdim=True)

    def __call__(self, images: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        m, c, height, width = images.shape
        r = self.radius
        k = self.kernels(u).repeat_interleave(c, 0).to(images.device, images.dtype, non_blocking=True)
        x = images.reshape(1, m * c, height, width)
        x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), k.view(m * c, 1, 1, -1), groups=m * c)
        x = F.conv2d(F.pad(x, (0, 0, r, r), mode="replicate"), k.view(m * c, 1, -1, 1), groups=m * c)
        return x.view(m, c, height, width)


# --------------------------------------------------------------------------- registration

SCALE_ITEM = {"exclusiveMinimum": 0, "maximum": 1}

RANDOM_CROP_SCHEMA = _schema({
    "scale": _range_schema("Area of the box as a fraction of the image (AdaFace: 0.2 to 1).", [0.2, 1.0],
                           **SCALE_ITEM),
    "ratio": _range_schema("Aspect ratio (width / height) of the box, drawn log-uniformly.",
                           [0.75, 4 / 3], exclusiveMinimum=0),
    "mode": {"enum": ["resize", "pad"], "default": "resize",
             "description": "resize: stretch the box to the full frame; pad: keep it in place, the rest black "
                            "(AdaFace's variant)."},
})
LOW_RESOLUTION_SCHEMA = _schema({
    "scale": _range_schema("Side of the small image as a fraction of the original (AdaFace: 0.2 to 1).",
                           [0.2, 1.0], **SCALE_ITEM),
    "down": {"type": "array", "items": {"enum": list(SHRINK_MODES)}, "minItems": 1, "uniqueItems": True,
             "default": list(SHRINK_MODES), "description": "Interpolations to shrink with, one picked per image."},
    "up": {"type": "array", "items": {"enum": list(ENLARGE_MODES)}, "minItems": 1, "uniqueItems": True,
           "default": list(ENLARGE_MODES), "description": "Interpolations to enlarge back with, one picked per image."},
})


def _strength(what: str) -> dict:
    return {"type": "number", "minimum": 0, "maximum": 1, "default": 0.5,
            "description": f"{what} is multiplied by a factor drawn from [1 - value, 1 + value]; 0 leaves it."}


PHOTOMETRIC_SCHEMA = _schema({
    "brightness": _strength("Brightness"),
    "contrast": _strength("Contrast (distance from the mean grey)"),
    "saturation": _strength("Saturation (distance from the pixel's grey)"),
})
BLUR_SCHEMA = _schema({
    "sigma": _range_schema("Standard deviation of the Gaussian, in pixels.", [0.1, 2.0],
                           exclusiveMinimum=0, maximum=10),
})


@hookimpl
def register_augmentations(register):
    register("flip", Flip, schema=_schema({}), description="Mirror left-right (the default list: [flip] with p 0.5)")
    register("random_crop", RandomCrop, schema=RANDOM_CROP_SCHEMA,
             description="Random box of 20-100% of the area (RandomResizedCrop's draw), resized or padded black")
    register("low_resolution", LowResolution, schema=LOW_RESOLUTION_SCHEMA,
             description="Down- then up-sample by a random factor with random interpolations (AdaFace)")
    register("photometric", Photometric, schema=PHOTOMETRIC_SCHEMA,
             description="Random brightness, contrast and saturation in a random order (ColorJitter)")
    register("grayscale", Grayscale, schema=_schema({}), description="Replace colours by luma")
    register("blur", Blur, schema=BLUR_SCHEMA, description="Gaussian blur with a random sigma per image")

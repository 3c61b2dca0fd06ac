"""Face alignment: 5 landmarks -> the 112x112 ArcFace crop by a least-squares similarity transform.

The landmarks are (x, y) pixel coordinates of the left eye, right eye, nose tip, left and
right mouth corners (left/right as seen in the image), as RetinaFace and SCRFD output them;
68-point (iBUG) landmarks are reduced to these 5. The transform is Umeyama's least-squares
similarity (rotation, uniform scale, shift; no reflection), and the warp is bilinear with a
black border, the way InsightFace crops its training and test sets. NumPy only.

Coordinates follow the usual image convention: pixel (i, j) has its centre at x = j, y = i.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import DataError

# The 5 reference points of InsightFace's 112x112 crops (eyes, nose tip, mouth corners).
ARCFACE_TEMPLATE = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ]
)
TEMPLATE_SIZE = 112


def reduce_68_to_5(points: Any) -> np.ndarray:
    """The 5 alignment points of 68 iBUG landmarks (0-based): eye centres (mean of 36-41 and 42-47),
    nose tip 30, mouth corners 48 and 54."""
    pts = np.asarray(points, dtype=np.float64).reshape(68, 2)
    return np.stack([pts[36:42].mean(0), pts[42:48].mean(0), pts[30], pts[48], pts[54]])


def five_points(landmarks: Any) -> np.ndarray:
    """Landmarks as a (5, 2) float64 array: accepts 5 points or 68 points, as (n, 2) or flat.

    Raises DataError for any other count and for non-finite values.
    """
    pts = np.asarray(landmarks, dtype=np.float64)
    if pts.size == 10:
        pts = pts.reshape(5, 2)
    elif pts.size == 136:
        pts = reduce_68_to_5(pts)
    else:
        raise DataError(f"landmarks must be 5 or 68 (x, y) points (10 or 136 numbers), got {pts.size} numbers")
    if not np.isfinite(pts).all():
        raise DataError("landmarks contain NaN or infinite values")
    return pts


def template(img_size: int = TEMPLATE_SIZE) -> np.ndarray:
    """The ArcFace reference points scaled to an ``img_size`` x ``img_size`` crop."""
    return ARCFACE_TEMPLATE * (img_size / TEMPLATE_SIZE)


def similarity_transform(src: Any, dst: Any) -> np.ndarray:
    """The 2x3 matrix ``[s*R | t]`` minimizing sum |s*R*src_i + t - dst_i|^2 (Umeyama 1991).

    R is a proper rotation (a reflection is never chosen). Raises DataError when the source
    points all coincide (no scale or rotation can be told).
    """
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 2 or src.shape[0] < 2:
        raise ValueError(f"need two (n, 2) point sets with n >= 2, got {src.shape} and {dst.shape}")
    mean_src, mean_dst = src.mean(0), dst.mean(0)
    src_c, dst_c = src - mean_src, dst - mean_dst
    var_src = (src_c**2).sum(1).mean()
    if var_src < 1e-12:
        raise DataError("the landmarks all lie on one point; they cannot define an alignment")
    cov = dst_c.T @ src_c / src.shape[0]
    u, sigma, vt = np.linalg.svd(cov)
    d = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:  # the best orthogonal map would reflect: flip the weakest axis
        d[1] = -1.0
    rotation = u @ np.diag(d) @ vt
    scale = float((sigma * d).sum() / var_src)
    shift = mean_dst - scale * rotation @ mean_src
    return np.hstack([scale * rotation, shift[:, None]])


def invert_affine(matrix: np.ndarray) -> np.ndarray:
    """The inverse of a 2x3 affine matrix."""
    m = np.vstack([np.asarray(matrix, dtype=np.float64), [0.0, 0.0, 1.0]])
    return np.linalg.inv(m)[:2]


def transform_points(matrix: np.ndarray, points: Any) -> np.ndarray:
    """Apply a 2x3 affine matrix to (n, 2) points."""
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    return pts @ np.asarray(matrix, dtype=np.float64)[:, :2].T + np.asarray(matrix, dtype=np.float64)[:, 2]


def alignment_matrix(landmarks: Any, img_size: int = TEMPLATE_SIZE) -> np.ndarray:
    """The 2x3 matrix taking image pixels to the aligned crop (5 or 68 landmarks)."""
    return similarity_transform(five_points(landmarks), template(img_size))


def warp_affine(image: np.ndarray, matrix: np.ndarray, size: int | tuple[int, int], fill: int = 0) -> np.ndarray:
    """Warp an (H, W, C) or (H, W) uint8 image by ``matrix`` (source pixels -> output pixels).

    ``size`` is an int for a square output, or (width, height). Each output pixel is the
    bilinear interpolation of the source at the inverse-mapped point, rounded to the nearest
    integer; source pixels outside the image count as ``fill`` (OpenCV's constant border).
    NumPy only.
    """
    src = np.asarray(image)
    if src.dtype != np.uint8 or src.ndim not in (2, 3):
        raise ValueError(f"expected an (H, W[, C]) uint8 image, got {src.dtype} of shape {src.shape}")
    width, height = (size, size) if isinstance(size, int) else size
    inverse = invert_affine(matrix)  # output pixel -> source pixel
    xs, ys = np.meshgrid(np.arange(width, dtype=np.float64), np.arange(height, dtype=np.float64))
    sx = inverse[0, 0] * xs + inverse[0, 1] * ys + inverse[0, 2]
    sy = inverse[1, 0] * xs + inverse[1, 1] * ys + inverse[1, 2]
    x0, y0 = np.floor(sx), np.floor(sy)
    fx = (sx - x0).astype(np.float32)[..., None]
    fy = (sy - y0).astype(np.float32)[..., None]
    # Only the source window the output reads from is used, inside a one-pixel frame of ``fill``:
    # every index is clipped into the frame, so a neighbour outside the image reads ``fill``
    # however far out it lies.
    h, w = src.shape[:2]
    planes = src.reshape(h, w, -1)
    x_lo, y_lo = max(int(x0.min()), 0), max(int(y0.min()), 0)
    x_hi, y_hi = min(int(x0.max()) + 2, w), min(int(y0.max()) + 2, h)
    if x_hi <= x_lo or y_hi <= y_lo:  # the output sees none of the image
        window = np.zeros((0, 0, planes.shape[2]), dtype=np.uint8)
        x_lo = y_lo = 0
    else:
        window = planes[y_lo:y_hi, x_lo:x_hi]
    padded = np.pad(window, ((1, 1), (1, 1), (0, 0)), constant_values=fill)
    h, w = window.shape[:2]
    x0, y0 = x0 - x_lo, y0 - y_lo
    left = np.clip(x0 + 1, 0, w + 1).astype(np.intp)
    right = np.clip(x0 + 2, 0, w + 1).astype(np.intp)
    top = np.clip(y0 + 1, 0, h + 1).astype(np.intp) * (w + 2)
    bottom = np.clip(y0 + 2, 0, h + 1).astype(np.intp) * (w + 2)
    flat = padded.reshape(-1, padded.shape[2])  # one gather per neighbour: rows of a (pixels, channels) view
    upper = flat.take(top + left, axis=0) * (1 - fx) + flat.take(top + right, axis=0) * fx
    lower = flat.take(bottom + left, axis=0) * (1 - fx) + flat.take(bottom + right, axis=0) * fx
    out = np.rint(upper * (1 - fy) + lower * fy)
    out = np.clip(out, 0, 255).astype(np.uint8)
    return out.reshape(height, width) if src.ndim == 2 else out


def align_face(image: np.ndarray, landmarks: Any, img_size: int = TEMPLATE_SIZE) -> np.ndarray:
    """The aligned ``img_size`` x ``img_size`` crop of an (H, W, 3) uint8 image given its 5 (or 68) landmarks."""
    return warp_affine(image, alignment_matrix(landmarks, img_size), img_size)


__all__ = [
    "ARCFACE_TEMPLATE",
    "align_face",
    "alignment_matrix",
    "five_points",
    "invert_affine",
    "reduce_68_to_5",
    "similarity_transform",
    "template",
    "transform_points",
    "warp_affine",
]

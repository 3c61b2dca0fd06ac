"""Landmark files: one line per image, its path then 10 numbers (x1 y1 ... x5 y5, the 5 points
RetinaFace/SCRFD output), 11 (the same plus a detector score, as IJB's ``*_name_5pts_score.txt``)
or 136 (68 iBUG points). Blank lines and ``#`` comments are skipped; a path may not contain spaces.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DataError
from .align import reduce_68_to_5

COUNTS = (10, 11, 136)
SHOW = 5  # names quoted in a message before "and N more"


@dataclass
class LandmarkFile:
    """The parsed lines of a landmark file, in file order."""

    path: Path
    names: list[str]  # image paths as written
    points: np.ndarray  # (n, 5, 2) float64 (68-point lines already reduced to 5)
    scores: np.ndarray  # (n,) float64 detector scores; NaN on lines without one
    lines: np.ndarray  # (n,) line number of each entry

    def __len__(self) -> int:
        return len(self.names)


def listing(names: list[str], show: int = SHOW) -> str:
    """``a, b, c and 12 more``: the first few names of a list for an error message."""
    head = ", ".join(names[:show])
    return head + (f" and {len(names) - show} more" if len(names) > show else "")


def read_landmark_file(path: str | os.PathLike) -> LandmarkFile:
    """Parse a landmark file; a malformed line is a DataError naming the file and the line."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise DataError(f"landmarks file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read landmarks file {path}: {exc}") from None
    names: list[str] = []
    rests: list[str] = []
    numbers: list[int] = []
    for number, line in enumerate(text.splitlines(), 1):
        parts = line.split(None, 1)
        if not parts or parts[0].startswith("#"):
            continue
        names.append(parts[0])
        rests.append(parts[1] if len(parts) > 1 else "")
        numbers.append(number)
    if not names:
        raise DataError(f"{path} has no landmarks; expected lines of 'image_path x1 y1 ... x5 y5'")
    values = _uniform_rows(rests)
    if values is not None:  # the usual file: every line has the same count; parsed in C
        rows: list[np.ndarray] | list[list[float]] = list(values)
    else:  # mixed counts, or a bad line to report
        rows = [_parse_line(path, n, name, rest) for n, name, rest in zip(numbers, names, rests)]
    points = np.empty((len(rows), 5, 2))
    scores = np.full(len(rows), math.nan)
    for count in COUNTS:
        index = [i for i, row in enumerate(rows) if len(row) == count]
        if not index:
            continue
        group = np.array([rows[i] for i in index]) if values is None else values
        if count == 136:
            points[index] = [reduce_68_to_5(v) for v in group]
        else:
            points[index] = group[:, :10].reshape(-1, 5, 2)
        if count == 11:
            scores[index] = group[:, 10]
    return LandmarkFile(path, names, points, scores, np.asarray(numbers))


def _uniform_rows(rests: list[str]) -> np.ndarray | None:
    """All lines' numbers as one (n, k) array when every line has the same valid count k, else None."""
    try:
        values = np.loadtxt(rests, dtype=np.float64, ndmin=2, comments=None)
    except ValueError:
        return None
    if values.shape != (len(rests), values.shape[1]) or values.shape[1] not in COUNTS:
        return None
    return values if np.isfinite(values).all() else None


def _parse_line(path: Path, number: int, name: str, rest: str) -> list[float]:
    values = rest.split()
    if len(values) not in COUNTS:
        raise DataError(f"{path} line {number}: expected an image path then 10 numbers (5 points x, y), "
                        f"11 (the same and a detector score) or 136 (68 points); got {len(values)} "
                        f"values after {name!r}")
    try:
        floats = [float(v) for v in values]
    except ValueError:
        bad = next(v for v in values if not _is_float(v))
        raise DataError(f"{path} line {number}: {bad!r} is not a number") from None
    if not all(math.isfinite(v) for v in floats):
        raise DataError(f"{path} line {number}: the landmarks of {name} contain NaN or infinite values")
    return floats


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def image_key(path: str | os.PathLike) -> str:
    """The absolute, normalized form of a path, used to match landmark lines to images."""
    return os.path.normpath(os.path.abspath(path))


def landmarks_by_image(landmarks: LandmarkFile, base: str | os.PathLike) -> dict[str, tuple[np.ndarray, int]]:
    """``{image key: ((5, 2) points, line number)}``, relative paths taken against ``base``.

    An image named on two lines, or landmarks for images that do not exist, are DataErrors
    that name them.
    """
    out: dict[str, tuple[np.ndarray, int]] = {}
    missing = []
    for name, pts, number in zip(landmarks.names, landmarks.points, landmarks.lines):
        key = image_key(Path(base, name))
        if key in out:
            raise DataError(f"{landmarks.path}: {name} has landmarks on two lines ({out[key][1]} and {number}); "
                            "keep one")
        if not os.path.isfile(key):
            missing.append(f"{name} (line {number})")
        out[key] = (pts, int(number))
    if missing:
        raise DataError(f"{landmarks.path} names {len(missing)} image(s) that do not exist under {base}: "
                        f"{listing(missing)}; fix the paths (relative to {base}, or absolute) or remove those lines")
    return out


__all__ = ["LandmarkFile", "image_key", "landmarks_by_image", "listing", "read_landmark_file"]

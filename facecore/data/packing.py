"""Packing tools: an image folder to an InsightFace RecordIO set, a pairs list to a ``.bin`` pair set.

Outputs are written under temporary names and renamed at the end, so a failed pack
leaves no half-written set behind. With a landmarks file every image is aligned to the
ArcFace crop while packing; images without landmarks stop the pack, or are left out and
listed in a report file.
"""

from __future__ import annotations

import io
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Iterable, TypeVar

import numpy as np

from .align import alignment_matrix, warp_affine
from .binfile import write_bin
from ..errors import DataError
from .images import BadImageError, decode_chw, is_jpeg, list_image_folder, resize_rgb
from .landmarks import image_key, landmarks_by_image, listing, read_landmark_file
from .recordio import RecordWriter, pack

REC_FILES = ("train.rec", "train.idx", "property")
MISSING_REPORT = "missing_landmarks.txt"
MISSING_CHOICES = ("error", "skip")
T = TypeVar("T")


def _bar(iterable: Iterable[T], total: int, desc: str, progress: bool) -> Iterable[T]:
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="img", disable=not progress or not sys.stderr.isatty())


def prepare_image(data: bytes, source: str, *, img_size: int, quality: int, resize: bool,
                  landmarks: np.ndarray | None = None) -> tuple[bytes, bool]:
    """The bytes to store for one image and whether it was resized.

    With ``landmarks`` (5 points in the image's pixels) the image is aligned to the
    img_size x img_size ArcFace crop and re-encoded. Without, a JPEG already
    img_size x img_size is kept byte for byte; other formats are re-encoded as JPEG; other
    sizes are resized, or refused when ``resize`` is False.
    """
    try:
        chw = decode_chw(data)
    except BadImageError as exc:
        raise DataError(f"{source}: {exc}; fix or remove it before packing") from None
    height, width = int(chw.shape[1]), int(chw.shape[2])
    same_size = height == img_size and width == img_size
    if landmarks is None and same_size and is_jpeg(data):
        return data, False
    if landmarks is None and not same_size and not resize:
        raise DataError(f"{source} is {width}x{height}, not {img_size}x{img_size}; resize it first, or pack "
                        "without --no-resize to let the packer resize it")
    rgb = chw.permute(1, 2, 0).numpy()
    if landmarks is not None:
        try:
            rgb = warp_affine(rgb, alignment_matrix(landmarks, img_size), img_size)
        except DataError as exc:
            raise DataError(f"{source}: {exc}") from None
        same_size = True
    elif not same_size:
        rgb = resize_rgb(rgb, img_size)
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=quality)
    return buf.getvalue(), not same_size


def _check_missing(choice: str) -> None:
    if choice not in MISSING_CHOICES:
        raise DataError(f"missing_landmarks must be one of {', '.join(MISSING_CHOICES)}, got {choice!r}")


def _missing_landmarks_error(missing: list[str], total: int, what: str, landmarks_file: str | os.PathLike) -> DataError:
    return DataError(
        f"{len(missing)} of {total} {what} have no line in {landmarks_file}: {listing(missing)}. Add their "
        "landmarks, or pass --missing-landmarks skip to leave them out (they are then listed in a report file)"
    )


def _refuse_existing(paths: Iterable[Path], force: bool) -> None:
    existing = [str(p) for p in paths if p.exists()]
    if existing and not force:
        raise DataError(f"{', '.join(existing)} already exist(s); use --force to overwrite")


def pack_rec(
    src_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    quality: int = 95,
    resize: bool = True,
    img_size: int = 112,
    progress: bool = True,
    force: bool = False,
    landmarks: str | os.PathLike | None = None,
    missing_landmarks: str = "error",
) -> dict:
    """Pack ``src_dir/<identity>/<image>`` into ``out_dir/train.rec|train.idx|property`` (InsightFace layout).

    Record 0 holds label (a, b); images are keys 1..a-1 with their class as a scalar label;
    keys a..b-1 are identity records whose label is the [start, end) key range of that
    identity. With ``landmarks`` (a landmarks file, paths relative to ``src_dir``) each image
    is aligned; images without a line are an error, or with ``missing_landmarks="skip"``
    left out and listed in ``out_dir/missing_landmarks.txt`` (identities left without
    images are dropped). Returns {"images", "identities", "resized", "aligned", "skipped"}.
    """
    if not 1 <= quality <= 100:
        raise DataError(f"JPEG quality must be between 1 and 100, got {quality}")
    _check_missing(missing_landmarks)
    classes, items = list_image_folder(src_dir)
    points = landmarks_by_image(read_landmark_file(landmarks), src_dir) if landmarks is not None else None
    skipped: list[str] = []
    if points is not None:
        skipped = [os.path.relpath(p, src_dir) for p, _ in items if image_key(p) not in points]
        if skipped and missing_landmarks == "error":
            raise _missing_landmarks_error(skipped, len(items), "images", landmarks)
        items = [(p, c) for p, c in items if image_key(p) in points]
        kept = sorted({c for _, c in items})
        renumber = {c: i for i, c in enumerate(kept)}
        classes = [classes[c] for c in kept]
        items = [(p, renumber[c]) for p, c in items]
        if not items:
            raise DataError(f"none of the images under {src_dir} has a line in {landmarks}: nothing to pack")
    out = Path(out_dir)
    _refuse_existing((out / n for n in REC_FILES), force)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".facecore-pack-", dir=out))
    try:
        a = len(items) + 1
        b = a + len(classes)
        ranges = [[0, 0] for _ in classes]
        resized = 0
        with RecordWriter(tmp / "train.rec", tmp / "train.idx") as writer:
            writer.write(0, pack([a, b]))
            for key, (path, cls) in enumerate(_bar(items, len(items), "packing", progress), 1):
                data, was_resized = prepare_image(
                    path.read_bytes(), str(path), img_size=img_size, quality=quality, resize=resize,
                    landmarks=None if points is None else points[image_key(path)][0],
                )
                resized += was_resized
                writer.write(key, pack(float(cls), data, id=key))
                if ranges[cls][0] == 0:
                    ranges[cls][0] = key
                ranges[cls][1] = key + 1
            for cls, (start, end) in enumerate(ranges):
                writer.write(a + cls, pack([start, end], id=a + cls))
        (tmp / "property").write_text(f"{len(classes)},{img_size},{img_size}\n")
        for name in REC_FILES:
            os.replace(tmp / name, out / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _write_missing_report(out / MISSING_REPORT, skipped, landmarks)
    if resized:
        warnings.warn(f"{resized} of {len(items)} images were not {img_size}x{img_size} and were resized", stacklevel=2)
    if skipped:
        warnings.warn(f"{len(skipped)} image(s) without landmarks were left out: {listing(skipped)} "
                      f"(all listed in {out / MISSING_REPORT})", stacklevel=2)
    aligned = len(items) if points is not None else 0
    return {"images": len(items), "identities": len(classes), "resized": resized, "aligned": aligned,
            "skipped": len(skipped)}


def _write_missing_report(path: Path, skipped: list[str], landmarks: str | os.PathLike | None) -> None:
    """List the images left out for want of landmarks; remove a stale report when none were."""
    if skipped:
        path.write_text(f"# images without a line in {landmarks}, left out of the pack\n" + "\n".join(skipped) + "\n")
    else:
        path.unlink(missing_ok=True)


def read_pairs(pairs_file: str | os.PathLike) -> list[tuple[Path, Path, bool, int]]:
    """Parse ``path_a path_b 0|1`` lines to (a, b, same, line number).

    Relative paths are taken against the pairs file's folder; blank lines and # comments are skipped.
    """
    pairs_file = Path(pairs_file)
    try:
        text = pairs_file.read_text()
    except FileNotFoundError:
        raise DataError(f"pairs file not found: {pairs_file}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read pairs file {pairs_file}: {exc}") from None
    base = pairs_file.parent
    pairs = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 3 or parts[2] not in ("0", "1"):
            raise DataError(f"{pairs_file} line {number}: expected 'path_a path_b 0|1' (1: same person), "
                            f"got {line[:80]!r}")
        a, b = (Path(p) if os.path.isabs(p) else base / p for p in parts[:2])
        pairs.append((a, b, parts[2] == "1", number))
    if not pairs:
        raise DataError(f"{pairs_file} has no pairs; expected lines of 'path_a path_b 0|1'")
    return pairs


def pack_bin(
    pairs_file: str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    img_size: int = 112,
    resize: bool = True,
    progress: bool = True,
    force: bool = False,
    quality: int = 95,
    landmarks: str | os.PathLike | None = None,
    missing_landmarks: str = "error",
) -> int:
    """Pack the pairs listed in ``pairs_file`` into a ``.bin`` pair set; returns the number of pairs.

    With ``landmarks`` (paths relative to the pairs file's folder, like the pairs) each image
    is aligned; an image without a line is an error, or with ``missing_landmarks="skip"`` its
    pairs are left out and the images listed in ``<out_path stem>.missing_landmarks.txt``.
    """
    _check_missing(missing_landmarks)
    pairs = read_pairs(pairs_file)
    out = Path(out_path)
    _refuse_existing([out], force)
    base = Path(pairs_file).parent
    points = landmarks_by_image(read_landmark_file(landmarks), base) if landmarks is not None else None
    skipped: list[str] = []
    if points is not None:
        used = list(dict.fromkeys(p for a, b, _, _ in pairs for p in (a, b)))
        skipped = [os.path.relpath(p, base) for p in used if image_key(p) not in points]
        if skipped and missing_landmarks == "error":
            raise _missing_landmarks_error(skipped, len(used), "images of the pairs", landmarks)
        total = len(pairs)
        pairs = [pair for pair in pairs if image_key(pair[0]) in points and image_key(pair[1]) in points]
        if not pairs:
            raise DataError(f"every pair in {pairs_file} has an image without a line in {landmarks}: nothing to pack")
        dropped = total - len(pairs)
    cache: dict[Path, bytes] = {}
    images, issame, resized = [], [], 0
    for a, b, same, number in _bar(pairs, len(pairs), "packing pairs", progress):
        for path in (a, b):
            if path not in cache:
                try:
                    raw = path.read_bytes()
                except OSError as exc:
                    raise DataError(f"{pairs_file} line {number}: image {path} cannot be read ({exc.strerror})") from None
                cache[path], was_resized = prepare_image(
                    raw, str(path), img_size=img_size, quality=quality, resize=resize,
                    landmarks=None if points is None else points[image_key(path)][0],
                )
                resized += was_resized
            images.append(cache[path])
        issame.append(same)
    if out.parent != Path(""):
        out.parent.mkdir(parents=True, exist_ok=True)
    write_bin(out, images, issame)
    if points is not None:
        report = out.with_name(f"{out.stem}.{MISSING_REPORT}")
        _write_missing_report(report, skipped, landmarks)
        if skipped:
            warnings.warn(f"{len(skipped)} image(s) without landmarks were left out with their {dropped} pair(s): "
                          f"{listing(skipped)} (all listed in {report})", stacklevel=2)
    if resized:
        warnings.warn(f"{resized} of {len(cache)} images were not {img_size}x{img_size} and were resized", stacklevel=2)
    return len(pairs)

"""Safe reading and writing of InsightFace ``.bin`` pair sets: a pickle of (image bytes list, issame list).

A pickle can run code while it loads. The reader uses a restricted unpickler that resolves
only the few globals these files need (numpy's uint8 array reconstruction, bytearray from
bytes, and the latin-1 ``_codecs.encode`` that Python 3 writes for bytes at protocol 2), so any
other import or call is refused before it happens.
"""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import DataError

try:  # numpy >= 2 moved the implementation; old pickles still name numpy.core
    from numpy._core.multiarray import _reconstruct as _np_reconstruct
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core.multiarray import _reconstruct as _np_reconstruct

_DTYPES = {"u1", "|u1", "uint8", "B", "b1", "|b1", "bool", "?"}


class RefusedPickle(DataError):
    """The pickle asks for a global that a pair set never needs; nothing from it has run."""


def _text(value: Any) -> Any:
    return value.decode("latin-1") if isinstance(value, (bytes, bytearray)) else value


def _reconstruct(subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
    """numpy's pickle hook, limited to plain empty ndarrays (the state comes in __setstate__)."""
    if subtype is not np.ndarray or tuple(shape) != (0,):
        raise RefusedPickle(f"array reconstruction with subtype={subtype!r}, shape={shape!r}")
    return _np_reconstruct(np.ndarray, (0,), _text(dtype))


def _dtype(spec: Any, align: Any = False, copy: Any = False) -> np.dtype:
    """numpy.dtype limited to the uint8 and bool types that image arrays and issame lists use."""
    spec = _text(spec)
    if not isinstance(spec, str) or spec not in _DTYPES:
        raise RefusedPickle(f"numpy.dtype({spec!r}) (only uint8 and bool arrays are allowed)")
    return np.dtype(spec, bool(align), bool(copy))


def _bytearray(data: Any = b"", encoding: Any = None) -> bytearray:
    """bytearray from bytes (protocol 3+) or a latin-1 str (protocol 2, Python 2)."""
    encoding = _text(encoding)
    if isinstance(data, bytes) and encoding is None:
        return bytearray(data)
    if isinstance(data, str) and encoding in ("latin-1", "latin1"):
        return bytearray(data, "latin-1")
    raise RefusedPickle(f"bytearray({type(data).__name__}, {encoding!r})")


def _codecs_encode(text: Any, encoding: Any = None, errors: Any = "strict") -> bytes:
    """``_codecs.encode`` as protocol 2 uses it for bytes (``encode(str, 'latin1')``), and nothing else.

    Other codecs (rot13, zlib, hex, ...) can transform data in ways a pair set never needs.
    """
    encoding = _text(encoding)
    if isinstance(text, str) and encoding in ("latin1", "latin-1") and errors == "strict":
        return text.encode("latin-1")
    raise RefusedPickle(f"_codecs.encode({type(text).__name__}, {encoding!r}) (only latin-1 text, as pickle writes bytes)")


_ALLOWED = {
    ("_codecs", "encode"): _codecs_encode,
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): _dtype,
    ("builtins", "bytearray"): _bytearray,
    ("__builtin__", "bytearray"): _bytearray,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise RefusedPickle(f"{module}.{name}") from None


def _entry_bytes(value: Any) -> bytes | None:
    if isinstance(value, bytes):
        return value
    if isinstance(value, bytearray):
        return bytes(value)
    if isinstance(value, np.ndarray) and value.dtype == np.uint8 and value.ndim == 1:
        return value.tobytes()
    if isinstance(value, str):  # a Python 2 str read with encoding='latin1'
        return value.encode("latin-1")
    return None


def _unpickle(data: bytes, path: Path) -> Any:
    error: Exception | None = None
    for encoding in ("bytes", "latin1"):  # 'bytes' keeps Python 2 str images as bytes
        try:
            return _RestrictedUnpickler(io.BytesIO(data), encoding=encoding).load()
        except RefusedPickle as exc:
            raise DataError(
                f"{path}: refusing to load this pickle: it asks for {exc}, which a .bin pair set never needs "
                "(it may hold only image bytes, uint8 arrays and booleans). Nothing from the file was run. "
                "Re-create the set from its images with `facecore pack bin`."
            ) from None
        except Exception as exc:  # noqa: BLE001 - any unpickling failure means 'not a readable pair set'
            error = exc
    raise DataError(f"{path} is not a readable .bin pair set ({type(error).__name__}: {error})")


def load_bin(path: str | os.PathLike) -> tuple[list[bytes], np.ndarray]:
    """Read a ``.bin`` pair set safely: (encoded images, two per pair in order; issame as a bool array)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"pair set not found: {path} (check eval.bin_file and data.root)") from None
    except OSError as exc:
        raise DataError(f"cannot read pair set {path}: {exc.strerror}") from None
    obj = _unpickle(data, path)
    if not isinstance(obj, (tuple, list)) or len(obj) != 2:
        raise DataError(f"{path}: expected a pickle of (bins, issame_list), got {type(obj).__name__}")
    bins, issame = obj
    if not isinstance(bins, (list, tuple)):
        raise DataError(f"{path}: the image list is a {type(bins).__name__}, expected a list of encoded images")
    if isinstance(issame, np.ndarray):
        if issame.ndim != 1 or not (issame.dtype == np.bool_ or issame.dtype == np.uint8):
            raise DataError(f"{path}: issame_list must be a 1-D bool array, got {issame.dtype} {issame.shape}")
        flags = issame.astype(bool)
    elif isinstance(issame, (list, tuple)):
        bad = next((i for i, v in enumerate(issame) if not isinstance(v, (bool, int)) or v not in (0, 1)), None)
        if bad is not None:
            raise DataError(f"{path}: issame_list[{bad}] is {issame[bad]!r}, expected True or False")
        flags = np.array([bool(v) for v in issame], dtype=bool)
    else:
        raise DataError(f"{path}: issame_list is a {type(issame).__name__}, expected a list of booleans")
    if len(bins) != 2 * len(flags):
        raise DataError(
            f"{path}: {len(bins)} images for {len(flags)} pairs; a pair set needs exactly two images per pair "
            f"({2 * len(flags)})"
        )
    images = []
    for i, value in enumerate(bins):
        entry = _entry_bytes(value)
        if entry is None:
            raise DataError(
                f"{path}: pair {i // 2} (image {i}) is a {type(value).__name__}; expected encoded image bytes"
            )
        images.append(entry)
    return images, flags


def write_bin(path: str | os.PathLike, images: Sequence[bytes], issame: Sequence[bool]) -> None:
    """Write a pair set (pickle protocol 4 of (list of bytes, list of bools)) atomically."""
    if len(images) != 2 * len(issame):
        raise ValueError(f"{len(images)} images for {len(issame)} pairs: need two per pair")
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            pickle.dump(([bytes(b) for b in images], [bool(s) for s in issame]), f, protocol=4)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()

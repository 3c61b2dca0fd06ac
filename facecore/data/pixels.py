"""Images as NumPy arrays, without torch: decoding (Pillow), resizing and the model-input normalisation.

The path ONNX Runtime inference takes (``Predictor(onnx_path=...)``), so a deployment needs
Pillow, NumPy and onnxruntime only. The arithmetic is :func:`facecore.data.images.normalize`'s:
``-1 + x * SCALE`` in float32, within one float32 rounding of it (tests/test_onnx_eval.py).
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError

# (x - 127.5) / 127.5 as -1 + x * SCALE, SCALE the float32 just below 1/127.5, so 255 maps to
# 1 - 1.2e-7 rather than 1 + 1.2e-7 and every value stays inside [-1, 1] (see data/images.py).
SCALE = float(np.nextafter(np.float32(1 / 127.5), np.float32(0)))

# What an export's input is, as its metadata records it (facecore.input).
INPUT_DESCRIPTION = "RGB, NCHW float32, (x - 127.5) / 127.5 of uint8 pixels, aligned faces"


def pil_to_rgb_array(image: Any) -> np.ndarray:
    """A PIL image as HWC uint8 RGB (16-bit and float modes scaled, alpha dropped)."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(image).astype(np.int64)
        arr = (arr >> 8) if arr.max() > 255 else arr
        return np.repeat(np.clip(arr, 0, 255).astype(np.uint8)[:, :, None], 3, axis=2)
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.asarray(image)


def decode_rgb(data: bytes | bytearray | memoryview, what: str = "image") -> np.ndarray:
    """Encoded image bytes -> (H, W, 3) uint8 RGB through Pillow; a DataError naming ``what`` otherwise."""
    from PIL import Image

    if len(data) == 0:
        raise DataError(f"{what}: cannot decode image: it has 0 bytes")
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return pil_to_rgb_array(image)
    except Image.UnidentifiedImageError:
        raise DataError(f"{what}: cannot decode image: not a JPEG, PNG or other format Pillow knows") from None
    except Exception as exc:  # Pillow raises many types (OSError, SyntaxError, ValueError, ...)
        raise DataError(f"{what}: cannot decode image ({type(exc).__name__}: {exc})") from None


def resize_rgb(image: np.ndarray, img_size: int) -> np.ndarray:
    """Resize an HWC uint8 RGB image to img_size x img_size (bilinear, with antialiasing)."""
    from PIL import Image

    return np.asarray(Image.fromarray(image).resize((img_size, img_size), Image.BILINEAR))


def read_image_file(path: str | os.PathLike) -> bytes:
    """The bytes of an image file; DataError naming it when it is missing or unreadable."""
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise DataError(f"image file not found: {path}") from None
    except OSError as exc:
        raise DataError(f"cannot read image file {path}: {exc.strerror}") from None


def rgb_array(x: Any, img_size: int) -> np.ndarray:
    """One image for inference -> (img_size, img_size, 3) uint8 RGB; other sizes are resized with a warning.

    ``x``: a path, encoded bytes, a PIL image, an (H, W, 3) / (H, W) uint8 array, or a (3, H, W)
    uint8 tensor (anything with ``.numpy()``, read without importing torch).
    """
    what = "image"
    if isinstance(x, (str, os.PathLike)):
        what = str(x)
        arr = decode_rgb(read_image_file(x), what)
    elif isinstance(x, (bytes, bytearray, memoryview)):
        arr = decode_rgb(x)
    elif isinstance(x, np.ndarray):
        if x.dtype != np.uint8 or x.ndim not in (2, 3) or (x.ndim == 3 and x.shape[2] not in (1, 3, 4)):
            raise DataError(f"expected an (H, W, 3) or (H, W) uint8 image array, got {x.dtype} of shape {x.shape}")
        arr = x if x.ndim == 3 else x[:, :, None]
        arr = np.repeat(arr, 3, axis=2) if arr.shape[2] == 1 else arr[:, :, :3]
    elif hasattr(x, "convert") and hasattr(x, "mode"):  # PIL image
        arr = pil_to_rgb_array(x)
    elif hasattr(x, "numpy") and getattr(x, "ndim", None) == 3:  # a (3, H, W) uint8 torch tensor
        chw = x.detach().cpu().numpy()
        if chw.dtype != np.uint8 or chw.shape[0] != 3:
            raise DataError(f"expected a (3, H, W) uint8 image tensor, got {chw.dtype} of shape {chw.shape}")
        arr = chw.transpose(1, 2, 0)
    else:
        raise DataError(f"cannot load an image from {type(x).__name__}: pass a path, bytes, a PIL image or a uint8 array")
    if arr.shape[0] != img_size or arr.shape[1] != img_size:
        warnings.warn(f"{what} is {arr.shape[1]}x{arr.shape[0]}; resizing it to {img_size}x{img_size}", stacklevel=3)
        arr = resize_rgb(np.ascontiguousarray(arr), img_size)
    return np.ascontiguousarray(arr)


def model_input(images: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) uint8 RGB -> (N, 3, H, W) float32 in [-1, 1], as backbones and exports take it."""
    chw = np.ascontiguousarray(np.asarray(images, dtype=np.uint8).transpose(0, 3, 1, 2))
    return (chw.astype(np.float32) * np.float32(SCALE) + np.float32(-1.0)).astype(np.float32, copy=False)


__all__ = ["INPUT_DESCRIPTION", "SCALE", "decode_rgb", "model_input", "pil_to_rgb_array", "resize_rgb", "rgb_array"]

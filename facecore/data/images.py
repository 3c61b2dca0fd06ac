"""Image decoding and the shared transforms: bytes -> RGB uint8 CHW -> float32 in [-1, 1].

Training and pair-set datasets yield uint8 (3, H, W) images; they travel as uint8 (a quarter
of the bytes through worker queues, pinned memory and the host-to-device copy) and
:func:`model_input` makes them float on the device the model runs on.

JPEG goes through libjpeg-turbo via TorchCodec's decode_jpeg (or torchvision.io's where
TorchCodec is missing; both well above Pillow's rate on 112x112 faces, see
benchmarks/data.md); every other format, and JPEG when neither is there, goes through Pillow. Either way the result is RGB: grayscale, CMYK and alpha
inputs are converted.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..errors import DataError
from .pixels import SCALE, read_image_file, resize_rgb
from .pixels import pil_to_rgb_array as _pil_to_rgb_array

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
_RGB_MODE = 3  # torchvision ImageReadMode.RGB
# (x - 127.5) / 127.5 as one fused op, -1 + x * scale, with scale the float32 just below
# 1/127.5 so that 255 maps to 1 - 1.2e-7 rather than 1 + 1.2e-7: results stay inside [-1, 1]
# and within 1.2e-7 of the exact values, at about 60% of the cost of a subtract and a divide.
# data/pixels.py holds it, and the torch-free path ONNX Runtime inference takes.
_SCALE = SCALE
_MINUS_ONE = torch.tensor(-1.0)


class BadImageError(DataError):
    """Bytes that do not decode as an image; callers add which file and record they came from."""


def is_jpeg(data: bytes | bytearray | memoryview) -> bool:
    """Whether ``data`` starts with the JPEG SOI marker."""
    return bytes(data[:3]) == b"\xff\xd8\xff"


def _torchcodec_jpeg() -> Callable[[torch.Tensor], torch.Tensor]:
    from torchcodec.decoders import decode_jpeg

    return lambda t: decode_jpeg(t, mode="RGB")


def _torchvision_jpeg() -> Callable[[torch.Tensor], torch.Tensor]:
    from torchvision.io import ImageReadMode, decode_jpeg

    # torchvision 0.29 deprecated its image codecs in favour of TorchCodec and warns on every call
    warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                            category=DeprecationWarning)
    return lambda t: decode_jpeg(t, mode=ImageReadMode.RGB)


def _probe_torch_jpeg() -> tuple[str, Callable[[torch.Tensor], torch.Tensor] | None]:
    """The first JPEG decoder that is installed and behaves as expected: TorchCodec, torchvision, else Pillow.

    All go through public APIs. benchmarks/jpeg_decoders.py measured the choice: TorchCodec
    imports in milliseconds where torchvision.io takes seconds (per spawned DataLoader worker)
    and decodes 112x112 faces faster.
    """
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buf, format="JPEG")
    probe = torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)
    for name, make in (("torchcodec", _torchcodec_jpeg), ("torchvision", _torchvision_jpeg)):
        try:
            decode = make()
            out = decode(probe)
            if out.shape == (3, 8, 8) and out.dtype == torch.uint8:
                return name, decode
        except Exception:  # noqa: BLE001 - a missing or broken decoder just means the next one
            continue
    return "pillow", None


JPEG_DECODER, _torch_jpeg = _probe_torch_jpeg()


def _pil_decode(data: bytes | bytearray | memoryview) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return _pil_to_rgb_array(image)
    except Image.UnidentifiedImageError:
        raise BadImageError("cannot decode image: not a JPEG, PNG or other format Pillow knows") from None
    except Exception as exc:  # Pillow raises many types (OSError, SyntaxError, ValueError, ...)
        raise BadImageError(f"cannot decode image ({type(exc).__name__}: {exc})") from None


def decode_chw(data: bytes | bytearray | memoryview) -> torch.Tensor:
    """Decode encoded image bytes to a (3, H, W) uint8 RGB tensor; raises BadImageError."""
    if len(data) == 0:
        raise BadImageError("cannot decode image: it has 0 bytes")
    if _torch_jpeg is not None and is_jpeg(data):
        try:
            return _torch_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        except RuntimeError as exc:
            reason = str(exc).strip().splitlines()[-1].split(", ")[-1]
            raise BadImageError(f"cannot decode JPEG image ({reason})") from None
    return _hwc_to_chw(_pil_decode(data))


def decode_image(data: bytes | bytearray | memoryview) -> np.ndarray:
    """Decode encoded image bytes to an (H, W, 3) uint8 RGB array; raises BadImageError (a DataError)."""
    return np.ascontiguousarray(decode_chw(data).permute(1, 2, 0).numpy())


def normalize(chw: torch.Tensor, flip: bool = False) -> torch.Tensor:
    """(..., 3, H, W) uint8 -> float32 (x - 127.5) / 127.5 in [-1, 1] on the same device, optionally mirrored."""
    if flip:
        chw = chw.flip(-1)
    return torch.add(_MINUS_ONE, chw, alpha=_SCALE)


def model_input(images: torch.Tensor, source: str = "the dataset") -> torch.Tensor:
    """A batch as backbones take it: float32 in [-1, 1], on the device ``images`` are on.

    uint8 images (what the bundled datasets yield) are normalized here with :func:`normalize`'s
    arithmetic; floating-point images (a dataset that normalizes itself) are taken as already in
    [-1, 1]. ``source`` names where the images came from in the error for any other dtype.
    """
    if images.dtype == torch.uint8:
        return normalize(images)
    if images.is_floating_point():
        return images.float()
    raise DataError(f"{source} yields {images.dtype} images; images must be uint8 (0-255) or float in [-1, 1]")


def _hwc_to_chw(image: np.ndarray) -> torch.Tensor:
    """An (H, W, 3) uint8 array as a (3, H, W) tensor (copied when numpy marks it read-only)."""
    image = np.ascontiguousarray(image.transpose(2, 0, 1))
    return torch.from_numpy(image if image.flags.writeable else image.copy())


def _as_chw(image: np.ndarray | torch.Tensor) -> torch.Tensor:
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected an (H, W, 3) RGB array, got shape {image.shape}")
        return _hwc_to_chw(image)
    return image


def eval_transform(image: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Evaluation transform: normalize only (HWC array or CHW uint8 tensor)."""
    return normalize(_as_chw(image))


def check_size(chw: torch.Tensor, img_size: int) -> str | None:
    """None when ``chw`` is img_size x img_size, else a message describing the mismatch."""
    h, w = chw.shape[1], chw.shape[2]
    if h == img_size and w == img_size:
        return None
    return f"the image is {w}x{h} but img_size is {img_size} (images must already be {img_size}x{img_size})"


def load_image(x: Any, img_size: int = 112) -> torch.Tensor:
    """An image for prediction -> (3, img_size, img_size) float32 in [-1, 1].

    ``x`` is a path, encoded bytes, a PIL image, an (H, W, 3) / (H, W) uint8 array or a
    (3, H, W) uint8 tensor. Other sizes are resized with a warning (training refuses them instead).
    """
    what = "image"
    if isinstance(x, (str, os.PathLike)):
        what = str(x)
        try:
            chw = decode_chw(read_image_file(x))
        except BadImageError as exc:
            raise DataError(f"{x}: {exc}") from None
    elif isinstance(x, (bytes, bytearray, memoryview)):
        chw = decode_chw(x)
    elif isinstance(x, torch.Tensor):
        if x.dtype != torch.uint8 or x.ndim != 3 or x.shape[0] != 3:
            raise DataError(f"expected a (3, H, W) uint8 image tensor, got {x.dtype} of shape {tuple(x.shape)}")
        chw = x
    elif isinstance(x, np.ndarray):
        if x.dtype != np.uint8 or x.ndim not in (2, 3) or (x.ndim == 3 and x.shape[2] not in (1, 3, 4)):
            raise DataError(f"expected an (H, W, 3) or (H, W) uint8 image array, got {x.dtype} of shape {x.shape}")
        arr = x if x.ndim == 3 else x[:, :, None]
        chw = _hwc_to_chw(np.repeat(arr, 3, axis=2) if arr.shape[2] == 1 else arr[:, :, :3])
    elif hasattr(x, "convert") and hasattr(x, "mode"):  # PIL image
        chw = _hwc_to_chw(_pil_to_rgb_array(x))
    else:
        raise DataError(f"cannot load an image from {type(x).__name__}: pass a path, bytes, a PIL image or a uint8 array")
    if check_size(chw, img_size) is not None:
        h, w = chw.shape[1], chw.shape[2]
        warnings.warn(f"{what} is {w}x{h}; resizing it to {img_size}x{img_size}", stacklevel=2)
        chw = _hwc_to_chw(resize_rgb(chw.permute(1, 2, 0).numpy(), img_size))
    return eval_transform(chw)


def training_set_schema(root_description: str) -> dict:
    """The options schema of an image training set: ``root``, ``img_size`` and ``on_bad_image``."""
    return {
        "type": "object",
        "additionalProperties": False,
        "required": ["root"],
        "properties": {
            "root": {"type": "string", "description": root_description},
            "img_size": {
                "type": "integer",
                "minimum": 8,
                "default": 112,
                "description": "Height and width every image must have; another size is an error, not a resize.",
            },
            "on_bad_image": {
                "enum": ["stop", "skip"],
                "default": "stop",
                "description": "An undecodable image stops the run, or is skipped (returned with label -1 and counted).",
            },
        },
    }


def training_item(
    data: bytes | bytearray | memoryview,
    *,
    img_size: int,
    where: str | Callable[[], str],
    skip_bad: bool,
) -> torch.Tensor | None:
    """Decode and size-check one training image: (3, H, W) uint8, as stored.

    Training datasets do not augment: the trainer does, on the device (``data.augment``).

    None when it is undecodable and ``skip_bad``. Normalizing to float waits for the device
    (:func:`model_input`), so batches cross process and device boundaries as uint8.

    ``where`` (a string, or a callable made into one only on error) names the file / record
    for the error messages. A size mismatch always raises.
    """
    try:
        chw = decode_chw(data)
    except BadImageError as exc:
        if skip_bad:
            return None
        place = where() if callable(where) else where
        raise DataError(f"{place}: {exc}. Fix or remove it, or set data.on_bad_image: skip") from None
    problem = check_size(chw, img_size)
    if problem is not None:
        place = where() if callable(where) else where
        raise DataError(f"{place}: {problem}; re-pack the data at that size or set data.img_size")
    return chw


def skipped_placeholder(img_size: int) -> torch.Tensor:
    """The image a dataset returns (with label -1) in place of one it skipped: uint8 zeros."""
    return torch.zeros(3, img_size, img_size, dtype=torch.uint8)


def list_image_folder(root: str | os.PathLike) -> tuple[list[str], list[tuple[Path, int]]]:
    """Scan ``root/<identity>/<image>``: identity names sorted to class ids 0..K-1, and (path, class) items.

    Images are .jpg/.jpeg/.png in any case; hidden entries are ignored. A missing or empty
    root, a file where an identity folder belongs, a folder inside an identity, or an
    identity without images is a DataError naming it.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder {root} not found; expected {root}/<identity>/<image>.jpg")
    entries = sorted((e for e in os.scandir(root) if not e.name.startswith(".")), key=lambda e: e.name)
    if not entries:
        raise DataError(f"image folder {root} is empty; expected one sub-folder per identity")
    classes, items = [], []
    for entry in entries:
        if not entry.is_dir():
            raise DataError(f"{entry.path} is a file where an identity folder belongs; the layout is "
                            f"{root}/<identity>/<image>.jpg: move it into an identity folder or remove it")
        images = []
        for sub in sorted(os.scandir(entry.path), key=lambda e: e.name):
            if sub.name.startswith("."):
                continue
            if sub.is_dir():
                raise DataError(f"{sub.path} is a folder inside identity folder {entry.name}; the layout is "
                                f"{root}/<identity>/<image>.jpg with no deeper folders")
            if os.path.splitext(sub.name)[1].lower() in IMAGE_EXTENSIONS:
                images.append(Path(sub.path))
        if not images:
            raise DataError(f"identity folder {entry.path} has no .jpg/.jpeg/.png images; add some or remove it")
        cls = len(classes)
        classes.append(entry.name)
        items.extend((p, cls) for p in images)
    return classes, items

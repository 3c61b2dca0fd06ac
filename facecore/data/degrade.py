"""Low-quality copies of face images: off-centre framing, bad lighting, low resolution, JPEG.

``facecore demo-data --degraded`` uses it to make a second held-out pair set in the spirit of
TinyFace or IJB's worst shots, so training augmentations can be judged on the faces they are
meant for. The operations are of the same families as the training augmentations, but with
their own implementation (Pillow and numpy on encoded files) and parameters: the low-resolution
range is lower, the framing errors zoom out as well as in, and lighting has gamma and colour
temperature, which the photometric augmentation does not. Every image is degraded by a random
stream of its own (seed, identity, image index), so the set is reproducible.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import numpy as np
from PIL import Image

DEGRADE_STREAM = 2  # random streams: 0 training identities, 1 held-out identities (synthetic.py)


@dataclass(frozen=True)
class Degradation:
    """How strongly images are degraded; every range is sampled uniformly per image."""

    side: tuple[int, int] = (16, 40)  # pixels of the small image the face passes through (of 112)
    reframe: float = 0.7  # chance of an off-centre framing
    zoom: tuple[float, float] = (0.8, 1.3)  # > 1 crops into the face, < 1 shows black around it
    shift: float = 0.1  # largest offset of the framing, as a fraction of the side
    relight: float = 0.8  # chance of bad lighting
    gain: tuple[float, float] = (0.5, 1.4)  # brightness multiplier
    gamma: tuple[float, float] = (0.6, 1.8)  # drawn log-uniformly; > 1 darkens the mid-tones
    contrast: tuple[float, float] = (0.5, 1.0)  # pulls the pixels toward their mean
    cast: float = 0.15  # colour temperature: red and blue gains of 1 +- cast, opposite signs
    noise: float = 5.0  # largest std of sensor noise, in 0-255 levels, added at low resolution
    jpeg: tuple[int, int] = (35, 75)  # JPEG quality of the stored file


DEGRADATION = Degradation()


def degrade(image: Image.Image, rng: np.random.Generator, d: Degradation = DEGRADATION) -> Image.Image:
    """A degraded RGB copy of ``image`` (same size): framing, then lighting, then resolution and noise."""
    image = image.convert("RGB")
    width, height = image.size
    if rng.random() < d.reframe:
        zoom = rng.uniform(*d.zoom)
        bw, bh = width / zoom, height / zoom
        cx = width / 2 + rng.uniform(-d.shift, d.shift) * width
        cy = height / 2 + rng.uniform(-d.shift, d.shift) * height
        box = (cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2)
        image = image.transform((width, height), Image.Transform.EXTENT, box, Image.Resampling.BICUBIC)
    x = np.asarray(image, dtype=np.float32) / 255
    if rng.random() < d.relight:
        contrast = rng.uniform(*d.contrast)
        x = (x - x.mean()) * contrast + x.mean()
        t = rng.uniform(-d.cast, d.cast)
        x = x * np.array([1 + t, 1.0, 1 - t], dtype=np.float32) * np.float32(rng.uniform(*d.gain))
        gamma = np.exp(rng.uniform(np.log(d.gamma[0]), np.log(d.gamma[1])))
        x = np.clip(x, 0, 1) ** np.float32(gamma)
    image = Image.fromarray(np.clip(x * 255 + 0.5, 0, 255).astype(np.uint8))
    side = int(rng.integers(d.side[0], d.side[1] + 1))
    small = image.resize((side, round(side * height / width)), Image.Resampling.BOX)
    noisy = np.asarray(small, dtype=np.float32) + rng.standard_normal((small.height, small.width, 3)) * rng.uniform(0, d.noise)
    small = Image.fromarray(np.clip(noisy + 0.5, 0, 255).astype(np.uint8))
    up = (Image.Resampling.BILINEAR, Image.Resampling.BICUBIC)[int(rng.integers(2))]
    image = small.resize((width, height), up)
    buf = BytesIO()
    image.save(buf, format="JPEG", quality=int(rng.integers(d.jpeg[0], d.jpeg[1] + 1)))
    return Image.open(BytesIO(buf.getvalue())).convert("RGB")


def degrade_folder(src: str | os.PathLike, dst: str | os.PathLike, *, seed: int,
                   degradation: Degradation = DEGRADATION) -> int:
    """Write a degraded copy of every ``src/<identity>/<image>.jpg`` to ``dst`` (same names); returns the count.

    Image ``n`` (in sorted order) of identity folder ``<id>`` is degraded by
    ``numpy.random.default_rng([seed, DEGRADE_STREAM, id, n])``.
    """
    src, dst = Path(src), Path(dst)
    count = 0
    for folder in sorted(p for p in src.iterdir() if p.is_dir()):
        identity = int(folder.name) if folder.name.isdigit() else zlib.crc32(folder.name.encode())
        (dst / folder.name).mkdir(parents=True, exist_ok=True)
        for n, file in enumerate(sorted(folder.glob("*.jpg"))):
            rng = np.random.default_rng([seed, DEGRADE_STREAM, identity, n])
            with Image.open(file) as im:
                out = degrade(im, rng, degradation)
            out.save(dst / folder.name / file.name, format="JPEG", quality=95)
            count += 1
    return count

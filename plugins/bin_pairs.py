"""The ``bin-pairs`` validation dataset: InsightFace ``.bin`` pair sets (LFW, CFP-FP, AgeDB-30, ...), loaded safely."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.utils.data import Dataset

from facecore import hookimpl
from facecore.data.binfile import load_bin
from facecore.errors import DataError
from facecore.data.images import BadImageError, check_size, decode_chw

SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["path"],
    "properties": {
        "path": {"type": "string", "description": "A .bin pair set (pickle of image bytes and issame flags)."},
        "img_size": {"type": "integer", "minimum": 8, "default": 112, "description": "Height and width of every image."},
    },
}


class BinPairsDataset(Dataset):
    """Images of a pair set in pair order (2 per pair), ``issame`` per pair and ``name`` (the file stem).

    Every image is decoded and size-checked once on load, so a broken pair is reported before
    evaluation starts; items keep only the encoded bytes and decode on access (a tenth of the
    memory of decoded images, see benchmarks/data.md).
    """

    def __init__(self, path: str, img_size: int = 112):
        self.path = Path(path)
        self.name = self.path.stem
        self.img_size = img_size
        self.images, self.issame = load_bin(self.path)
        self._check_images()

    def _check_images(self) -> None:
        from tqdm import tqdm

        bar = tqdm(self.images, desc=f"checking {self.path.name}", unit="img", leave=False,
                   disable=not sys.stderr.isatty())
        for i, data in enumerate(bar):
            try:
                problem = check_size(decode_chw(data), self.img_size)
            except BadImageError as exc:
                problem = str(exc)
            if problem is not None:
                raise DataError(f"{self.path}: pair {i // 2} is broken: its {('first', 'second')[i % 2]} image "
                                f"(image {i}): {problem}")

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        """Image ``index`` as (3, H, W) uint8; evaluation normalizes whole batches on its device."""
        return decode_chw(self.images[index])

    @property
    def num_pairs(self) -> int:
        return len(self.issame)


@hookimpl
def register_datasets(register):
    register("bin-pairs", BinPairsDataset, schema=SCHEMA,
             description="InsightFace .bin verification pair set (lfw.bin, cfp_fp.bin, ...), loaded without running pickle code")


"""The first training batch before and after ``data.augment``, as a PNG grid: what the network sees.

The images are the first ones of epoch 0 in the trainer's sampling order, augmented exactly as
that batch is in training (single process); rows alternate before / after.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch.utils.data.distributed import DistributedSampler

from ..core.build import build_train_dataset
from ..core.runtime import DistInfo
from ..data.images import model_input
from ..errors import DataError
from .augment import Augmenter

GAP = 4  # pixels between tiles and around the grid
COLUMNS = 8
BACKGROUND = (32, 32, 32)


def first_images(config: dict, count: int) -> torch.Tensor:
    """The first ``count`` images of epoch 0 as the trainer reads them: (count, 3, H, W) float in [-1, 1]."""
    dataset = build_train_dataset(config, train=False)
    if len(dataset) == 0:
        raise DataError(f"the {config['data']['type']} dataset at data.root ({config['data'].get('root')}) is empty")
    sampler = DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=config["seed"], drop_last=True)
    sampler.set_epoch(0)
    indices = list(sampler)[:count]
    images = torch.stack([torch.as_tensor(dataset[i][0]) for i in indices])
    return model_input(images, f"the {config['data']['type']} dataset")  # the trainer's normalization


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats to (N, H, W, 3) uint8 pixels."""
    return ((images.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def grid(before: torch.Tensor, after: torch.Tensor, columns: int = COLUMNS) -> Any:
    """A PIL image: rows of up to ``columns`` tiles, each row of originals followed by their augmented versions."""
    from PIL import Image

    n, _, height, width = before.shape
    columns = min(columns, n)
    groups = math.ceil(n / columns)
    canvas = Image.new("RGB", (columns * (width + GAP) + GAP, 2 * groups * (height + GAP) + GAP), BACKGROUND)
    for row_kind, batch in enumerate((to_uint8(before), to_uint8(after))):
        for i in range(n):
            group, column = divmod(i, columns)
            x = GAP + column * (width + GAP)
            y = GAP + (2 * group + row_kind) * (height + GAP)
            canvas.paste(Image.fromarray(batch[i].numpy()), (x, y))
    return canvas


def write_preview(config: dict, output: str | Path, count: int) -> dict:
    """Write the before/after grid of the first ``count`` training images to ``output`` (PNG)."""
    before = first_images(config, count)
    augment = Augmenter.from_config(config)
    after = augment(before, config["seed"], 0, 0, DistInfo())
    image = grid(before, after)
    output = Path(output)
    if output.parent != Path(""):
        output.parent.mkdir(parents=True, exist_ok=True)
    image.save(output, format="PNG")
    return {"path": str(output), "size": image.size, "images": before.shape[0],
            "augmentations": [f"{s.name} (p {s.p:g})" for s in augment.steps]}

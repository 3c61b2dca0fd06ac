"""TensorBoard event files: finite numbers as scalars, and images. The one writer training and
``facecore eval`` share; torch's SummaryWriter is imported only when one is opened."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping


class TensorBoard:
    """A SummaryWriter on ``folder`` that skips what TensorBoard cannot show (NaN, inf, non-numbers)."""

    def __init__(self, folder: str | Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(folder))

    def scalars(self, prefix: str, values: Mapping[str, Any], step: int) -> None:
        """``prefix/key`` for each finite number in ``values`` (booleans are not numbers here)."""
        for key, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                self.writer.add_scalar(f"{prefix}/{key}", value, step)

    def image(self, tag: str, image: Any, step: int) -> None:
        """An RGB image (a PIL image or an (H, W, 3) array)."""
        import numpy as np

        self.writer.add_image(tag, np.asarray(image), step, dataformats="HWC")

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()

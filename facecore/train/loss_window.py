"""The training loss, kept on the device between log lines so the loop never waits for it.

Reading a CUDA tensor on the host (``float(loss)``, ``loss.item()``) blocks until the device has
finished every step queued so far, so the host can no longer prepare the next batches while the
device computes. :class:`LossWindow` adds each loss to a device-side sum and a device-side
"something was not finite" flag, and the trainer reads them once every ``training.log_every``
steps (and before it writes a checkpoint).
"""

from __future__ import annotations

import time

import torch


class LossWindow:
    """Losses of the optimizer steps after ``first_step`` (1-based), summed on ``device``."""

    def __init__(self, device: torch.device, first_step: int):
        self.device = device
        self.reset(first_step)

    def reset(self, first_step: int, started: float | None = None) -> None:
        """Start a new window at optimizer step ``first_step``; its clock starts at ``started`` (default: now)."""
        self.first_step = first_step
        self.total = torch.zeros((), dtype=torch.float32, device=self.device)
        self.nonfinite = torch.zeros((), dtype=torch.bool, device=self.device)
        self.losses = 0  # micro-batch losses added (a host count: no device read)
        self.images = 0  # images trained on, all processes together
        self.started = time.perf_counter() if started is None else started

    def add(self, loss: torch.Tensor, images: int) -> None:
        """Add one micro-batch loss without reading it (queued on the device like the step itself)."""
        loss = loss.detach().float()
        self.total += loss
        self.nonfinite |= ~torch.isfinite(loss)
        self.losses += 1
        self.images += images

    def read(self) -> tuple[float, bool]:
        """(mean loss, all finite) in one device-to-host transfer (waits for the queued steps)."""
        total, bad = torch.stack([self.total, self.nonfinite.float()]).tolist()
        return total / max(self.losses, 1), not bad

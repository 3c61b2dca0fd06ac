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
    """Losses of the optimizer steps after ``first_step`` (1-based), summed on ``device``.

    With ``world_size > 1`` a read is a collective: the sums of all ranks are added, so every rank
    sees the same mean loss and the same "not finite" verdict and all stop together, never one
    rank alone while the others wait in their next collective.
    """

    def __init__(self, device: torch.device, first_step: int, world_size: int = 1):
        self.device, self.world_size = device, world_size
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
        """(mean loss over ranks, all finite on every rank) in one device-to-host transfer (waits for the queued steps)."""
        stats = torch.stack([self.total, self.nonfinite.float()])
        if self.world_size > 1:
            import torch.distributed as dist

            dist.all_reduce(stats)
        total, bad = stats.tolist()
        return total / max(self.losses, 1) / self.world_size, not bad

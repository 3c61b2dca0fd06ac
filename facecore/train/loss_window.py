"""The training loss and its named terms, kept on the device between log lines so the loop never waits.

Reading a CUDA tensor on the host (``float(loss)``, ``loss.item()``) blocks until the device has
finished every step queued so far, so the host can no longer prepare the next batches while the
device computes. :class:`LossWindow` adds each loss (and each term it is the sum of) to
device-side sums and a device-side "something was not finite" flag, and the trainer reads them
once every ``training.log_every`` steps (and before it writes a checkpoint).
"""

from __future__ import annotations

import time
from typing import NamedTuple

import torch


class Reading(NamedTuple):
    """One read of a window: the mean loss, whether every loss was finite, and each term's mean."""

    loss: float
    finite: bool
    terms: dict[str, float]


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
        self.terms: dict[str, torch.Tensor] = {}
        self.losses = 0  # micro-batch losses added (a host count: no device read)
        self.images = 0  # images trained on, all processes together
        self.started = time.perf_counter() if started is None else started

    def add(self, loss: torch.Tensor, images: int, terms: dict[str, torch.Tensor] | None = None) -> None:
        """Add one micro-batch loss (and the terms it sums) without reading it (queued on the device)."""
        loss = loss.detach().float()
        self.total += loss
        self.nonfinite |= ~torch.isfinite(loss)
        for name, value in (terms or {}).items():
            value = value.detach().float()
            if name in self.terms:
                self.terms[name] += value
            else:
                self.terms[name] = value.clone()
        self.losses += 1
        self.images += images

    def read(self) -> Reading:
        """Means over the window and the ranks, in one device-to-host transfer (waits for the queued steps)."""
        stats = torch.stack([self.total, self.nonfinite.float(), *self.terms.values()])
        if self.world_size > 1:
            import torch.distributed as dist

            dist.all_reduce(stats)
        values = stats.tolist()
        scale = 1.0 / (max(self.losses, 1) * self.world_size)
        terms = {name: v * scale for name, v in zip(self.terms, values[2:])}
        return Reading(values[0] * scale, not values[1], terms)

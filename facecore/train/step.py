"""One training step: a loss that is a sum of named terms, backward, and the optimizer step.

The trainer feeds micro-batches; :class:`TrainStep` runs the forward under the configured
autocast, back-propagates the sum of the terms (scaled for gradient accumulation and fp16),
adds the loss and each term to the device-side :class:`LossWindow`, and every
``accumulate`` micro-batches unscales, clips, steps the optimizer, the scheduler and the grad
scaler. It knows nothing of data, checkpoints or validation, so it can be tested alone.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from .classifier import total_loss
from .loss_window import LossWindow

# forward(images, labels) -> {term name: scalar loss tensor}
LossFn = Callable[[torch.Tensor, torch.Tensor], "dict[str, torch.Tensor]"]


class TrainStep:
    """Micro-batches in, optimizer steps out; the loss and its terms are summed in ``window``."""

    def __init__(self, optimizer: torch.optim.Optimizer, scheduler: Any, scaler: torch.amp.GradScaler,
                 window: LossWindow, *, accumulate: int = 1, amp_dtype: torch.dtype | None = None,
                 clip: Callable[[], None] | None = None, before_step: Callable[[], None] | None = None):
        self.optimizer, self.scheduler, self.scaler, self.window = optimizer, scheduler, scaler, window
        self.accumulate, self.amp_dtype, self.clip, self.before_step = accumulate, amp_dtype, clip, before_step
        self.pending = 0  # micro-batches back-propagated since the last optimizer step

    def backward(self, forward: LossFn, images: torch.Tensor, labels: torch.Tensor, images_counted: int) -> None:
        """Forward one micro-batch under autocast, back-propagate its share of the loss, add it to the window."""
        device = images.device.type
        with torch.autocast(device, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None):
            terms = forward(images, labels)
        loss = total_loss(terms)
        self.scaler.scale(loss / self.accumulate).backward()
        self.window.add(loss, images_counted, terms)
        self.pending += 1

    @property
    def due(self) -> bool:
        """True once ``accumulate`` micro-batches wait for an optimizer step."""
        return self.pending >= self.accumulate

    def optimizer_step(self) -> None:
        """(Sync what DDP does not,) unscale, clip, step the optimizer and the LR schedule, clear the gradients."""
        if self.before_step is not None:  # e.g. a sharded classifier's head parameters, summed over the ranks
            self.before_step()
        if self.clip is not None:
            self.scaler.unscale_(self.optimizer)
            self.clip()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.pending = 0

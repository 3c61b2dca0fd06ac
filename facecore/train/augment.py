"""The training batch's augmentations: the ``data.augment`` list applied on the training device.

Every random number comes from the core, drawn as a pure function of (seed, epoch, batch index,
position of the image in the global batch, index of the augmentation in the list). Rank ``r`` of
``w`` holds the images at global positions ``r, r + w, r + 2w, ...`` of a batch (the order of
DistributedSampler), and takes exactly those positions' numbers, so an image is augmented the
same way whatever the number of ranks or data workers, and a run resumed mid-epoch continues
with the numbers it would have drawn.

For each augmentation the core draws, per image of the global batch, one number that decides
whether the image gets it (``< p``) and ``aug.draws`` numbers that the augmentation turns into
its parameters. Only the chosen images are handed to the augmentation. The draws come from
``torch.Generator``s seeded per (seed, epoch, batch, augmentation index, stream); the first
augmentation's choice stream uses the seed of the trainer's former built-in flip, so the default
list ``[flip]`` flips exactly the images it flipped.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ..core.runtime import DistInfo
from ..errors import PluginError

CHOICE, PARAMS = 0, 1  # the two random streams of an augmentation
_SEED_MASK = (1 << 64) - 1


def stream_seed(seed: int, epoch: int, batch: int, index: int, stream: int) -> int:
    """The generator seed of one augmentation's stream for one batch (a pure function of its arguments)."""
    base = (seed * 1_000_003 + epoch) * 1_000_003 + batch  # the seed of facecore's first built-in flip
    if index == 0 and stream == CHOICE:
        return base & _SEED_MASK
    digest = hashlib.blake2b(f"{base}/{index}/{stream}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def _uniforms(seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


@dataclass(frozen=True)
class Step:
    """One entry of ``data.augment``: its name, probability per image and the augmentation callable."""

    name: str
    p: float
    aug: Callable[..., torch.Tensor]

    @property
    def draws(self) -> int:
        """Uniform random numbers the augmentation needs per image (its ``draws`` attribute, default 0)."""
        return int(getattr(self.aug, "draws", 0))


class Augmenter:
    """Applies a list of augmentations to training batches as pure functions of (seed, epoch, batch, position)."""

    def __init__(self, steps: Sequence[Step]):
        self.steps = list(steps)
        for step in self.steps:
            draws = getattr(step.aug, "draws", 0)
            if not isinstance(draws, int) or isinstance(draws, bool) or draws < 0:
                raise PluginError(f"augmentation '{step.name}': its 'draws' attribute must be an integer >= 0, "
                                  f"got {draws!r}")

    @classmethod
    def from_config(cls, config: dict) -> "Augmenter":
        """The augmenter of ``data.augment`` (built through the augmentation registry)."""
        from ..core.build import build_augmentations

        return cls([Step(name, p, aug) for name, p, aug in build_augmentations(config)])

    def __len__(self) -> int:
        return len(self.steps)

    def draw(self, index: int, seed: int, epoch: int, batch: int, n: int, info: DistInfo) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's random numbers for augmentation ``index``: which of its ``n`` images get it
        ((n,) bool) and their parameters' uniforms ((n, draws) float32), both on the CPU."""
        step = self.steps[index]
        total, mine = n * info.world_size, slice(info.rank, None, info.world_size)
        chosen = _uniforms(stream_seed(seed, epoch, batch, index, CHOICE), (total,))[mine][:n] < step.p
        draws = step.draws
        if draws:
            u = _uniforms(stream_seed(seed, epoch, batch, index, PARAMS), (total, draws))[mine][:n]
        else:
            u = torch.empty(n, 0)
        return chosen, u

    def __call__(self, images: torch.Tensor, seed: int, epoch: int, batch: int, info: DistInfo,
                 inplace: bool = False) -> torch.Tensor:
        """Augment this rank's part of global batch ``batch`` of ``epoch``; ``images`` (N, 3, H, W) in [-1, 1].

        ``inplace``: the caller will not use ``images`` again, so the augmented images may be
        written into it (saves a copy of the batch); otherwise ``images`` is left as it was.
        """
        given = -1 if inplace else images.untyped_storage().data_ptr()
        n, owned = images.shape[0], inplace  # owned: ``images`` may be written in place
        for index, step in enumerate(self.steps):
            chosen, u = self.draw(index, seed, epoch, batch, n, info)
            rows = chosen.nonzero().squeeze(1)  # on the CPU: no device sync
            if rows.numel() == 0:
                continue
            if rows.numel() == n:
                images = self._apply(step, images, u)
                owned = images.untyped_storage().data_ptr() != given  # an augmentation may return its input
                continue
            on_device = rows.to(images.device, non_blocking=True)
            out = self._apply(step, images.index_select(0, on_device), u[rows])
            if not owned:
                images, owned = images.clone(), True
            images.index_copy_(0, on_device, out)
        return images

    @staticmethod
    def _apply(step: Step, images: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        out = step.aug(images, u)
        if (not isinstance(out, torch.Tensor) or out.shape != images.shape or out.dtype != images.dtype
                or out.device != images.device):
            got = f"{tuple(out.shape)} {out.dtype} {out.device}" if isinstance(out, torch.Tensor) else type(out).__name__
            raise PluginError(f"augmentation '{step.name}' must return images of the shape, dtype and device it was "
                              f"given ({tuple(images.shape)} {images.dtype} {images.device}), got {got}")
        return out


__all__ = ["Augmenter", "Step", "stream_seed"]

"""What a margin head may know about its batch beyond the cosines: the seam for heads with state or randomness.

A head that sets ``uses_batch = True`` is called as ``head(cosine, labels, norms, batch)`` with a
:class:`HeadBatch`. It gives, for every row, quantities that stay correct however the centers are
sharded or sampled and however many ranks share the batch:

- ``target_cosine`` (N, 1): the cosine to the row's own class center, also where that center is
  on another rank (sharded centers: summed from the rank that holds it);
- ``positions`` (N,): the row's place in the global batch, and ``global_rows``;
- ``global_mean(x)``: the mean of a per-row tensor over the whole global batch, the same on every
  rank (for running statistics such as CurricularFace's t or AdaFace's norms); ``by_position(x)``:
  every row's values in global order (to rank the rows of the whole batch);
- ``normal(columns)`` / ``uniform(columns)``: random numbers that are a pure function of (seed,
  epoch, batch, position in the global batch), drawn on the CPU like the augmentations' numbers,
  so a run is the same on any number of ranks and resumes bit-exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

DRAW_SALT = 0x5EED_4EAD  # keeps the heads' streams apart from the augmentations'


@dataclass
class HeadBatch:
    target_cosine: torch.Tensor
    positions: torch.Tensor
    global_rows: int
    draw_key: tuple[int, int, int] | None  # (seed, epoch, batch): set by the trainer; None outside training
    reduce_sum: Callable[[torch.Tensor], torch.Tensor]  # sums a tensor over the ranks that hold other rows

    def global_mean(self, values: torch.Tensor) -> torch.Tensor:
        """Mean over the global batch of per-row ``values`` (N, ...) -> (...), equal on every rank."""
        return self.reduce_sum(values.sum(dim=0)) / self.global_rows

    def by_position(self, values: torch.Tensor) -> torch.Tensor:
        """Per-row ``values`` (N, ...) of every row of the global batch, ordered by position, on every rank.

        For what needs the whole batch at once, e.g. ranking the rows (ElasticFace+).
        """
        full = values.new_zeros((self.global_rows, *values.shape[1:]))
        full[self.positions.to(values.device)] = values
        return self.reduce_sum(full)

    def _generator(self, stream: int) -> torch.Generator:
        if self.draw_key is None:
            raise RuntimeError("this head draws random numbers: it can only run inside facecore's training loop")
        seed, epoch, batch = self.draw_key
        mixed = (seed * 1_000_003 + epoch * 7_919 + batch * 104_729 + stream * 15_485_863 + DRAW_SALT) % 2**63
        return torch.Generator().manual_seed(mixed)

    def normal(self, columns: int = 1, stream: int = 0) -> torch.Tensor:
        """(N, columns) standard normal numbers of this batch's rows, on their device."""
        values = torch.randn(self.global_rows, columns, generator=self._generator(stream))
        return values[self.positions.cpu()].to(self.target_cosine.device)

    def uniform(self, columns: int = 1, stream: int = 0) -> torch.Tensor:
        """(N, columns) uniform numbers in [0, 1) of this batch's rows, on their device."""
        values = torch.rand(self.global_rows, columns, generator=self._generator(stream))
        return values[self.positions.cpu()].to(self.target_cosine.device)

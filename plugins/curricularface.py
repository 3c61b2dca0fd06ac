"""Margin head ``curricularface``: an ArcFace target plus negatives re-weighted by a running curriculum t.

CurricularFace (Huang et al., CVPR 2020). Each row's target logit is s*cos(theta + m) (with
ArcFace's fallback cos(theta) - m*sin(pi - m) where theta + m would pass pi). A negative cosine c
above the row's cos(theta + m) is a hard example and becomes c*(t + c), where t is a running mean
of the target cosines: early in training t is near 0 and hard negatives weigh less, later they
weigh more. The head uses the classifier's :class:`~facecore.train.head_batch.HeadBatch`, so the
per-row threshold is known also where the row's center is on another rank or not sampled, and t is
the same on every rank (it is a buffer: saved in checkpoints and restored on resume).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from facecore import hookimpl
from facecore.train.head_batch import HeadBatch
from facecore_plugins.heads import PI, SCALE, _apply_to_targets, _check, _compute_dtype, _number, _SinFromCos, _sine_floor

SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "scale": SCALE,
        "margin": _number("Additive angular margin m in radians: target logit s*cos(theta + m).", 0.5,
                          minimum=0, exclusiveMaximum=PI / 2),
        "t_alpha": _number("Weight of the current batch's mean target cosine in the running t.", 0.01,
                           exclusiveMinimum=0, maximum=1),
    },
}


def _local_batch(cosine: torch.Tensor, labels: torch.Tensor) -> HeadBatch:
    """The batch of a direct call (no classifier): these rows are the whole batch; rows labelled -1 read 0."""
    owned = (labels.reshape(-1, 1) >= 0).to(cosine.dtype)
    with torch.no_grad():
        target = cosine.gather(1, labels.reshape(-1, 1).long().clamp(min=0)) * owned
    n = cosine.shape[0]
    return HeadBatch(target, torch.arange(n), n, None, lambda t: t)


class CurricularFace(nn.Module):
    """CurricularFace: ArcFace target, hard negatives c -> c*(t + c) with t an EMA of the target cosines.

    ``t`` (buffer, 0 at start) is updated in training mode only, before it is used, from the mean
    target cosine of the global batch: t <- t_alpha * mean + (1 - t_alpha) * t. A negative is hard
    where its cosine exceeds cos(theta_y + m) of its row, computed from the row's (detached)
    target cosine; the target column itself is never re-weighted.
    """

    uses_batch = True

    def __init__(self, scale: float = 64.0, margin: float = 0.5, t_alpha: float = 0.01):
        super().__init__()
        _check((scale > 0, f"head.scale: must be > 0, got {scale}"),
               (0 <= margin < PI / 2, f"head.margin: must be in [0, pi/2) radians, got {margin}"),
               (0 < t_alpha <= 1, f"head.t_alpha: must be in (0, 1], got {t_alpha}"))
        self.scale, self.margin, self.t_alpha = float(scale), float(margin), float(t_alpha)
        self.cos_m, self.sin_m = math.cos(margin), math.sin(margin)
        self.threshold = math.cos(PI - margin)  # cos(theta) at or below this: theta + m >= pi
        self.fallback = math.sin(PI - margin) * margin
        self.register_buffer("t", torch.zeros(1))

    def _shifted(self, cosine: torch.Tensor, floor: float) -> torch.Tensor:
        """cos(theta + m) without the fallback."""
        return cosine * self.cos_m - _SinFromCos.apply(cosine, floor) * self.sin_m

    def _target(self, cosine: torch.Tensor, floor: float) -> torch.Tensor:
        return torch.where(cosine > self.threshold, self._shifted(cosine, floor), cosine - self.fallback)

    def forward(self, cosine: torch.Tensor, labels: torch.Tensor, norms: torch.Tensor | None = None,
                batch: HeadBatch | None = None) -> torch.Tensor:
        floor = _sine_floor(cosine.dtype)
        cosine = _compute_dtype(cosine)
        labels = labels.reshape(-1).long()
        if batch is None:
            batch = _local_batch(cosine, labels)
        with torch.no_grad():
            target = batch.target_cosine.reshape(-1, 1).to(cosine.dtype)
            if self.training:  # before use, as the authors do
                mean = batch.global_mean(target).reshape(1).to(self.t.dtype)
                self.t.mul_(1 - self.t_alpha).add_(self.t_alpha * mean)
            hard = cosine > self._shifted(target, floor)
            columns = torch.arange(cosine.shape[1], device=cosine.device)
            hard &= columns.unsqueeze(0) != labels.unsqueeze(1)  # a row labelled -1: every column is a negative
        t = self.t.to(cosine.dtype)
        weighted = torch.where(hard, cosine * (t + cosine), cosine)
        return _apply_to_targets(weighted, labels, lambda c: self._target(c, floor)) * self.scale

    def extra_repr(self) -> str:
        return f"scale={self.scale}, margin={self.margin}, t_alpha={self.t_alpha}"


@hookimpl
def register_heads(register):
    register("curricularface", CurricularFace, schema=SCHEMA,
             description="Adaptive curriculum: ArcFace target, hard negatives c*(t + c) with a running t (CurricularFace)")

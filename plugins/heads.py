"""Margin heads ``arcface``, ``cosface``, ``combined`` and ``adaface``: cosine logits in, scaled margin logits out.

A head is called as ``head(cosine, labels, norms)``: ``cosine`` (N, C) in [-1, 1] between
normalized embeddings and class centers, ``labels`` (N,) int64 column of each row's class
or -1 when the class is not among these columns (a shard or sample of the centers), and
``norms`` (N, 1) the embeddings' L2 norms. Only the target entry of a row gets a margin.
Half-precision input is computed in float32 and float32 logits are returned.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import nn

from facecore import hookimpl
from facecore.errors import ConfigError

PI = math.pi


def _number(description: str, default: float, **bounds: float) -> dict:
    return {"type": "number", "default": default, "description": description, **bounds}


SCALE = _number("Scale s of the logits (the radius of the hypersphere).", 64.0, exclusiveMinimum=0)

ARCFACE_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "scale": SCALE,
        "margin": _number("Additive angular margin m in radians: target logit s*cos(theta + m).", 0.5,
                          minimum=0, exclusiveMaximum=PI / 2),
    },
}
COSFACE_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "scale": SCALE,
        "margin": _number("Additive cosine margin m: target logit s*(cos(theta) - m).", 0.35, minimum=0, maximum=1),
    },
}
COMBINED_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "scale": SCALE,
        "m1": _number("Multiplicative angular margin (SphereFace): target logit s*(cos(m1*theta + m2) - m3).", 1.0,
                      minimum=1),
        "m2": _number("Additive angular margin in radians (ArcFace).", 0.5, minimum=0, exclusiveMaximum=PI / 2),
        "m3": _number("Additive cosine margin (CosFace).", 0.0, minimum=0, maximum=1),
    },
}
ADAFACE_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "scale": SCALE,
        "margin": _number("Margin m, scaled per sample by its feature-norm quality.", 0.4, minimum=0, maximum=1),
        "h": _number("Concentration h of the norm-based margin scaler.", 0.333, minimum=0),
        "t_alpha": _number("Weight of the current batch in the running mean/std of the norms.", 0.01,
                           exclusiveMinimum=0, maximum=1),
        "eps": _number("Clamp of cosines and angles away from their ends, for stability.", 1e-3,
                       exclusiveMinimum=0, maximum=0.1),
    },
}


def _check(*rules: tuple[bool, str]) -> None:
    """Raise one ConfigError listing the message of every rule whose condition is false."""
    problems = [message for ok, message in rules if not ok]
    if problems:
        raise ConfigError(problems)


def _compute_dtype(cosine: torch.Tensor) -> torch.Tensor:
    return cosine.float() if cosine.dtype in (torch.float16, torch.bfloat16) else cosine


def _apply_to_targets(cosine: torch.Tensor, labels: torch.Tensor, fn: Callable[..., torch.Tensor],
                      *extra: torch.Tensor) -> torch.Tensor:
    """``cosine`` with each row's target entry replaced by ``fn(target, *extra)``; rows labelled -1 unchanged."""
    labels = labels.reshape(-1, 1).long()
    has_target = labels >= 0
    index = labels.clamp(min=0)
    target = cosine.gather(1, index)
    new = torch.where(has_target, fn(target, *extra), target)
    return cosine.scatter(1, index, new)


def _target_mask(cosine: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(N, C) bool, True at each row's target column; rows labelled -1 have none here."""
    labels = labels.reshape(-1, 1).long()
    return torch.zeros(cosine.shape, dtype=torch.bool, device=cosine.device).scatter_(1, labels.clamp(min=0), labels >= 0)


def _sine_floor(dtype: torch.dtype) -> float:
    """sqrt(eps): the smallest nonzero sine that a cosine stored in ``dtype`` can have."""
    return math.sqrt(torch.finfo(dtype).eps)


class _SinFromCos(torch.autograd.Function):
    """sin(theta) = sqrt(1 - cos^2) with a finite derivative at cos = +-1.

    The derivative -cos/sin is exact wherever sin >= ``floor`` (``_sine_floor`` of the dtype the
    cosines came in); at cos = +-1 it takes the value of the nearest representable cosine.
    """

    @staticmethod
    def forward(ctx, cosine: torch.Tensor, floor: float) -> torch.Tensor:
        sine = torch.sqrt(torch.clamp(1.0 - cosine * cosine, min=0.0))
        ctx.save_for_backward(cosine, sine)
        ctx.floor = floor
        return sine

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        cosine, sine = ctx.saved_tensors
        return -grad * cosine / torch.clamp(sine, min=ctx.floor), None


class ArcFace(nn.Module):
    """Additive angular margin (ArcFace): target logit s*cos(theta + m).

    Where theta + m would pass pi, the target logit is s*(cos(theta) - m*sin(m)), which keeps it
    decreasing in theta.
    """

    def __init__(self, scale: float = 64.0, margin: float = 0.5):
        super().__init__()
        _check((scale > 0, f"head.scale: must be > 0, got {scale}"),
               (0 <= margin < PI / 2, f"head.margin: must be in [0, pi/2) radians, got {margin}"))
        self.scale, self.margin = float(scale), float(margin)
        self.cos_m, self.sin_m = math.cos(margin), math.sin(margin)
        self.threshold = math.cos(PI - margin)  # cos(theta) below this means theta + m > pi
        self.fallback = margin * math.sin(margin)

    def _target(self, cosine: torch.Tensor, floor: float) -> torch.Tensor:
        sine = _SinFromCos.apply(cosine, floor)
        shifted = cosine * self.cos_m - sine * self.sin_m  # cos(theta + m)
        return torch.where(cosine > self.threshold, shifted, cosine - self.fallback)

    def forward(self, cosine: torch.Tensor, labels: torch.Tensor, norms: torch.Tensor | None = None) -> torch.Tensor:
        floor = _sine_floor(cosine.dtype)
        return _apply_to_targets(_compute_dtype(cosine), labels, lambda t: self._target(t, floor)) * self.scale

    def extra_repr(self) -> str:
        return f"scale={self.scale}, margin={self.margin}"


class CosFace(nn.Module):
    """Additive cosine margin (CosFace / AM-Softmax): target logit s*(cos(theta) - m)."""

    def __init__(self, scale: float = 64.0, margin: float = 0.35):
        super().__init__()
        _check((scale > 0, f"head.scale: must be > 0, got {scale}"),
               (0 <= margin <= 1, f"head.margin: must be in [0, 1], got {margin}"))
        self.scale, self.margin = float(scale), float(margin)

    def forward(self, cosine: torch.Tensor, labels: torch.Tensor, norms: torch.Tensor | None = None) -> torch.Tensor:
        return _apply_to_targets(_compute_dtype(cosine), labels, lambda t: t - self.margin) * self.scale

    def extra_repr(self) -> str:
        return f"scale={self.scale}, margin={self.margin}"


class _CosOfScaledAngle(torch.autograd.Function):
    """cos(m1 * acos(cosine) + m2) with a finite derivative at cos = +-1.

    The derivative m1 * sin(m1*theta + m2) / sin(theta) is exact inside (-1, 1); at cos = +-1
    exactly it takes its value at ``+-inner``, the nearest cosine inside the range that the dtype
    the cosines came in can hold (the convention of ``_SinFromCos``).
    """

    @staticmethod
    def forward(ctx, cosine: torch.Tensor, m1: float, m2: float, inner: float) -> torch.Tensor:
        ctx.save_for_backward(cosine)
        ctx.m1, ctx.m2, ctx.inner = m1, m2, inner
        return torch.cos(m1 * torch.acos(cosine.clamp(-1.0, 1.0)) + m2)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (cosine,) = ctx.saved_tensors
        inside = cosine.clamp(-ctx.inner, ctx.inner)
        sine = torch.sqrt((1.0 - inside) * (1.0 + inside))
        slope = ctx.m1 * torch.sin(ctx.m1 * torch.acos(inside) + ctx.m2) / sine
        return grad * slope, None, None, None


class CombinedMargin(nn.Module):
    """Combined margin (arcface_torch's m1, m2, m3): target logit s*(cos(m1*theta + m2) - m3).

    m1 is SphereFace's multiplicative angular margin, m2 ArcFace's additive angular margin and
    m3 CosFace's additive cosine margin; (1, m, 0) is ``arcface`` and (1, 0, m) is ``cosface``,
    logit for logit. Past theta0 = (pi - m2) / m1, where m1*theta + m2 would pass pi and the
    cosine would turn back up, the target logit is s*(cos(theta) - k), the shape of
    arcface_torch's ArcFace fallback (the cosine minus a constant, so still decreasing):

    * m1 = 1 and m3 = 0 (plain ArcFace): k = m2*sin(m2), arcface_torch's constant, kept so that
      this head and ``arcface`` train identically. That fallback joins the curve with a drop of
      cos(m2) + m2*sin(m2) - 1 at theta0 (0.117 for m2 = 0.5): decreasing, not continuous.
    * every other option set: k = 1 + cos(theta0) + m3, the constant that joins the two pieces
      at theta0 (both equal -1 - m3 there), so the target is continuous and strictly decreasing
      over [0, pi]. arcface_torch has no general form to follow: it applies m1 only through its
      ArcFace branch (m1 = 1) and drops m1 and m2 whenever m3 > 0.

    With m1 = 1 the angle is added through cos/sin expansions (``_SinFromCos``), otherwise through
    ``_CosOfScaledAngle``; both keep gradients finite at cos = +-1.
    """

    def __init__(self, scale: float = 64.0, m1: float = 1.0, m2: float = 0.5, m3: float = 0.0):
        super().__init__()
        _check((scale > 0, f"head.scale: must be > 0, got {scale}"),
               (m1 >= 1, f"head.m1: must be >= 1 (1: no multiplicative margin), got {m1}"),
               (0 <= m2 < PI / 2, f"head.m2: must be in [0, pi/2) radians, got {m2}"),
               (0 <= m3 <= 1, f"head.m3: must be in [0, 1], got {m3}"))
        self.scale, self.m1, self.m2, self.m3 = float(scale), float(m1), float(m2), float(m3)
        self.cos_m, self.sin_m = math.cos(m2), math.sin(m2)
        self.threshold = math.cos((PI - self.m2) / self.m1)  # cos(theta) below this: m1*theta + m2 > pi
        if self.m1 == 1.0 and self.m3 == 0.0:
            self.fallback = self.m2 * self.sin_m
        else:
            self.fallback = 1.0 + self.threshold + self.m3

    def _target(self, cosine: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if self.m1 == 1.0:
            sine = _SinFromCos.apply(cosine, _sine_floor(dtype))
            shifted = cosine * self.cos_m - sine * self.sin_m  # cos(theta + m2)
        else:
            shifted = _CosOfScaledAngle.apply(cosine, self.m1, self.m2, 1.0 - torch.finfo(dtype).eps / 2)
        return torch.where(cosine > self.threshold, shifted - self.m3, cosine - self.fallback)

    def forward(self, cosine: torch.Tensor, labels: torch.Tensor, norms: torch.Tensor | None = None) -> torch.Tensor:
        dtype = cosine.dtype
        return _apply_to_targets(_compute_dtype(cosine), labels, lambda t: self._target(t, dtype)) * self.scale

    def extra_repr(self) -> str:
        return f"scale={self.scale}, m1={self.m1}, m2={self.m2}, m3={self.m3}"


class AdaFace(nn.Module):
    """AdaFace: a margin that adapts to image quality, read from the feature norm.

    The norms (clipped to [0.001, 100], no gradient) are standardised by running batch
    statistics (buffers ``batch_mean``/``batch_std``, updated by EMA in training mode only)
    into a scaler in [-1, 1]; the target angle gets -m*scaler and the target cosine
    -(m + m*scaler). High-norm (good) images get an ArcFace-like margin, low-norm ones a
    CosFace-like one.
    """

    uses_batch = True  # the statistics are of the global batch, also when DDP splits it over ranks

    def __init__(self, scale: float = 64.0, margin: float = 0.4, h: float = 0.333, t_alpha: float = 0.01,
                 eps: float = 1e-3):
        super().__init__()
        _check((scale > 0, f"head.scale: must be > 0, got {scale}"),
               (0 <= margin <= 1, f"head.margin: must be in [0, 1], got {margin}"),
               (h >= 0, f"head.h: must be >= 0, got {h}"),
               (0 < t_alpha <= 1, f"head.t_alpha: must be in (0, 1], got {t_alpha}"),
               (0 < eps <= 0.1, f"head.eps: must be in (0, 0.1], got {eps}"))
        self.scale, self.margin, self.h, self.t_alpha, self.eps = (float(v) for v in (scale, margin, h, t_alpha, eps))
        self.register_buffer("batch_mean", torch.full((1,), 20.0))
        self.register_buffer("batch_std", torch.full((1,), 100.0))

    @torch.no_grad()
    def _update_statistics(self, norms: torch.Tensor, batch: Any = None) -> None:
        a = self.t_alpha
        if batch is None or batch.global_rows == norms.shape[0]:  # these rows are the whole batch
            mean, n = norms.mean(), norms.numel()
            std = norms.std() if n > 1 else None
        else:  # this rank's part of a batch that DDP split: mean and unbiased std from global sums
            n = batch.global_rows
            mean = batch.global_mean(norms).reshape(())
            square = batch.global_mean(norms * norms).reshape(())
            std = ((square - mean * mean).clamp(min=0) * n / (n - 1)).sqrt() if n > 1 else None
        self.batch_mean.mul_(1 - a).add_(a * mean.to(self.batch_mean.dtype))
        if std is not None:  # the unbiased std of one sample is undefined
            self.batch_std.mul_(1 - a).add_(a * std.to(self.batch_std.dtype))

    def _target(self, cosine: torch.Tensor, scaler: torch.Tensor) -> torch.Tensor:
        theta = torch.acos(cosine) - self.margin * scaler
        return torch.cos(theta.clamp(self.eps, PI - self.eps)) - (self.margin + self.margin * scaler)

    def forward(self, cosine: torch.Tensor, labels: torch.Tensor, norms: torch.Tensor, batch: Any = None) -> torch.Tensor:
        cosine = _compute_dtype(cosine).clamp(-1 + self.eps, 1 - self.eps)
        safe = norms.detach().reshape(-1, 1).to(cosine.dtype).clamp(0.001, 100)
        if self.training:
            self._update_statistics(safe, batch)
        mean, std = self.batch_mean.to(cosine.dtype), self.batch_std.to(cosine.dtype)
        scaler = (self.h * (safe - mean) / (std + self.eps)).clamp(-1, 1)
        # Non-target angles need no clip: the cosine clamp already keeps them inside [eps, pi - eps].
        return _apply_to_targets(cosine, labels, self._target, scaler) * self.scale

    def extra_repr(self) -> str:
        return f"scale={self.scale}, margin={self.margin}, h={self.h}, t_alpha={self.t_alpha}, eps={self.eps}"


@hookimpl
def register_heads(register):
    register("arcface", ArcFace, schema=ARCFACE_SCHEMA, description="Additive angular margin: s*cos(theta + m)")
    register("cosface", CosFace, schema=COSFACE_SCHEMA, description="Additive cosine margin: s*(cos(theta) - m)")
    register("combined", CombinedMargin, schema=COMBINED_SCHEMA,
             description="Combined margin (SphereFace/ArcFace/CosFace): s*(cos(m1*theta + m2) - m3)")
    register("adaface", AdaFace, schema=ADAFACE_SCHEMA,
             description="Quality-adaptive margin driven by feature norms (AdaFace)")

"""Margin head ``magface``: an angular margin that grows with the feature norm, plus a norm regulariser.

MagFace (Meng et al., CVPR 2021). The embedding's norm a, clipped to [l_a, u_a], sets the row's
margin m(a) = (u_m - l_m) / (u_a - l_a) * (a - l_a) + l_m, and the target logit is s*cos(theta + m(a))
where cos(theta) > 0, s*cos(theta) elsewhere (the authors' default "easy margin"). The margin is
differentiable in the norm, as in the authors' code. The loss gets a second term,
``magface_g`` = lambda_g * mean(g(a)) with g(a) = a / u_a^2 + 1 / a on the clipped norms, which
pulls the norms up towards u_a so that the norm ranks image quality.
"""

from __future__ import annotations

import torch
from torch import nn

from facecore import hookimpl
from facecore_plugins.heads import PI, SCALE, _apply_to_targets, _check, _compute_dtype, _number, _SinFromCos, _sine_floor

SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "scale": SCALE,
        "l_a": _number("Lower end l_a of the feature-norm range; smaller norms are clipped to it.", 10.0,
                       exclusiveMinimum=0),
        "u_a": _number("Upper end u_a of the feature-norm range; larger norms are clipped to it.", 110.0,
                       exclusiveMinimum=0),
        "l_m": _number("Margin l_m (radians) at norm l_a.", 0.45, minimum=0, exclusiveMaximum=PI / 2),
        "u_m": _number("Margin u_m (radians) at norm u_a.", 0.8, minimum=0, exclusiveMaximum=PI / 2),
        "lambda_g": _number("Weight lambda_g of the norm regulariser g(a) = a/u_a^2 + 1/a (loss term magface_g).",
                            20.0, minimum=0),
    },
}


class MagFace(nn.Module):
    """MagFace: target s*cos(theta + m(a)) where cos(theta) > 0, with m linear in the clipped norm a."""

    def __init__(self, scale: float = 64.0, l_a: float = 10.0, u_a: float = 110.0, l_m: float = 0.45,
                 u_m: float = 0.8, lambda_g: float = 20.0):
        super().__init__()
        _check((scale > 0, f"head.scale: must be > 0, got {scale}"),
               (l_a > 0, f"head.l_a: must be > 0, got {l_a}"),
               (u_a > l_a, f"head.u_a: must be > head.l_a ({l_a}), got {u_a}"),
               (0 <= l_m < PI / 2, f"head.l_m: must be in [0, pi/2) radians, got {l_m}"),
               (l_m <= u_m < PI / 2, f"head.u_m: must be in [head.l_m ({l_m}), pi/2) radians, got {u_m}"),
               (lambda_g >= 0, f"head.lambda_g: must be >= 0, got {lambda_g}"))
        self.scale, self.l_a, self.u_a, self.l_m, self.u_m, self.lambda_g = (
            float(v) for v in (scale, l_a, u_a, l_m, u_m, lambda_g))

    def _clip(self, norms: torch.Tensor) -> torch.Tensor:
        return norms.reshape(-1, 1).clamp(self.l_a, self.u_a)

    def margin_of(self, norms: torch.Tensor) -> torch.Tensor:
        """m(a) (N, 1) of the norms (N, 1) after clipping to [l_a, u_a]."""
        return (self.u_m - self.l_m) / (self.u_a - self.l_a) * (self._clip(norms) - self.l_a) + self.l_m

    @staticmethod
    def _target(cosine: torch.Tensor, margin: torch.Tensor, floor: float) -> torch.Tensor:
        shifted = cosine * torch.cos(margin) - _SinFromCos.apply(cosine, floor) * torch.sin(margin)
        return torch.where(cosine > 0, shifted, cosine)  # cos(theta) > 0: theta + m < pi, no fallback needed

    def forward(self, cosine: torch.Tensor, labels: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
        floor = _sine_floor(cosine.dtype)
        cosine = _compute_dtype(cosine)
        margin = self.margin_of(norms.to(cosine.dtype))
        return _apply_to_targets(cosine, labels, lambda c, m: self._target(c, m, floor), margin) * self.scale

    def extra_terms(self, norms: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"magface_g": lambda_g * mean(a / u_a^2 + 1 / a)}`` over the clipped norms a (float32)."""
        a = self._clip(norms.float())
        return {"magface_g": self.lambda_g * (a / self.u_a**2 + 1.0 / a).mean()}

    def extra_repr(self) -> str:
        return (f"scale={self.scale}, l_a={self.l_a}, u_a={self.u_a}, l_m={self.l_m}, u_m={self.u_m}, "
                f"lambda_g={self.lambda_g}")


@hookimpl
def register_heads(register):
    register("magface", MagFace, schema=SCHEMA,
             description="Feature-norm-aware margin m(a) and norm regulariser g(a) (MagFace)")

"""Head ``sphereface2``: SphereFace2-C, a binary (one-vs-all) loss over every class instead of a softmax.

SphereFace2 (Wen et al., ICLR 2022), the ``C`` variant of the authors' opensphere code. Every (row,
class) pair is its own binary problem on the logit r*(g(c) -+ m) + b, with the similarity adjustment
g(c) = 2*((c + 1)/2)^t - 1, margin m (subtracted for the row's own class, added for the others) and one
learnable bias b. As in the authors' code g and the margin enter through a detached shift, so the
logit's gradient with respect to the cosine is r (not r*g'(c)). Positives weigh lambda, negatives
1 - lambda, and the whole is scaled by lw/r:

    loss = lw/r * mean over rows of [lambda * log(1 + e^-z_y) + (1 - lambda) * sum_{j != y} log(1 + e^z_j)]

(the authors write it as a weighted BCE averaged over N*C elements with weight lw*C/r, the same number).
The head returns the bracket's elements (``elementwise_loss``), so the sum over classes splits over
shards of the centers. b starts at the authors' closed form, which zeroes the initial loss's gradient
in b for C classes with every cosine 0; facecore takes C as the number of classes each row's loss
covers: all of them, or the ceil(sample_rate * C) of a Partial FC sample (the authors do not sample).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from facecore import hookimpl
from facecore_plugins.heads import _check, _compute_dtype, _number, _target_mask

SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "scale": _number("Scale r of the logits r*(g(cos) -+ m) + b (the authors' r).", 40.0, exclusiveMinimum=0),
        "margin": _number("Margin m on the adjusted cosine: - m for the row's class, + m for the others.", 0.4,
                          minimum=0, maximum=1),
        "t": _number("Exponent t of the similarity adjustment g(c) = 2*((c + 1)/2)^t - 1.", 3.0, exclusiveMinimum=0),
        "lambda_pos": _number("Weight lambda of the positive terms; the negatives weigh 1 - lambda (the authors' alpha).",
                              0.7, exclusiveMinimum=0, exclusiveMaximum=1),
        "loss_weight": _number("Loss weight lw: the loss is scaled by lw / r.", 50.0, exclusiveMinimum=0),
    },
}


def initial_bias(classes: int, scale: float, margin: float, t: float, lambda_pos: float) -> float:
    """The authors' closed-form initial b for ``classes`` classes per row (SphereFace2-C).

    It zeroes the gradient in b of the loss with every cosine 0: with z = lambda / ((1 - lambda)(C - 1))
    and the logits a_p + b, a_n + b there, b = log(2z) - a_n - log(1 - z + sqrt((1 - z)^2 + 4z e^(a_p - a_n))).
    For z > 1 (3 classes or fewer at lambda 0.7) that form cancels; the same root is then taken as
    log((z - 1 + sqrt(...)) / 2) - a_p, which does not.
    """
    z = lambda_pos / ((1.0 - lambda_pos) * (classes - 1.0))
    base = 2.0 * 0.5**t - 1.0  # g(0)
    a_pos, a_neg = scale * (base - margin), scale * (base + margin)
    root = math.sqrt((1.0 - z) ** 2 + 4.0 * z * math.exp(a_pos - a_neg))
    if z > 1.0:
        return math.log((z - 1.0 + root) / 2.0) - a_pos
    return math.log(2.0 * z) - a_neg - math.log(1.0 - z + root)


class SphereFace2(nn.Module):
    """SphereFace2-C: per-class binary losses on r*(g(c) -+ m) + b; returns (N, C) loss elements."""

    elementwise_loss = True

    def __init__(self, scale: float = 40.0, margin: float = 0.4, t: float = 3.0, lambda_pos: float = 0.7,
                 loss_weight: float = 50.0):
        super().__init__()
        _check((scale > 0, f"head.scale: must be > 0, got {scale}"),
               (0 <= margin <= 1, f"head.margin: must be in [0, 1], got {margin}"),
               (t > 0, f"head.t: must be > 0, got {t}"),
               (0 < lambda_pos < 1, f"head.lambda_pos: must be in (0, 1), got {lambda_pos}"),
               (loss_weight > 0, f"head.loss_weight: must be > 0, got {loss_weight}"))
        self.scale, self.margin, self.t, self.lambda_pos, self.loss_weight = (
            float(v) for v in (scale, margin, t, lambda_pos, loss_weight))
        self.bias = nn.Parameter(torch.zeros(1))
        self.classes: int | None = None  # per row's loss; set by configure

    def configure(self, num_classes: int, sample_rate: float = 1.0) -> None:
        """Set b to the closed form for the classes each row's loss covers (all, or a Partial FC sample's)."""
        self.classes = min(num_classes, max(2, math.ceil(sample_rate * num_classes)))
        with torch.no_grad():
            self.bias.fill_(initial_bias(self.classes, self.scale, self.margin, self.t, self.lambda_pos))

    def forward(self, cosine: torch.Tensor, labels: torch.Tensor, norms: torch.Tensor | None = None) -> torch.Tensor:
        if self.classes is None:
            raise RuntimeError("sphereface2: call configure(num_classes, sample_rate) first (facecore's classifier does)")
        cosine = _compute_dtype(cosine)
        positive = _target_mask(cosine, labels)
        with torch.no_grad():  # g and the margin: a shift without gradient, as in the authors' code
            g = 2.0 * ((cosine + 1.0) / 2.0).pow(self.t) - 1.0
            shift = torch.where(positive, g - self.margin, g + self.margin) - cosine
        z = self.scale * (cosine + shift) + self.bias.to(cosine.dtype)
        weight = torch.full_like(cosine, 1.0 - self.lambda_pos).masked_fill_(positive, self.lambda_pos)
        return F.softplus(torch.where(positive, -z, z)) * weight * (self.loss_weight / self.scale)

    def extra_repr(self) -> str:
        return (f"scale={self.scale}, margin={self.margin}, t={self.t}, lambda_pos={self.lambda_pos}, "
                f"loss_weight={self.loss_weight}, classes={self.classes}")


@hookimpl
def register_heads(register):
    register("sphereface2", SphereFace2, schema=SCHEMA,
             description="SphereFace2-C: one-vs-all binary loss per class with g(c) = 2((c+1)/2)^t - 1 and a learned bias")

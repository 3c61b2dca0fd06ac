"""Head ``uniface``: the Unified Cross-Entropy (UCE) loss, one learned threshold for every class.

UniFace (Zhou et al., ICCV 2023), as in the authors' ``Unified_Cross_Entropy_Loss``. With one
learnable bias b (the unified threshold), each row's own class adds log(1 + e^-z_p) with
z_p = s*(c - m) - b, and every other class lambda * log(1 + e^z_n) with z_n = s*c - b; both logits are
clamped to [-s, s] first (no gradient past the clamp), and the loss is the sum over classes averaged
over rows. The head returns those elements (``elementwise_loss``), so the sum over classes splits over
shards of the centers.

The authors' r is the share of classes sampled per step (their train.py draws int(C*r) classes, the
batch's own always among them): in facecore that is ``head.sample_rate`` (Partial FC), and b starts at
their log(10 * C * r), with r = head.sample_rate. Their loss over a sample is the sum over the sampled
classes, which is what facecore computes on the classes it samples.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from facecore import hookimpl
from facecore_plugins.heads import SCALE, _check, _compute_dtype, _number, _target_mask

SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "scale": SCALE,
        "margin": _number("Cosine margin m of the positive logit s*(cos - m) - b.", 0.4, minimum=0, maximum=1),
        "lambda_neg": _number("Weight lambda of the negative terms (the authors' l).", 1.0, exclusiveMinimum=0),
    },
}


class UniFace(nn.Module):
    """UCE loss: log(1 + e^-(s(c_y - m) - b)) + lambda * sum_j log(1 + e^(s c_j - b)); returns (N, C) elements."""

    elementwise_loss = True

    def __init__(self, scale: float = 64.0, margin: float = 0.4, lambda_neg: float = 1.0):
        super().__init__()
        _check((scale > 0, f"head.scale: must be > 0, got {scale}"),
               (0 <= margin <= 1, f"head.margin: must be in [0, 1], got {margin}"),
               (lambda_neg > 0, f"head.lambda_neg: must be > 0, got {lambda_neg}"))
        self.scale, self.margin, self.lambda_neg = float(scale), float(margin), float(lambda_neg)
        self.bias = nn.Parameter(torch.zeros(1))
        self.sampled_classes: float | None = None  # C * r; set by configure

    def configure(self, num_classes: int, sample_rate: float = 1.0) -> None:
        """b = log(10 * C * r), the authors' start, with r the Partial FC sample rate."""
        self.sampled_classes = num_classes * sample_rate
        with torch.no_grad():
            self.bias.fill_(math.log(10.0 * self.sampled_classes))

    def forward(self, cosine: torch.Tensor, labels: torch.Tensor, norms: torch.Tensor | None = None) -> torch.Tensor:
        if self.sampled_classes is None:
            raise RuntimeError("uniface: call configure(num_classes, sample_rate) first (facecore's classifier does)")
        cosine = _compute_dtype(cosine)
        positive = _target_mask(cosine, labels)
        s = self.scale
        z = (s * (cosine - self.margin * positive) - self.bias.to(cosine.dtype)).clamp(-s, s)
        return torch.where(positive, F.softplus(-z), self.lambda_neg * F.softplus(z))

    def extra_repr(self) -> str:
        return f"scale={self.scale}, margin={self.margin}, lambda_neg={self.lambda_neg}"


@hookimpl
def register_heads(register):
    register("uniface", UniFace, schema=SCHEMA,
             description="UniFace: unified cross-entropy, per-class log(1 + e^...) terms against one learned threshold b")

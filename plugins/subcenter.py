"""Margin head ``subcenter_arcface``: sub-center ArcFace (Deng et al., ECCV 2020).

Each class has K centers (``k``, default 3). The classifier holds them (the head sets
``centers_per_class``) and gives the head each class's cosine as the largest of its K centers'
(max pooling over sub-centers); the ArcFace margin is then applied to the target class's cosine:
target logit ``s*cos(theta + m)`` with theta the angle to the nearest sub-center of the class.
Only that nearest sub-center gets the target's gradient, so noisy samples can gather around a
non-dominant sub-center instead of pulling the dominant one.

The margin is ``arcface``'s (``facecore_plugins.heads.ArcFace``), including its fallback where
theta + m would pass pi. The authors' later step that drops non-dominant sub-centers and
high-confidence noisy samples is not part of this head.
"""

from __future__ import annotations

import torch

from facecore import hookimpl
from facecore.errors import ConfigError
from facecore_plugins.heads import ARCFACE_SCHEMA, ArcFace

SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "k": {"type": "integer", "default": 3, "minimum": 1,
              "description": "Sub-centers per class K; the classifier holds num_classes * K centers."},
        **ARCFACE_SCHEMA["properties"],
    },
}


class SubCenterArcFace(ArcFace):
    """ArcFace on the max-over-K class cosine; the classifier holds K centers per class."""

    def __init__(self, k: int = 3, scale: float = 64.0, margin: float = 0.5):
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ConfigError([f"head.k: the number of sub-centers per class must be an integer >= 1, got {k!r}"])
        super().__init__(scale=scale, margin=margin)
        self.centers_per_class = k

    def forward(self, cosine: torch.Tensor, labels: torch.Tensor, norms: torch.Tensor | None = None) -> torch.Tensor:
        """``cosine`` (N, C): each class's max over its K sub-centers (taken by the classifier)."""
        return super().forward(cosine, labels, norms)

    def extra_repr(self) -> str:
        return f"k={self.centers_per_class}, {super().extra_repr()}"


@hookimpl
def register_heads(register):
    register("subcenter_arcface", SubCenterArcFace, schema=SCHEMA,
             description="Sub-center ArcFace: K centers per class, ArcFace margin on the nearest sub-center's cosine")

"""Margin head ``elasticface``: ElasticFace (Boutros et al., CVPR-W 2022), a per-sample margin drawn from N(m, sigma).

Each training step every row gets its own margin ``m_i = m + sigma * z_i``, with ``z_i`` from
:meth:`HeadBatch.normal`, a pure function of (seed, epoch, batch, global position): a run is the same on
any number of ranks and resumes bit-exactly; torch's global RNG is never touched.

- ``kind: arc`` (ElasticFace-Arc): target logit ``s*cos(theta + m_i)``. Where ``theta + m_i`` would pass
  pi the target is ``s*(cos(theta) - m_i*sin(m_i))``, as ``arcface`` does, so the target logit keeps
  decreasing in theta (the authors' code takes ``cos(theta + m_i)`` as is, which rises again past pi).
  Drawn angular margins are clamped to [0, pi/2]: a negative angle would reward the target near theta = 0.
- ``kind: cos`` (ElasticFace-Cos): target logit ``s*(cos(theta) - m_i)``; drawn margins are used as drawn.
- ``plus: true`` (ElasticFace+): the global batch's drawn margins are sorted and handed out by target
  cosine, the smallest margin to the row closest to its center (largest target cosine), the largest to
  the row farthest from it; ties go by global position. The authors sort over each GPU's own batch; here
  the sort is over the whole global batch, so 1 and N processes train the same model.

Outside training (eval mode) or when called without a :class:`HeadBatch`, every row gets the mean margin
m, so evaluation is deterministic. Half-precision cosines are computed in float32; float32 logits out.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from facecore import hookimpl
from facecore.errors import ConfigError
from facecore.train.head_batch import HeadBatch
from facecore_plugins.heads import SCALE, _apply_to_targets, _check, _compute_dtype, _SinFromCos, _sine_floor

PI = math.pi
KINDS = ("arc", "cos")
DEFAULT_MARGIN = {"arc": 0.5, "cos": 0.35}
MARGIN_RANGE = {"arc": "[0, pi/2) radians", "cos": "[0, 1]"}

SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "scale": SCALE,
        "margin": {"type": ["number", "null"], "default": None, "minimum": 0,
                   "description": "Mean m of the per-sample margin; null: 0.5 rad for kind arc, 0.35 for kind cos."},
        "sigma": {"type": "number", "default": 0.05, "minimum": 0,
                  "description": "Standard deviation of the per-sample margin, drawn afresh every step "
                                 "(the authors used 0.05; 0.0175 (arc) and 0.02 (cos) with plus)."},
        "kind": {"type": "string", "enum": list(KINDS), "default": "arc",
                 "description": "arc: s*cos(theta + m_i) (ElasticFace-Arc); cos: s*(cos(theta) - m_i) (ElasticFace-Cos)."},
        "plus": {"type": "boolean", "default": False,
                 "description": "ElasticFace+: sort the batch's margins so rows closer to their center get smaller ones."},
    },
}


def _margin_in_range(kind: str, margin: float) -> bool:
    return 0 <= margin < PI / 2 if kind == "arc" else 0 <= margin <= 1


class ElasticFace(nn.Module):
    """ElasticFace: ArcFace or CosFace with a margin drawn per sample and step from N(m, sigma)."""

    uses_batch = True

    def __init__(self, scale: float = 64.0, margin: float | None = None, sigma: float = 0.05, kind: str = "arc",
                 plus: bool = False):
        super().__init__()
        problems = [(kind in KINDS, f"head.kind: must be one of {', '.join(KINDS)}, got {kind!r}"),
                    (isinstance(plus, bool), f"head.plus: must be true or false, got {plus!r}"),
                    (scale > 0, f"head.scale: must be > 0, got {scale}"),
                    (sigma >= 0 and math.isfinite(sigma), f"head.sigma: must be >= 0, got {sigma}")]
        if kind in KINDS and margin is not None:
            problems.append((_margin_in_range(kind, margin),
                             f"head.margin: must be in {MARGIN_RANGE[kind]} for kind {kind}, got {margin}"))
        _check(*problems)
        self.kind, self.plus = kind, plus
        self.scale, self.sigma = float(scale), float(sigma)
        self.margin = float(DEFAULT_MARGIN[kind] if margin is None else margin)

    # -- the margins ------------------------------------------------------------------------------
    def margins(self, batch: HeadBatch) -> torch.Tensor:
        """(N, 1) float64 margins of this batch's rows in training mode (before the arc clamp)."""
        z = batch.normal(1).double()
        if self.plus:
            z = self._sorted_by_target(batch, z)
        return self.margin + self.sigma * z

    def _sorted_by_target(self, batch: HeadBatch, z: torch.Tensor) -> torch.Tensor:
        """The draws of the global batch handed out by target cosine: the largest cosine gets the smallest draw.

        Every row's target cosine and draw come from ``batch.by_position`` (each rank fills its own positions,
        zeros elsewhere, summed over the ranks: exact); where the rows here already are the whole global batch
        (one process, sharded centers) nothing is exchanged. A count column checks that the rows partition it.
        """
        rows = batch.global_rows
        positions = batch.positions.to(z.device)
        mine = torch.cat([batch.target_cosine.detach().double().reshape(-1, 1).to(z.device), z,
                          torch.ones_like(z)], dim=1)
        table = batch.by_position(mine)
        if not bool((table[:, 2] == 1).all()):
            raise ConfigError(["head.plus: ElasticFace+ sorts the margins over the global batch, but these rows "
                               f"({positions.numel()} of {rows}) and those of the other ranks do not cover every "
                               "position exactly once; use plus: false with this caller"])
        order = torch.sort(table[:, 0], descending=True, stable=True).indices  # closest to the center first
        handed = torch.empty_like(table[:, 1])
        handed[order] = torch.sort(table[:, 1]).values  # ... gets the smallest draw
        return handed[positions].reshape(-1, 1)

    # -- the logits -------------------------------------------------------------------------------
    def forward(self, cosine: torch.Tensor, labels: torch.Tensor, norms: torch.Tensor | None = None,
                batch: HeadBatch | None = None) -> torch.Tensor:
        floor = _sine_floor(cosine.dtype)
        cosine = _compute_dtype(cosine)
        if self.training and batch is not None:
            margin = self.margins(batch).to(cosine.device)
        else:  # eval mode, or a direct call without a HeadBatch: the mean margin
            margin = torch.full((cosine.shape[0], 1), self.margin, dtype=torch.float64, device=cosine.device)
        if self.kind == "cos":
            return _apply_to_targets(cosine, labels, lambda t, m: t - m, margin.to(cosine.dtype)) * self.scale
        margin = margin.clamp(0.0, PI / 2)
        # per-row constants in float64, rounded once to the compute dtype (as arcface's Python floats are)
        constants = torch.cat([torch.cos(margin), torch.sin(margin), torch.cos(PI - margin),
                               margin * torch.sin(margin)], dim=1).to(cosine.dtype)
        return _apply_to_targets(cosine, labels, lambda t, c: self._arc_target(t, c, floor), constants) * self.scale

    @staticmethod
    def _arc_target(cosine: torch.Tensor, constants: torch.Tensor, floor: float) -> torch.Tensor:
        cos_m, sin_m, threshold, fallback = constants.unbind(1)
        cos_m, sin_m, threshold, fallback = (c.unsqueeze(1) for c in (cos_m, sin_m, threshold, fallback))
        sine = _SinFromCos.apply(cosine, floor)
        shifted = cosine * cos_m - sine * sin_m  # cos(theta + m_i)
        return torch.where(cosine > threshold, shifted, cosine - fallback)  # theta + m_i past pi: keep decreasing

    def extra_repr(self) -> str:
        return f"kind={self.kind}, scale={self.scale}, margin={self.margin}, sigma={self.sigma}, plus={self.plus}"


@hookimpl
def register_heads(register):
    register("elasticface", ElasticFace, schema=SCHEMA,
             description="Elastic margin (ElasticFace): per-sample margin from N(m, sigma), arc or cos, optional + sorting")

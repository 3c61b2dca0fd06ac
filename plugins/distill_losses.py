"""Distillation losses (``training.distill.loss``): the student's embeddings matched to a teacher's.

- ``embedding``: each image's student embedding pulled towards the teacher's (cosine distance, or
  the Euclidean distance of the unit vectors), through a learned linear projection when the two
  embedding sizes differ (the projection trains with the student and is saved in the checkpoint).
- ``relational``: the batch's pairwise cosine similarities of the student matched to the teacher's
  (mean squared difference over the pairs), which needs no projection: only the geometry of the
  batch is transferred, not the coordinates.

Both get the whole global batch (facecore gathers it from every rank), so the relational loss
compares every pair of the global batch and 2 ranks train what 1 process trains.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from facecore import hookimpl

EPS = 1e-12  # inside the square root of a distance: a finite gradient where student and teacher agree

EMBEDDING_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "metric": {
            "enum": ["cosine", "l2"],
            "default": "cosine",
            "description": "cosine: 1 - cos(student, teacher); l2: the Euclidean distance of the two unit vectors "
                           "(its square would be 2 x the cosine loss; unsquared, its gradient does not fade as they agree).",
        },
    },
}

RELATIONAL_SCHEMA = {"type": "object", "additionalProperties": False, "properties": {}}


class EmbeddingMatch(nn.Module):
    """Mean distance between each normalized student embedding (projected when the sizes differ) and the teacher's."""

    def __init__(self, student_size: int, teacher_size: int, metric: str = "cosine"):
        super().__init__()
        self.metric = metric
        self.projection = nn.Linear(student_size, teacher_size, bias=False) if student_size != teacher_size else None

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        if self.projection is not None:
            student = self.projection(student)
        s, t = F.normalize(student, dim=1), F.normalize(teacher, dim=1)
        if self.metric == "cosine":
            return (1.0 - (s * t).sum(dim=1)).mean()
        return ((s - t).pow(2).sum(dim=1) + EPS).sqrt().mean()


class RelationalMatch(nn.Module):
    """Mean squared difference of the student's and the teacher's pairwise cosine similarities (off the diagonal)."""

    def __init__(self, student_size: int, teacher_size: int):
        super().__init__()

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        s, t = F.normalize(student, dim=1), F.normalize(teacher, dim=1)
        n = s.shape[0]
        diff = (s @ s.T - t @ t.T).pow(2)
        diagonal = torch.eye(n, dtype=torch.bool, device=diff.device)  # 1 = 1 for both: no information
        return diff.masked_fill(diagonal, 0.0).sum() / max(n * (n - 1), 1)


def embedding(student_size: int, teacher_size: int, metric: str = "cosine") -> EmbeddingMatch:
    return EmbeddingMatch(student_size, teacher_size, metric)


def relational(student_size: int, teacher_size: int) -> RelationalMatch:
    return RelationalMatch(student_size, teacher_size)


@hookimpl
def register_distill_losses(register):
    register("embedding", embedding, schema=EMBEDDING_SCHEMA,
             description="each student embedding matched to the teacher's (cosine or l2; a learned projection "
                         "when the sizes differ)")
    register("relational", relational, schema=RELATIONAL_SCHEMA,
             description="the batch's pairwise cosine similarities of the student matched to the teacher's")

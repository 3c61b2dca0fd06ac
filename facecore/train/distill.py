"""Knowledge distillation (``training.distill``): a frozen teacher and the loss terms that pull the student to it.

The teacher is any file ``model.pretrained`` reads, built from its own backbone section, frozen
(eval mode, no gradients) and run under ``no_grad`` on the batch the student sees, after
augmentation and under the trainer's autocast. The ``training.distill.loss`` plugins turn the two
embeddings into named loss terms beside the margin loss, each weighted, all ramped by
``warmup_steps``. Every loss sees the whole global batch in one process's order (gathered from the
ranks), so 2 ranks train what 1 process trains, the relational loss included. While the backbone is
frozen (``training.freeze_backbone_epochs``) nothing is distilled and the teacher is not run.

Checkpoints hold the losses' own parameters (a projection between the embedding sizes), the
teacher's path and a fingerprint of its tensors, never the teacher: ``--resume`` refuses a teacher
file whose tensors changed.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from ..core.build import build_slot, slot_entries
from ..core.checkpoint import load_checkpoint
from ..core.pretrained import load_backbone
from ..core.runtime import DistInfo
from ..errors import CheckpointError
from .classifier import _gather_padded, _gather_sizes

SLOT = "training.distill.loss"
TEACHER_SLOT = "training.distill.backbone.type"


def tensors_fingerprint(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 of a state dict's names, dtypes, shapes and bytes: the same tensors give the same text, however saved."""
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().cpu().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@dataclass
class Teacher:
    """The frozen teacher network, the file it came from and the fingerprint of its weights."""

    module: nn.Module
    path: Path
    name: str
    embedding_size: int
    fingerprint: str
    source: str

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.module(images)


def load_teacher(config: dict, device: torch.device) -> Teacher:
    """Build the teacher from ``training.distill.backbone`` and load ``training.distill.teacher`` into it, strictly.

    A missing file, or one that does not fit the section, is one CheckpointError naming the file.
    The teacher is built under a forked RNG, so the student's training draws what it would without one.
    """
    section = config["training"]["distill"]
    path = Path(section["teacher"])
    if not path.is_file():
        raise CheckpointError(f"training.distill.teacher: {path} not found (give the teacher's checkpoint or state dict)")
    name = section["backbone"]["type"]
    size = section["backbone"]["embedding_size"] or config["model"]["embedding_size"]
    with torch.random.fork_rng(devices=[]):
        module = build_slot(config, TEACHER_SLOT, embedding_size=size)[0][1]
    try:
        report = load_backbone(module, load_checkpoint(path), path, name)
    except CheckpointError as exc:
        raise CheckpointError(f"training.distill.teacher: {exc} (the teacher is built from training.distill.backbone, "
                              f"type '{name}', embedding_size {size})") from None
    module.requires_grad_(False)
    module.eval()
    fingerprint = tensors_fingerprint(module.state_dict())
    module = module.to(device)
    if device.type == "cuda":
        module = module.to(memory_format=torch.channels_last)
    return Teacher(module, path, name, size, fingerprint, report.source)


class _AllRows(torch.autograd.Function):
    """All-gather rows (rank-major). Every rank computes the same loss from them, and DDP averages the
    gradients over the ranks: the backward keeps this rank's rows, times the world size, without communicating."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, sizes: list[int], rank: int, group: Any) -> torch.Tensor:
        ctx.start, ctx.count, ctx.world = sum(sizes[:rank]), sizes[rank], len(sizes)
        return _gather_padded(tensor.contiguous(), sizes, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad[ctx.start:ctx.start + ctx.count] * ctx.world, None, None, None


class GlobalBatch:
    """The student's and the teacher's embeddings of every rank, in the order one process's batch has them.

    Rank r's i-th row is position ``i * world + r`` of the global batch (DistributedSampler's order).
    The batch sizes are host numbers, exchanged over gloo on the CPU (a group of its own under NCCL).
    """

    def __init__(self, info: DistInfo):
        self.rank, self.world = info.rank, info.world_size
        self.size_group = None
        if self.world > 1 and dist.get_backend() != "gloo":
            self.size_group = dist.new_group(backend="gloo")  # a collective: every rank builds it

    def __call__(self, student: torch.Tensor, teacher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.world == 1:
            return student, teacher
        sizes = _gather_sizes(student.shape[0], torch.device("cpu"), self.size_group)
        both = _AllRows.apply(torch.cat([student, teacher], dim=1), sizes, self.rank, None)  # the default group
        positions = torch.cat([torch.arange(n) * self.world + r for r, n in enumerate(sizes)])
        both = both.index_select(0, positions.argsort().to(both.device))
        return both[:, :student.shape[1]], both[:, student.shape[1]:]


class DistillTerms(nn.Module):
    """The ``training.distill.loss`` plugins as named loss terms ``distill_<name>``, weighted and ramped.

    ``forward(student, teacher)`` takes this rank's embeddings and returns the terms of the global batch.
    ``state`` is the trainer's TrainState, read for the optimizer step (the ramp).
    """

    def __init__(self, losses: list[tuple[str, float, nn.Module]], weight: float, warmup_steps: int, state: Any,
                 gather: GlobalBatch):
        super().__init__()
        self.names = [name for name, _, _ in losses]
        self.weights = [w for _, w, _ in losses]
        self.losses = nn.ModuleList([loss for _, _, loss in losses])
        self.weight, self.warmup_steps, self.state, self.gather = weight, warmup_steps, state, gather
        self.start_step = 0  # the first optimizer step that distils (the backbone's first trained step)

    def ramp(self) -> float:
        """training.distill.weight at the optimizer step under way: linear from 0 over warmup_steps."""
        if not self.warmup_steps:
            return self.weight
        done = self.state.step - self.start_step + 1  # this step counts: the first one gets 1 / warmup_steps
        return self.weight * min(1.0, max(done, 0) / self.warmup_steps)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.autocast(student.device.type, enabled=False):
            student, teacher = self.gather(student.float(), teacher.detach().float())
            factor = self.ramp()
            return {name: loss(student, teacher) * (w * factor)
                    for name, w, loss in zip(self.names, self.weights, self.losses)}


class DistilledModel(nn.Module):
    """What DDP wraps while distilling: the student, the losses' parameters and (centers replicated) the classifier.

    Returns the loss terms, or ``(embeddings, distillation terms)`` without a classifier (sharded
    centers, which DDP must not see).
    """

    def __init__(self, backbone: nn.Module, terms: DistillTerms, classifier: nn.Module | None = None,
                 classify: Callable[..., dict[str, torch.Tensor]] | None = None):
        super().__init__()
        self.backbone, self.terms, self.classifier = backbone, terms, classifier
        self.classify = classify

    def forward(self, images: torch.Tensor, labels: torch.Tensor, teacher: torch.Tensor) -> Any:
        embeddings = self.backbone(images)
        extra = self.terms(embeddings, teacher)
        if self.classifier is None:
            return embeddings, extra
        return {**self.classify(self.classifier, embeddings, labels), **extra}


class Distiller:
    """The teacher and the distillation terms of a run; builds the phase's loss function for the trainer."""

    def __init__(self, teacher: Teacher, terms: DistillTerms, config: dict):
        self.teacher, self.terms, self.config = teacher, terms, config

    def parameters(self) -> list[nn.Parameter]:
        """The losses' own trainable parameters (they train at training.lr, with the classifier)."""
        return [p for p in self.terms.parameters() if p.requires_grad]

    def loss_fn(self, backbone: nn.Module, classifier: nn.Module, classify: Callable, sharded: bool,
                wrap: Callable[[nn.Module], nn.Module], start_step: int) -> Callable[..., dict[str, torch.Tensor]]:
        """``loss_fn(images, labels) -> {term: loss}`` of a trainable student; ``wrap`` adds DDP where it runs."""
        self.terms.start_step = start_step
        if sharded:
            student = wrap(DistilledModel(backbone, self.terms))

            def sharded_fn(x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
                embeddings, extra = student(x, y, self.teacher(x))
                return {**classify(classifier, embeddings, y), **extra}

            return sharded_fn
        model = wrap(DistilledModel(backbone, self.terms, classifier, classify))
        return lambda x, y: model(x, y, self.teacher(x))

    def lines(self) -> list[str]:
        """Log lines: where the teacher came from and what is distilled."""
        d, t = self.config["training"]["distill"], self.teacher
        ramp = f", ramped from 0 over {d['warmup_steps']} steps" if d["warmup_steps"] else ""
        out = [f"distilling from {t.path} ({t.source}) into the student: teacher '{t.name}' with embedding_size "
               f"{t.embedding_size}, fingerprint {t.fingerprint[:16]}; terms "
               f"{', '.join(f'{n} x {w:g}' for n, w in zip(self.terms.names, self.terms.weights))}, "
               f"times weight {d['weight']:g}{ramp}"]
        if self.config["training"]["freeze_backbone_epochs"]:
            out.append("while the backbone is frozen (training.freeze_backbone_epochs) the teacher is not run: "
                       "distillation starts with the backbone's first trained step")
        return out

    # -- checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """What a checkpoint holds: the teacher's path and fingerprint, and the losses' parameters."""
        return {"teacher": str(self.teacher.path), "fingerprint": self.teacher.fingerprint,
                "terms": self.terms.state_dict()}

    def load_state_dict(self, saved: dict, path: Path) -> None:
        if saved.get("fingerprint") != self.teacher.fingerprint:
            raise CheckpointError(
                f"training.distill.teacher: {self.teacher.path} is not the teacher {path} was trained with (its tensors "
                f"differ from those of {saved.get('teacher')} when the run started: fingerprint "
                f"{self.teacher.fingerprint[:16]}, saved {str(saved.get('fingerprint'))[:16]}). Resume with that teacher "
                "file, or start a new run"
            )
        try:
            self.terms.load_state_dict(saved["terms"])
        except (RuntimeError, KeyError) as exc:
            raise CheckpointError(f"{path}: the distillation losses' parameters do not fit this config "
                                  f"({str(exc).splitlines()[0]}); resume with the training.distill.loss list the run "
                                  "started with") from None


def build_distiller(config: dict, device: torch.device, info: DistInfo, state: Any) -> Distiller | None:
    """The run's Distiller, or None without ``training.distill``. Built under a forked RNG (see :func:`load_teacher`)."""
    section = config["training"]["distill"]
    if not section:
        return None
    teacher = load_teacher(config, device)
    student_size = config["model"]["embedding_size"]
    losses, seen = [], {}
    with torch.random.fork_rng(devices=[]):
        for entry, (name, loss) in zip(slot_entries(config, SLOT),
                                       build_slot(config, SLOT, student_size=student_size,
                                                  teacher_size=teacher.embedding_size)):
            seen[name] = seen.get(name, 0) + 1
            term = f"distill_{name}" + (f"_{seen[name]}" if seen[name] > 1 else "")
            losses.append((term, float(entry.core["weight"]), loss))
    terms = DistillTerms(losses, section["weight"], section["warmup_steps"], state, GlobalBatch(info)).to(device)
    return Distiller(teacher, terms, config)


def restore_distill(distiller: Distiller | None, ckpt: dict, path: Path) -> None:
    """At --resume: the checkpoint and the config agree on distillation, the teacher is the same; load the losses."""
    saved = ckpt.get("distill")
    if distiller is None:
        if saved:
            raise CheckpointError(f"{path} was trained with training.distill (teacher {saved.get('teacher')}); resume "
                                  "with the same training.distill section")
        return
    if saved is None:
        raise CheckpointError(f"{path} was trained without training.distill: resume without it, or start a new run "
                              f"from its backbone (model.pretrained: {path}) with distillation")
    distiller.load_state_dict(saved, path)

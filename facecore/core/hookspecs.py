"""Hook specifications: one ``register_<group>`` hook per group of ``core/groups.py``.

Each hook receives ``register(name, factory, *, schema=None, description="", **declared)``;
``declared`` are the extra keywords the group's spec lists (metrics: ``keys``, ``threshold``, ``roc``).
Implementations may take fewer arguments than the spec (pluggy's rule), so new
arguments can be added later without breaking existing plugins.
"""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("facecore")
hookimpl = pluggy.HookimplMarker("facecore")


@hookspec
def register_backbones(register):
    """Register backbones: ``factory(embedding_size, **options) -> nn.Module`` mapping (N,3,H,W) in [-1, 1] to (N, embedding_size)."""


@hookspec
def register_heads(register):
    """Register margin heads: ``factory(**options) -> nn.Module`` called as ``head(cosine, labels, norms) -> scaled logits``."""


@hookspec
def register_datasets(register):
    """Register datasets: ``factory(**options) -> torch Dataset`` of ``(image, label)`` with ``num_classes``, or pair sets with ``issame``."""


@hookspec
def register_schedulers(register):
    """Register LR schedules: ``factory(optimizer, steps_per_epoch, epochs, warmup_epochs, **options) -> LRScheduler`` stepped once per step."""


@hookspec
def register_metrics(register):
    """Register metrics: ``factory(**options) -> callable(embeddings, issame) -> dict[str, float]``.

    A metric declares the result keys it can produce (``keys=[...]``, or a callable from its options
    to that list), so the core can tell two metrics that produce one key apart and check
    ``checkpoint.best_metric``; optionally the key of a decision threshold it reports and that
    threshold's kind (``threshold={"key": ..., "kind": "squared_l2" | "cosine"}``), and ``roc=True`` when
    its numbers come from the ROC of cosine similarity (``facecore eval`` plots that ROC).
    """


@hookspec
def register_augmentations(register):
    """Register batch augmentations: ``factory(**options) -> aug`` called as ``aug(images, u) -> images``.

    ``images`` (M, 3, H, W) float in [-1, 1] on the training device are the images of the batch
    chosen for this augmentation; ``u`` (M, aug.draws) float32 on the CPU holds uniform random
    numbers in [0, 1) drawn by the core from (seed, epoch, batch, global position), the only
    randomness an augmentation may use, so runs stay exact for any number of ranks and on resume.
    """


@hookspec
def register_distill_losses(register):
    """Register distillation losses: ``factory(student_size, teacher_size, **options) -> nn.Module``.

    Called as ``loss(student, teacher) -> scalar``: float32 embeddings (N, student_size) and
    (N, teacher_size) of the whole global batch, in one process's order, the teacher's without
    gradient. Its parameters (a projection between the sizes) train with the student and are saved
    in the checkpoint.
    """


@hookspec
def register_loggers(register):
    """Register experiment trackers: ``factory(**options) -> logger`` (``logging.loggers``).

    Rank 0 calls the logger's methods from a thread of its own (see ``core/loggers.py``), each one optional:
    ``start(run) -> dict | None`` (the dict, e.g. a tracker run id, is kept in checkpoints and comes back as
    ``run.resume``), ``scalars(prefix, values, step)``, ``artifact(name, path, kind, step)`` with ``kind``
    ``image``, ``file`` or ``checkpoint`` (a path to refer to), and ``finish(status)`` with ``finished``,
    ``stopped`` or ``failed``. The factory should be cheap: import the tracker's package in ``start``.
    """

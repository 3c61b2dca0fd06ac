"""Hook specifications: one ``register_*`` hook per component group.

Each hook receives ``register(name, factory, *, schema=None, description="")``.
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
    """Register metrics: ``factory(**options) -> callable(embeddings, issame) -> dict[str, float]``."""

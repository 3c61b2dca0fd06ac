"""Per-step learning-rate schedules with linear warmup: multistep, cosine, poly, constant.

Each schedule is a pure function of the optimizer step, so a resumed run that restores
the step counter continues the schedule exactly. The schedule itself is rebuilt from the
config on resume (it is not stored in the checkpoint); the checkpoint holds the position.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from facecore import hookimpl
from facecore.errors import ConfigError

WARMUP_START = {
    "type": "number",
    "minimum": 0,
    "maximum": 1,
    "default": 0.0,
    "description": "LR at the first warmup step, as a fraction of each param group's base LR; "
    "it rises linearly to the base LR over training.warmup_epochs.",
}


class Warmup:
    """Linear ramp from ``start`` x base LR at step 0 to the base LR at step ``steps`` (may be fractional)."""

    def __init__(self, steps: float, start: float = 0.0):
        self.steps = float(steps)
        self.start = float(start)

    def factor(self, step: int) -> float:
        if step >= self.steps:
            return 1.0
        return self.start + (1.0 - self.start) * step / self.steps


class Schedule:
    """A schedule: ``lr(step, base_lr)`` for one param group; subclasses define ``decay``."""

    def __init__(self, warmup: Warmup, total_steps: int):
        self.warmup = warmup
        self.total_steps = total_steps

    def progress(self, step: int) -> float:
        """Fraction of the post-warmup steps done, clamped to [0, 1]."""
        span = self.total_steps - self.warmup.steps
        if span <= 0:
            return 1.0 if step >= self.total_steps else 0.0
        return min(max((step - self.warmup.steps) / span, 0.0), 1.0)

    def decay(self, step: int, base_lr: float) -> float:
        raise NotImplementedError

    def lr(self, step: int, base_lr: float) -> float:
        return self.decay(step, base_lr) * self.warmup.factor(step)


class Constant(Schedule):
    """The base LR after warmup."""

    def decay(self, step: int, base_lr: float) -> float:
        return base_lr


class MultiStep(Schedule):
    """Base LR times ``gamma`` for every milestone (a step index) already reached."""

    def __init__(self, warmup: Warmup, total_steps: int, milestone_steps: Sequence[float], gamma: float):
        super().__init__(warmup, total_steps)
        self.milestone_steps = [float(m) for m in milestone_steps]
        self.gamma = gamma

    def decay(self, step: int, base_lr: float) -> float:
        passed = sum(1 for m in self.milestone_steps if step >= m)
        return base_lr * self.gamma**passed


class Cosine(Schedule):
    """Half a cosine from the base LR (end of warmup) down to a floor at the last step."""

    def __init__(self, warmup: Warmup, total_steps: int, min_lr: float | None, min_lr_ratio: float):
        super().__init__(warmup, total_steps)
        self.min_lr = min_lr
        self.min_lr_ratio = min_lr_ratio

    def decay(self, step: int, base_lr: float) -> float:
        floor = self.min_lr if self.min_lr is not None else base_lr * self.min_lr_ratio
        return floor + (base_lr - floor) * 0.5 * (1.0 + math.cos(math.pi * self.progress(step)))


class Poly(Schedule):
    """Base LR x (1 - progress) ** power: reaches 0 at the last step (arcface_torch's PolyScheduler idea)."""

    def __init__(self, warmup: Warmup, total_steps: int, power: float):
        super().__init__(warmup, total_steps)
        self.power = power

    def decay(self, step: int, base_lr: float) -> float:
        return base_lr * (1.0 - self.progress(step)) ** self.power


class StepScheduler(LRScheduler):
    """Sets each param group's LR to ``schedule.lr(step, initial_lr)``; call ``step()`` once per optimizer step.

    ``state_dict()`` holds the position (``last_epoch`` counts steps) but not the schedule,
    which comes from the config when the run is resumed.
    """

    def __init__(self, optimizer: Optimizer, schedule: Schedule, last_epoch: int = -1):
        self.schedule = schedule
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        return [self.schedule.lr(self.last_epoch, base) for base in self.base_lrs]

    _get_closed_form_lr = get_lr  # already a pure function of the step

    def state_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in ("optimizer", "schedule")}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = {k: v for k, v in state_dict.items() if k != "schedule"}
        self.__dict__.update(state)
        # Put the optimizer at the restored step too, whatever order the caller loads things in.
        values = self.get_lr()
        for group, lr in zip(self.optimizer.param_groups, values):
            group["lr"] = lr
        self._last_lr = values


def _check_context(steps_per_epoch: int, epochs: int, warmup_epochs: float) -> None:
    if steps_per_epoch < 1:
        raise ConfigError(
            [f"the training set gives {steps_per_epoch} steps per epoch; lower data.batch_size "
             "(or add data) so that an epoch has at least one full batch"]
        )
    if warmup_epochs > epochs:
        raise ConfigError(
            [f"training.warmup_epochs: {warmup_epochs} is longer than training.epochs ({epochs}); "
             "use a warmup shorter than the run"]
        )


def _warmup(steps_per_epoch: int, epochs: int, warmup_epochs: float, warmup_start: float) -> tuple[Warmup, int]:
    _check_context(steps_per_epoch, epochs, warmup_epochs)
    return Warmup(warmup_epochs * steps_per_epoch, warmup_start), steps_per_epoch * epochs


def constant(optimizer: Optimizer, steps_per_epoch: int, epochs: int, warmup_epochs: float = 0,
             warmup_start: float = 0.0) -> StepScheduler:
    """Warmup, then the base LR for the rest of training."""
    warmup, total = _warmup(steps_per_epoch, epochs, warmup_epochs, warmup_start)
    return StepScheduler(optimizer, Constant(warmup, total))


def multistep(optimizer: Optimizer, steps_per_epoch: int, epochs: int, warmup_epochs: float = 0,
              milestones: list[float] | None = None, gamma: float = 0.1,
              warmup_start: float = 0.0) -> StepScheduler:
    """Warmup, then the base LR multiplied by ``gamma`` at each milestone epoch."""
    warmup, total = _warmup(steps_per_epoch, epochs, warmup_epochs, warmup_start)
    if milestones is None:
        milestones = [0.5 * epochs, 0.8 * epochs]
    milestones = list(milestones)
    key = "training.scheduler.milestones"
    if any(b <= a for a, b in zip(milestones, milestones[1:])):
        raise ConfigError([f"{key}: {milestones} must be strictly increasing epochs, e.g. [10, 16]"])
    late = [m for m in milestones if m >= epochs]
    if late:
        raise ConfigError(
            [f"{key}: milestone(s) {late} are not before the end of training (training.epochs = {epochs}) "
             "and would never lower the LR; remove them or train longer"]
        )
    steps = [m * steps_per_epoch for m in milestones]
    return StepScheduler(optimizer, MultiStep(warmup, total, steps, gamma))


def cosine(optimizer: Optimizer, steps_per_epoch: int, epochs: int, warmup_epochs: float = 0,
           min_lr_ratio: float = 0.0, min_lr: float | None = None,
           warmup_start: float = 0.0) -> StepScheduler:
    """Warmup, then cosine decay to ``min_lr`` (absolute) or ``min_lr_ratio`` x base LR."""
    warmup, total = _warmup(steps_per_epoch, epochs, warmup_epochs, warmup_start)
    if min_lr is not None:
        if min_lr_ratio:
            raise ConfigError(["training.scheduler: set min_lr or min_lr_ratio, not both"])
        top = min(group["lr"] for group in optimizer.param_groups)
        if min_lr > top:
            raise ConfigError(
                [f"training.scheduler.min_lr: {min_lr} is above the base LR {top}; use a smaller floor"]
            )
    return StepScheduler(optimizer, Cosine(warmup, total, min_lr, min_lr_ratio))


def poly(optimizer: Optimizer, steps_per_epoch: int, epochs: int, warmup_epochs: float = 0,
         power: float = 1.0, warmup_start: float = 0.0) -> StepScheduler:
    """Warmup, then polynomial decay to 0 at the last step."""
    warmup, total = _warmup(steps_per_epoch, epochs, warmup_epochs, warmup_start)
    return StepScheduler(optimizer, Poly(warmup, total, power))


def _schema(**properties: dict) -> dict:
    return {
        "type": "object",
        "additionalProperties": False,
        "properties": {**properties, "warmup_start": WARMUP_START},
    }


CONSTANT_SCHEMA = _schema()
MULTISTEP_SCHEMA = _schema(
    milestones={
        "type": ["array", "null"],
        "items": {"type": "number", "exclusiveMinimum": 0},
        "minItems": 1,
        "default": None,
        "description": "Epochs (may be fractional, strictly increasing, before training.epochs) at which "
        "the LR is multiplied by gamma; null means halfway and at 80% of training.epochs.",
    },
    gamma={
        "type": "number",
        "exclusiveMinimum": 0,
        "maximum": 1,
        "default": 0.1,
        "description": "Factor applied to the LR at each milestone.",
    },
)
COSINE_SCHEMA = _schema(
    min_lr_ratio={
        "type": "number",
        "minimum": 0,
        "maximum": 1,
        "default": 0.0,
        "description": "Final LR as a fraction of each param group's base LR.",
    },
    min_lr={
        "type": ["number", "null"],
        "minimum": 0,
        "default": None,
        "description": "Final LR as an absolute value, the same for every param group (overrides the ratio; "
        "leave min_lr_ratio at 0 when you set it).",
    },
)
POLY_SCHEMA = _schema(
    power={
        "type": "number",
        "exclusiveMinimum": 0,
        "default": 1.0,
        "description": "Exponent of (1 - progress); 1.0 is a straight line to 0 at the last step.",
    },
)


@hookimpl
def register_schedulers(register):
    register("multistep", multistep, schema=MULTISTEP_SCHEMA,
             description="Warmup, then LR x gamma at each milestone epoch")
    register("cosine", cosine, schema=COSINE_SCHEMA,
             description="Warmup, then cosine decay to a floor (default 0)")
    register("poly", poly, schema=POLY_SCHEMA,
             description="Warmup, then polynomial decay to 0 at the last step")
    register("constant", constant, schema=CONSTANT_SCHEMA,
             description="Warmup, then a constant LR")

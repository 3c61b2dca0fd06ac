"""The plugin groups, in one table: what each group is called, what the core passes its
factories, what its registrations declare, and where a config names its components.

The registries, the plugin manager, the composed config schema, ``facecore list-plugins`` and
``core/build.py`` all read :data:`GROUP_SPECS`; a new group is one entry here plus its
``register_<group>`` hook in ``core/hookspecs.py``. The table is read on every use (never
copied at import time), so a test can add a group for its own duration.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from ..errors import PluginError

NO_DEFAULT: Any = object()  # a slot key without a schema default (model.backbone must be written)


@dataclass(frozen=True)
class Slot:
    """A config key that names components of a group.

    ``kind``:
      - ``section``: the key names one component whose options sit beside it in the same
        section (``model.backbone``, ``head.type``); the section gets the plugin's options.
      - ``one``: a name or ``{name: ..., option: value}`` (``training.scheduler``).
      - ``many``: a list of those (``eval.metrics``, ``data.augment``).
      - ``name``: only a name, of a component that must have the options in ``needs``
        (``eval.dataset`` reads pair files, so it needs ``path``); ``role`` says what it reads.

    ``core_keys`` are keys of a ``{name: ...}`` entry that the core reads itself, validated with
    the plugin's options but not passed to it (``data.augment``'s ``p``). ``after`` is the key of
    the section this one follows in the effective config (None: first for ``section`` slots,
    last otherwise). ``checked`` is False where the name is checked only when the component is
    built (``eval.ijb.dataset``: only ``facecore eval`` reads it). ``switches`` (``many`` slots):
    older boolean keys, each of which, when false, leaves one component out of the list
    (``logging.tensorboard: false`` drops ``tensorboard`` from ``logging.loggers``).
    """

    path: str
    kind: str
    description: str
    default: Any = NO_DEFAULT
    required: bool = False
    core_keys: Mapping[str, dict] = field(default_factory=dict)
    needs: tuple[str, ...] = ()
    role: str = ""
    after: str | None = None
    checked: bool = True
    switches: Mapping[str, str] = field(default_factory=dict)

    @property
    def section(self) -> str:
        """The dotted path of the section holding the key (``eval.ijb`` for ``eval.ijb.dataset``)."""
        return self.path.rpartition(".")[0]

    @property
    def key(self) -> str:
        return self.path.rpartition(".")[2]

    def fragment(self) -> dict:
        """The core schema of the key: what any component name or entry looks like here."""
        entry = {"anyOf": [
            {"type": "string"},
            {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}, **self.core_keys}},
        ]}
        out: dict = {
            "section": {"type": "string"},
            "name": {"type": "string"},
            "one": entry,
            "many": {"type": "array", "items": entry},
        }[self.kind]
        if self.default is not NO_DEFAULT:
            out["default"] = self.default
        out["description"] = self.description
        return out


@dataclass(frozen=True)
class GroupSpec:
    """One plugin group.

    ``context_args``: arguments the core itself passes to the group's factories (part of the
    contract, not options, so not validated by the plugin's schema); ``required_context_args``:
    those every factory must accept (pair-set readers take no ``train``). ``declares``: extra
    keyword arguments a registration of this group may carry (metrics declare their ``keys``).
    """

    name: str
    singular: str
    context_args: tuple[str, ...] = ()
    required_context_args: tuple[str, ...] = ()
    slots: tuple[Slot, ...] = ()
    declares: tuple[str, ...] = ()

    @property
    def hook(self) -> str:
        """The pluggy hook of the group: ``register_<name>``."""
        return f"register_{self.name}"


_FAR_DEFAULTS = ["verification", "tar_at_far", "auc", "eer"]

GROUP_SPECS: dict[str, GroupSpec] = {spec.name: spec for spec in (
    GroupSpec(
        "backbones", "backbone", context_args=("embedding_size",), required_context_args=("embedding_size",),
        slots=(Slot("model.backbone", "section", "A registered backbone name (facecore list-plugins --group "
                    "backbones).", required=True),
               Slot("training.distill.backbone.type", "section", "The teacher's registered backbone name; its options "
                    "sit beside it, as the student's do in the model section.", required=True)),
    ),
    GroupSpec(
        "heads", "head",
        slots=(Slot("head.type", "section", "A registered head name.", default="arcface"),),
    ),
    GroupSpec(
        "datasets", "dataset", context_args=("train",),
        slots=(
            Slot("data.type", "section", "A registered training dataset name.", default="recordio"),
            Slot("eval.dataset", "name", "The pair-set dataset plugin that reads eval.bin_file.",
                 default="bin-pairs", needs=("path",), role="pair set", after="bin_file"),
            Slot("eval.ijb.dataset", "name", "The template-set dataset plugin that reads eval.ijb.root.",
                 default="ijb", needs=("root", "target"), role="template set", after="target", checked=False),
        ),
    ),
    GroupSpec(
        "schedulers", "scheduler",
        context_args=("optimizer", "steps_per_epoch", "epochs", "warmup_epochs"),
        required_context_args=("optimizer", "steps_per_epoch", "epochs", "warmup_epochs"),
        slots=(Slot("training.scheduler", "one", "A registered scheduler name, or {name: ..., option: value}.",
                    default="cosine", after="nesterov"),),
    ),
    GroupSpec(
        "metrics", "metric", declares=("keys", "threshold", "roc"),
        slots=(Slot("eval.metrics", "many", "Metric plugins to compute on each pair set: names, or "
                    "{name: ..., option: value}.", default=_FAR_DEFAULTS, after="at_start"),),
    ),
    GroupSpec(
        "augmentations", "augmentation",
        slots=(Slot(
            "data.augment", "many",
            "Augmentation plugins applied in order to each training batch on the training device: names, "
            "or {name: ..., p: probability per image, option: value}; [] turns augmentation off.",
            default=["flip"],
            core_keys={"p": {"type": "number", "minimum": 0, "maximum": 1, "default": 0.5,
                             "description": "Probability that an image gets this augmentation (drawn per image)."}},
        ),),
    ),
    GroupSpec(
        "distill_losses", "distillation loss",
        context_args=("student_size", "teacher_size"), required_context_args=("student_size", "teacher_size"),
        slots=(Slot(
            "training.distill.loss", "many",
            "Distillation loss plugins, each a named loss term beside the margin loss: names, or {name: ..., "
            "weight: w, option: value}.",
            default=["embedding"], after="backbone",
            core_keys={"weight": {"type": "number", "minimum": 0, "default": 1.0,
                                  "description": "This term's weight (times training.distill.weight and its warm-up)."}},
        ),),
    ),
    GroupSpec(
        "loggers", "logger",
        slots=(Slot(
            "logging.loggers", "many",
            "Experiment trackers that get the run's config, scalars, artifacts and end (rank 0, never blocking "
            "training): names, or {name: ..., option: value}; [] for none. metrics.jsonl and train.log are always "
            "written.", default=["tensorboard"], after="log_dir", switches={"logging.tensorboard": "tensorboard"},
        ),),
    ),
)}


def group_names() -> tuple[str, ...]:
    """The groups, in table order."""
    return tuple(GROUP_SPECS)


def group_spec(name: str) -> GroupSpec:
    """The spec of a group; PluginError naming the groups when unknown."""
    try:
        return GROUP_SPECS[name]
    except (KeyError, TypeError):
        raise PluginError(f"unknown plugin group '{name}': groups are {', '.join(GROUP_SPECS)}") from None


def slots() -> list[tuple[GroupSpec, Slot]]:
    """Every config slot with its group, in table order."""
    return [(spec, slot) for spec in GROUP_SPECS.values() for slot in spec.slots]


def slot_at(path: str) -> tuple[GroupSpec, Slot]:
    """The group and slot of a config key path (``eval.metrics``)."""
    for spec, slot in slots():
        if slot.path == path:
            return spec, slot
    raise KeyError(path)


__all__ = ["GROUP_SPECS", "NO_DEFAULT", "GroupSpec", "Slot", "group_names", "group_spec", "slot_at", "slots"]

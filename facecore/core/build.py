"""Assemble components from an effective (validated) config through the registries.

The trainer, evaluator and predictor all build through here, so a config means the
same model everywhere. No plugin is named: names come from the config, and where a config
names them comes from the group table (``core/groups.py``).
"""

from __future__ import annotations

import os
from typing import Any, Callable, NamedTuple

from ..errors import ConfigError, PluginError
from .config import reader_problem, section_options
from .groups import group_spec, slot_at
from .plugins import registry
from .registry import Registration, missing_context
from .validation import fill_defaults, schema_errors


def create(group: str, name: str, **options: Any) -> Any:
    """Build a registered component after validating ``options`` against its schema (``facecore.create``).

    The group's context arguments (``embedding_size`` for backbones, ``train`` for datasets,
    ``optimizer, steps_per_epoch, epochs, warmup_epochs`` for schedulers) are passed through
    unvalidated. Unknown group or name: PluginError; bad options: ConfigError listing all.
    """
    spec = group_spec(group)
    reg = registry(group).get(name)
    context = {k: options.pop(k) for k in spec.context_args if k in options}
    props, required = reg.config_options()
    schema = {**(reg.schema or {"type": "object", "additionalProperties": False}),
              "properties": props, "required": required}
    errors = schema_errors(schema, options, prefix=name)
    if errors:
        raise ConfigError(errors, f"the options of {spec.singular} '{name}'")
    missing = missing_context(reg, context)
    if missing:
        args = ", ".join(f"{k}=..." for k in missing)
        raise TypeError(f"create({group!r}, {name!r}) needs {args}: the core passes it to every one of the {group}")
    return reg.factory(**context, **options)


class Entry(NamedTuple):
    """One component a config slot names: its registration, its options, and the core keys of its entry."""

    reg: Registration
    options: dict
    core: dict


def slot_entries(config: dict, path: str) -> list[Entry]:
    """The components the slot at ``path`` (``model.backbone``, ``eval.metrics``, ...) names, in order.

    ``section`` slots take their options from the keys of the section the plugin's schema declares;
    ``one``/``many`` entries are a name or ``{name: ..., option: value}``, whose core keys (``p``)
    are split off and default from the slot; a ``name`` slot names a component without options.
    """
    spec, slot = slot_at(path)
    section: Any = config
    for part in slot.section.split("."):
        section = section[part]
    value = section[slot.key]
    if slot.kind == "section":
        reg = registry(spec.name).get(value)
        return [Entry(reg, section_options(section, reg), {})]
    if slot.kind == "name":
        return [Entry(registry(spec.name).get(value), {}, {})]
    out = []
    for item in value if slot.kind == "many" else [value]:
        options = {"name": item} if isinstance(item, str) else dict(item)
        name = options.pop("name")
        core = {k: options.pop(k, sub.get("default")) for k, sub in slot.core_keys.items()}
        out.append(Entry(registry(spec.name).get(name), options, core))
    return out


def build_slot(config: dict, path: str, **context: Any) -> list[tuple[str, Any]]:
    """(name, component) for each component the slot at ``path`` names, built with ``context``."""
    spec, _ = slot_at(path)
    return [(e.reg.name, create(spec.name, e.reg.name, **context, **e.options)) for e in slot_entries(config, path)]


def build_backbone(config: dict) -> Any:
    """The backbone named by ``model.backbone`` with its options from the ``model`` section."""
    return build_slot(config, "model.backbone", embedding_size=config["model"]["embedding_size"])[0][1]


def build_head(config: dict) -> Any:
    """The margin head named by ``head.type`` with its options from the ``head`` section."""
    return build_slot(config, "head.type")[0][1]


def build_train_dataset(config: dict, train: bool = True) -> Any:
    """The training dataset named by ``data.type`` with its options from the ``data`` section."""
    return build_slot(config, "data.type", train=train)[0][1]


def pair_set_paths(config: dict) -> list[str]:
    """``eval.bin_file`` as a list of paths, relative names resolved against ``data.root``."""
    value = config["eval"].get("bin_file")
    if not value:
        return []
    names = [value] if isinstance(value, str) else list(value)
    root = config["data"].get("root") or ""
    return [n if os.path.isabs(n) or not root else os.path.join(root, n) for n in names]


def pair_set_names(paths: list[str]) -> list[str]:
    """Names of pair sets in results, one per path: the file stem, ``-2``, ``-3``... added to repeats.

    ``[a/lfw.bin, b/lfw.bin, cfp_fp.bin]`` -> ``[lfw, lfw-2, cfp_fp]``: the names ``facecore eval``
    prints and writes, and the keys of the trainer's validation results.
    """
    names: list[str] = []
    for p in paths:
        stem = os.path.splitext(os.path.basename(os.fspath(p)))[0]
        name, n = stem, 2
        while name in names:
            name, n = f"{stem}-{n}", n + 1
        names.append(name)
    return names


def _build_reader(config: dict, slot_path: str, optional: dict | None = None, **options: Any) -> Any:
    """The dataset a ``name`` slot names, after checking it reads what the slot needs.

    ``optional`` options (and ``img_size``) are passed only to a plugin whose schema declares them.
    """
    _, slot = slot_at(slot_path)
    reg = slot_entries(config, slot_path)[0].reg
    problem = reader_problem(slot, reg)
    if problem:
        raise PluginError(problem)
    if "img_size" in reg.options:
        options["img_size"] = config["data"]["img_size"]
    options.update({k: v for k, v in (optional or {}).items() if k in reg.options and v is not None})
    return create("datasets", reg.name, **options)


def build_pair_set(config: dict, path: str) -> Any:
    """One validation pair set read by the ``eval.dataset`` plugin."""
    return _build_reader(config, "eval.dataset", path=path)


def build_template_set(config: dict, root: str, target: str, protocol: str | None = None) -> Any:
    """The IJB-style template set at ``root`` read by the ``eval.ijb.dataset`` plugin.

    ``protocol`` (auto, 1:1, 1:N, both) reaches plugins that declare it, so they read only the files it needs.
    """
    return _build_reader(config, "eval.ijb.dataset", optional={"protocol": protocol}, root=root, target=target)


def build_metrics(config: dict) -> list[tuple[str, Callable[..., dict]]]:
    """The ``eval.metrics`` list as (name, callable) pairs."""
    return build_slot(config, "eval.metrics")


def build_augmentations(config: dict) -> list[tuple[str, float, Callable[..., Any]]]:
    """The ``data.augment`` list as (name, p, augmentation) triples, in order.

    ``p`` is a core key of each entry (the chance an image gets it), not an option of the plugin;
    an entry that leaves it out gets the slot's default.
    """
    return [(e.reg.name, float(e.core["p"]), create("augmentations", e.reg.name, **e.options))
            for e in slot_entries(config, "data.augment")]


def build_scheduler(config: dict, optimizer: Any, steps_per_epoch: int) -> Any:
    """The per-step LR schedule named by ``training.scheduler``."""
    training = config["training"]
    return build_slot(config, "training.scheduler", optimizer=optimizer, steps_per_epoch=steps_per_epoch,
                      epochs=training["epochs"], warmup_epochs=training["warmup_epochs"])[0][1]


# --- what metrics declare -------------------------------------------------------------------

def declared_keys(reg: Registration, options: dict) -> list[str] | None:
    """The result keys a metric registration declares for ``options`` (None when it declares none)."""
    keys = reg.declared.get("keys")
    if keys is None:
        return None
    if callable(keys):
        props, _ = reg.config_options()
        keys = keys(**fill_defaults({"properties": props}, dict(options)))
    if isinstance(keys, str) or not all(isinstance(k, str) for k in keys):
        raise PluginError(f"metric '{reg.name}' ({reg.provider}): keys must be a list of strings, got {keys!r}")
    return list(keys)


def metric_key_owners(config: dict) -> tuple[dict[str, list[str]], list[str]]:
    """(key -> the ``eval.metrics[i]`` entries that declare it, entries that declare no keys)."""
    owners: dict[str, list[str]] = {}
    undeclared = []
    for i, entry in enumerate(slot_entries(config, "eval.metrics")):
        where = f"eval.metrics[{i}] ({entry.reg.name})"
        keys = declared_keys(entry.reg, entry.options)
        if keys is None:
            undeclared.append(where)
            continue
        for key in keys:
            owners.setdefault(key, []).append(where)
    return owners, undeclared


def metric_keys(config: dict) -> set[str]:
    """The result keys the configured ``eval.metrics`` can produce, as their registrations declare them.

    Metrics that declare no keys contribute none (see docs/writing-plugins.md).
    """
    return set(metric_key_owners(config)[0])


def metric_threshold(config: dict) -> dict | None:
    """The first configured metric's declared decision threshold: ``{"key": ..., "kind": ...}``, or None."""
    for entry in slot_entries(config, "eval.metrics"):
        threshold = entry.reg.declared.get("threshold")
        if threshold:
            return dict(threshold)
    return None


def roc_flip(config: dict, metrics: list[tuple[str, Any]]) -> bool:
    """Whether ``facecore eval``'s ROC uses mirror-summed embeddings: the ``flip`` of the first configured
    metric that declares ``roc=True`` (its numbers come from that ROC), else True."""
    for entry, (_, metric) in zip(slot_entries(config, "eval.metrics"), metrics):
        if entry.reg.declared.get("roc"):
            return bool(getattr(metric, "flip", True))
    return True

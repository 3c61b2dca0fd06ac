"""Assemble components from an effective (validated) config through the registries.

The trainer, evaluator and predictor all build through here, so a config means the
same model everywhere. No plugin is named: names come from the config.
"""

from __future__ import annotations

import os
from typing import Any, Callable

from .. import create
from .config import section_options, spec_name_options
from .plugins import registry


def build_backbone(config: dict) -> Any:
    """The backbone named by ``model.backbone`` with its options from the ``model`` section."""
    model = config["model"]
    reg = registry("backbones").get(model["backbone"])
    return create("backbones", reg.name, embedding_size=model["embedding_size"], **section_options(model, reg))


def build_head(config: dict) -> Any:
    """The margin head named by ``head.type`` with its options from the ``head`` section."""
    head = config["head"]
    reg = registry("heads").get(head["type"])
    return create("heads", reg.name, **section_options(head, reg))


def build_train_dataset(config: dict, train: bool = True) -> Any:
    """The training dataset named by ``data.type`` with its options from the ``data`` section."""
    data = config["data"]
    reg = registry("datasets").get(data["type"])
    return create("datasets", reg.name, train=train, **section_options(data, reg))


def pair_set_paths(config: dict) -> list[str]:
    """``eval.bin_file`` as a list of paths, relative names resolved against ``data.root``."""
    value = config["eval"].get("bin_file")
    if not value:
        return []
    names = [value] if isinstance(value, str) else list(value)
    root = config["data"].get("root") or ""
    return [n if os.path.isabs(n) or not root else os.path.join(root, n) for n in names]


def build_pair_set(config: dict, path: str) -> Any:
    """One validation pair set read by the ``eval.dataset`` plugin."""
    name = config["eval"]["dataset"]
    reg = registry("datasets").get(name)
    options = {"path": path}
    if "img_size" in reg.options:
        options["img_size"] = config["data"]["img_size"]
    return create("datasets", name, **options)


def build_template_set(config: dict, root: str, target: str) -> Any:
    """The IJB-style template set at ``root`` read by the ``eval.ijb.dataset`` plugin."""
    from ..errors import PluginError

    name = config["eval"]["ijb"]["dataset"]
    datasets = registry("datasets")
    reg = datasets.get(name)
    if not {"root", "target"} <= set(reg.options):
        readers = [n for n in datasets.names() if {"root", "target"} <= set(datasets.entries[n].options)]
        raise PluginError(f"eval.ijb.dataset: dataset '{name}' does not read template sets (it has no 'root' and "
                          f"'target' options); template-set readers: {', '.join(readers) or 'none installed'}")
    options = {"root": root, "target": target}
    if "img_size" in reg.options:
        options["img_size"] = config["data"]["img_size"]
    return create("datasets", name, **options)


def build_metrics(config: dict) -> list[tuple[str, Callable[..., dict]]]:
    """The ``eval.metrics`` list as (name, callable) pairs."""
    out = []
    for spec in config["eval"]["metrics"]:
        name, options = spec_name_options(spec)
        out.append((name, create("metrics", name, **options)))
    return out


def build_augmentations(config: dict) -> list[tuple[str, float, Callable[..., Any]]]:
    """The ``data.augment`` list as (name, p, augmentation) triples, in order.

    ``p`` is a core key of each entry (the chance an image gets it), not an option of the plugin;
    an entry that leaves it out gets the schema's default.
    """
    from .config import core_schema, spec_core_keys

    default_p = spec_core_keys(core_schema()["properties"]["data"]["properties"]["augment"], True)["p"]["default"]
    out = []
    for spec in config["data"]["augment"]:
        name, options = spec_name_options(spec)
        p = options.pop("p", default_p)
        out.append((name, float(p), create("augmentations", name, **options)))
    return out


def build_scheduler(config: dict, optimizer: Any, steps_per_epoch: int) -> Any:
    """The per-step LR schedule named by ``training.scheduler``."""
    training = config["training"]
    name, options = spec_name_options(training["scheduler"])
    return create(
        "schedulers",
        name,
        optimizer=optimizer,
        steps_per_epoch=steps_per_epoch,
        epochs=training["epochs"],
        warmup_epochs=training["warmup_epochs"],
        **options,
    )

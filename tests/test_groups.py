"""The group table (core/groups.py): a new group is one entry plus its hookspec, and the registries,
list-plugins, the composed schema, validation and building all pick it up."""

from __future__ import annotations

import json

import pluggy
import pytest
from click.testing import CliRunner

import facecore
from facecore import ConfigError, cli, hookimpl
from facecore.core import groups, hookspecs, plugins
from facecore.core.build import build_slot
from facecore.core.config import compose_schema, core_schema, validate_config
from facecore.core.groups import GroupSpec, Slot, group_names


class DetectorSpec:
    """A new group's hookspec, as it would sit in core/hookspecs.py."""

    @staticmethod
    @hookspecs.hookspec
    def register_detectors(register):
        """Register face detectors: ``factory(img_size, **options) -> detector``."""


DETECTORS = GroupSpec(
    "detectors", "detector", context_args=("img_size",), required_context_args=("img_size",),
    slots=(Slot("detector.type", "section", "A registered face detector.", default="t-box"),),
)


class Box:
    def __init__(self, img_size: int, min_size: int = 20):
        self.img_size, self.min_size = img_size, min_size


class DetectorPlugin:
    @hookimpl
    def register_detectors(self, register):
        register("t-box", Box, description="boxes of at least min_size pixels", schema={
            "type": "object", "additionalProperties": False,
            "properties": {"min_size": {"type": "integer", "minimum": 1, "default": 20}}})


@pytest.fixture
def new_group(monkeypatch):
    """The table with a detectors entry and a plugin manager that knows its hook, for this test only."""
    plugins.reset()  # entry-point plugins leave the suite's manager; they load again into the test's
    manager = pluggy.PluginManager("facecore")
    manager.add_hookspecs(hookspecs)
    manager.add_hookspecs(DetectorSpec)
    monkeypatch.setattr(plugins, "pm", manager)
    monkeypatch.setitem(groups.GROUP_SPECS, "detectors", DETECTORS)
    manager.register(DetectorPlugin(), name="t-detectors")
    try:
        yield
    finally:
        plugins.reset()
        monkeypatch.undo()
        plugins.reset()


CONFIG = {"model": {"backbone": "resnet18", "embedding_size": 8}, "data": {"type": "image-folder", "root": "/d"}}


def test_every_group_has_its_hook_and_every_hook_its_group():
    specs = {name for name in dir(hookspecs) if name.startswith("register_")}
    assert specs == {groups.group_spec(g).hook for g in group_names()}
    assert len(group_names()) == 8


def test_a_new_group_is_one_table_entry_plus_its_hookspec(new_group):
    assert "detectors" in group_names() and facecore.available("detectors") == ["t-box"]

    listed = CliRunner().invoke(cli.main, ["list-plugins", "--json"])
    assert listed.exit_code == 0, listed.output
    rows = json.loads(listed.stdout)["components"]
    assert {"group": "detectors", "name": "t-box", "options": ["min_size"]}.items() <= next(
        r for r in rows if r["group"] == "detectors").items()
    only = CliRunner().invoke(cli.main, ["list-plugins", "--group", "detectors"])
    assert only.exit_code == 0 and "t-box" in only.stdout and "resnet18" not in only.stdout

    assert core_schema()["properties"]["detector"]["properties"]["type"]["default"] == "t-box"
    composed, errors = compose_schema({**CONFIG, "detector": {"type": "t-box"}})
    assert errors == [] and "min_size" in composed["properties"]["detector"]["properties"]

    effective = validate_config(CONFIG)
    assert effective["detector"] == {"type": "t-box", "min_size": 20}
    with pytest.raises(ConfigError) as err:
        validate_config({**CONFIG, "detector": {"type": "t-box", "min_sise": 3}})
    assert any(e.startswith("detector.min_sise:") for e in err.value.errors), err.value.errors
    with pytest.raises(ConfigError) as err:
        validate_config({**CONFIG, "detector": {"type": "t-bx"}})
    assert any(e.startswith("detector.type: unknown detector 't-bx'") and "did you mean 't-box'" in e
               for e in err.value.errors), err.value.errors

    box = facecore.create("detectors", "t-box", img_size=112, min_size=3)
    assert (box.img_size, box.min_size) == (112, 3)
    with pytest.raises(ConfigError) as err:
        facecore.create("detectors", "t-box", img_size=112, min_size=0)
    assert "t-box.min_size" in str(err.value)
    [(name, built)] = build_slot({**effective, "detector": {"type": "t-box", "min_size": 7}}, "detector.type",
                                 img_size=64)
    assert name == "t-box" and (built.img_size, built.min_size) == (64, 7)


def test_the_table_is_back_after_the_test():
    assert "detectors" not in group_names()
    assert "detector" not in core_schema()["properties"]
    with pytest.raises(facecore.PluginError):
        facecore.available("detectors")

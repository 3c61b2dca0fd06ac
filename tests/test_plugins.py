"""The plugin system: entry-point discovery, registries, broken plugins, FACECORE_LOAD_PLUGINS, create()."""

from __future__ import annotations

import importlib.util
import inspect
import re
import sys
import uuid
from importlib import metadata
from pathlib import Path

import pluggy
import pytest

import facecore
from facecore import ConfigError, PluginError, hookimpl
from facecore.core import hookspecs
from facecore.core.groups import group_names
from facecore.core import plugins
from facecore.core.registry import Provider, Registration, contract_problems

ROOT = Path(__file__).resolve().parents[1]

WIDTH_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "properties": {"width": {"type": "integer", "minimum": 1, "default": 8, "description": "Channels."}},
}


def tiny_backbone(embedding_size: int, width: int = 8) -> tuple:
    return ("tiny", embedding_size, width)


def plain_head() -> str:
    return "head"


class TinyBackbones:
    @hookimpl
    def register_backbones(self, register):
        register("t-tiny", tiny_backbone, schema=WIDTH_SCHEMA, description="A tiny test backbone")


def _components(group: str) -> list[str]:
    return plugins.registry(group).names()


def _broken(plugin_name: str) -> list[str]:
    return [b.error for b in plugins.broken_plugins() if b.plugin == plugin_name]


# --- entry-point discovery --------------------------------------------------------------


def _pyproject_entry_points() -> dict[str, str]:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+; the metadata check below covers 3.10
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return data["project"]["entry-points"]["facecore"]


def test_bundled_entry_points_are_found_in_the_installed_metadata():
    declared = _pyproject_entry_points()
    installed = {ep.name: ep.value for ep in metadata.distribution("facecore").entry_points if ep.group == "facecore"}
    assert installed == declared, "reinstall facecore (pip install -e .): its metadata is older than pyproject.toml"


def test_bundled_plugins_are_attributed_to_the_facecore_distribution():
    version = metadata.version("facecore")
    loaded = {p["name"]: p for p in plugins.loaded_plugins()}
    broken = {b.plugin: b for b in plugins.broken_plugins()}
    for name, module in _pyproject_entry_points().items():
        key = f"facecore:{name}"
        assert key in loaded, f"{key} did not load: {broken.get(key)}"
        assert (loaded[key]["distribution"], loaded[key]["version"]) == ("facecore", version)
        assert loaded[key]["hooks"], f"{key} implements no hook"
    for group in group_names():
        for name in _components(group):
            provider = plugins.registry(group).provider(name)
            if provider.plugin.startswith("facecore:"):
                assert (provider.distribution, provider.version) == ("facecore", version)


# --- in-test plugins and the registry cache ---------------------------------------------


def test_in_test_plugin_appears_and_disappears(register_plugin):
    assert "t-tiny" not in _components("backbones")
    plugin = register_plugin(TinyBackbones(), name="tiny-test-plugin")
    assert "t-tiny" in _components("backbones")
    provider = plugins.registry("backbones").provider("t-tiny")
    assert provider == Provider("tiny-test-plugin", "(in-process)", "")
    assert facecore.create("backbones", "t-tiny", embedding_size=16) == ("tiny", 16, 8)
    plugins.pm.unregister(plugin)
    assert "t-tiny" not in _components("backbones")  # the cache follows the plugin set
    assert not plugins.pm.is_registered(plugin)


def test_cache_notices_a_new_object_under_a_reused_name(register_plugin):
    first = register_plugin(TinyBackbones(), name="reused")
    assert "t-tiny" in _components("backbones")
    plugins.pm.unregister(first)

    class Other:
        @hookimpl
        def register_backbones(self, register):
            register("t-other", tiny_backbone, schema=WIDTH_SCHEMA)

    register_plugin(Other(), name="reused")
    names = _components("backbones")
    assert "t-other" in names and "t-tiny" not in names


def test_unknown_name_suggests_close_matches_and_lists_installed(register_plugin):
    register_plugin(TinyBackbones())
    with pytest.raises(PluginError) as info:
        plugins.registry("backbones").get("t-tinny")
    message = str(info.value)
    assert "did you mean 't-tiny'?" in message
    assert "installed backbones:" in message and "t-tiny" in message.split("installed backbones:")[1]


def test_unknown_group_is_a_plugin_error():
    with pytest.raises(PluginError, match="unknown plugin group 'losses'"):
        plugins.registry("losses")
    with pytest.raises(PluginError, match="losses"):
        facecore.create("losses", "x")


# --- duplicates --------------------------------------------------------------------------


def _backbone_plugin(component: str):
    class Plugin:
        @hookimpl
        def register_backbones(self, register):
            register(component, tiny_backbone, schema=WIDTH_SCHEMA)

    return Plugin()


def test_duplicate_name_is_an_error_naming_both_providers(register_plugin):
    register_plugin(_backbone_plugin("t-dup"), name="first-provider")
    register_plugin(_backbone_plugin("t-dup"), name="second-provider")
    with pytest.raises(PluginError) as info:
        facecore.create("backbones", "t-dup", embedding_size=4)
    assert "first-provider" in str(info.value) and "second-provider" in str(info.value)
    errors = _broken("second-provider")
    assert errors and "first-provider" in errors[0] and "'t-dup'" in errors[0]


def test_claiming_a_bundled_name_names_the_facecore_distribution(register_plugin):
    bundled = [n for n in _components("heads") if plugins.registry("heads").provider(n).distribution == "facecore"]
    if not bundled:
        pytest.skip("no bundled head installed yet")
    name = bundled[0]

    class Clash:
        @hookimpl
        def register_heads(self, register):
            register(name, plain_head)

    register_plugin(Clash(), name="clashing-plugin")
    with pytest.raises(PluginError) as info:
        plugins.registry("heads").get(name)
    message = str(info.value)
    assert f"facecore {metadata.version('facecore')}" in message and "clashing-plugin" in message


# --- plugins that fail -------------------------------------------------------------------


def test_hook_that_raises_is_reported_and_the_rest_keeps_working(register_plugin):
    class Raising:
        @hookimpl
        def register_heads(self, register):
            register("t-partial", plain_head)
            raise ValueError("nope")

    register_plugin(TinyBackbones())
    register_plugin(Raising(), name="raising-plugin")
    errors = _broken("raising-plugin")
    assert errors == ["register_heads raised ValueError: nope"]
    assert "t-partial" not in _components("heads")  # nothing half-registered
    assert "t-tiny" in _components("backbones")


@pytest.mark.parametrize(
    "call, expected",
    [
        (lambda r: r("", plain_head), "non-empty string"),
        (lambda r: r("t-x", "not callable"), "factory must be callable"),
        (lambda r: r("t-x", plain_head, schema={"type": "array"}), "\"type\": \"object\""),
        (lambda r: r("t-x", plain_head, schema={"type": "object", "properties": 3}), "invalid options schema"),
    ],
)
def test_bad_registrations_are_reported(register_plugin, call, expected):
    class Bad:
        @hookimpl
        def register_heads(self, register):
            call(register)

    register_plugin(Bad(), name="bad-registration")
    errors = _broken("bad-registration")
    assert len(errors) == 1 and "TypeError" in errors[0] and expected in errors[0]
    assert "t-x" not in _components("heads")


def test_misspelled_hook_name_is_rejected_naming_the_plugin(register_plugin):
    class Misspelled:
        @hookimpl
        def register_backbone(self, register):  # missing "s"
            register("t-never", tiny_backbone)

        @hookimpl
        def register_heads(self, register):
            register("t-valid-but-rejected", plain_head)

    plugin = register_plugin(Misspelled(), name="misspelled-plugin")
    errors = _broken("misspelled-plugin")
    assert len(errors) == 1
    assert "unknown hook 'register_backbone'" in errors[0] and "did you mean 'register_backbones'" in errors[0]
    assert "t-valid-but-rejected" not in _components("heads")  # a rejected plugin registers nothing
    with pytest.raises(pluggy.PluginValidationError):  # pluggy agrees while it is registered
        plugins.pm.check_pending()
    plugins.pm.unregister(plugin)
    plugins.pm.check_pending()
    assert not _broken("misspelled-plugin")


def test_optional_hooks_from_newer_versions_are_allowed(register_plugin):
    class Newer:
        @hookimpl(optionalhook=True)
        def register_losses(self, register):
            raise AssertionError("never called")

        @hookimpl
        def register_heads(self, register):
            register("t-newer-head", plain_head)

    register_plugin(Newer(), name="newer-plugin")
    assert not _broken("newer-plugin")
    assert "t-newer-head" in _components("heads")


def test_misspelled_hook_argument_is_rejected_by_register():
    class BadArgument:
        @hookimpl
        def register_backbones(self, regster):
            pass

    plugin = BadArgument()
    with pytest.raises(pluggy.PluginValidationError) as info:
        plugins.pm.register(plugin, name="bad-argument-plugin")
    assert "bad-argument-plugin" in str(info.value) and "regster" in str(info.value)
    assert not plugins.pm.is_registered(plugin)  # nothing left behind


# --- real distributions made on the fly --------------------------------------------------

GOOD_MODULE = """
from facecore import hookimpl

def factory(embedding_size, width=2):
    return ("fake", embedding_size, width)

@hookimpl
def register_backbones(register):
    register("{component}", factory, schema={{"type": "object", "additionalProperties": False,
             "properties": {{"width": {{"type": "integer", "default": 2}}}}}}, description="fake")
"""


class FakeDistributions:
    """Distributions (module + dist-info) in a temp folder put on sys.path; removed by ``remove()``."""

    def __init__(self, root: Path, monkeypatch: pytest.MonkeyPatch):
        self.root, self.monkeypatch, self.modules = root, monkeypatch, []
        monkeypatch.syspath_prepend(str(root))

    def add(self, dist: str, source: str, version: str = "1.2.3") -> str:
        """Write distribution ``dist`` with one entry point to a fresh module; returns the module name."""
        module = f"fc_fake_{uuid.uuid4().hex[:8]}"
        (self.root / f"{module}.py").write_text(source)
        info = self.root / f"{re.sub(r'[-.]+', '_', dist)}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
        (info / "entry_points.txt").write_text(f"[facecore]\nmain = {module}\n")
        self.modules.append(module)
        importlib.invalidate_caches()
        plugins.reset()
        return module

    def remove(self) -> None:
        self.monkeypatch.undo()
        for module in self.modules:
            sys.modules.pop(module, None)
        importlib.invalidate_caches()
        plugins.reset()


@pytest.fixture
def fake_dists(tmp_path, monkeypatch):
    fakes = FakeDistributions(tmp_path, monkeypatch)
    try:
        yield fakes
    finally:
        fakes.remove()


def test_plugin_raising_on_import_is_reported_and_reset_cleans_up(fake_dists):
    heads_before = _components("heads")
    fake_dists.add("fc-exploding", "raise RuntimeError('boom: libfoo.so not found')\n", version="0.3")
    broken = [b for b in plugins.broken_plugins() if b.distribution == "fc-exploding"]
    assert len(broken) == 1
    assert broken[0].version == "0.3" and broken[0].plugin == "fc-exploding:main"
    assert "RuntimeError: boom: libfoo.so not found" in broken[0].error
    assert _components("heads") == heads_before  # the others keep working
    fake_dists.remove()
    assert not [b for b in plugins.broken_plugins() if b.distribution == "fc-exploding"]


def test_third_party_plugin_loads_with_its_distribution_and_version(fake_dists):
    fake_dists.add("fc-good", GOOD_MODULE.format(component="t-fake"), version="2.0.1")
    provider = plugins.registry("backbones").provider("t-fake")
    assert (provider.distribution, provider.version, provider.plugin) == ("fc-good", "2.0.1", "fc-good:main")
    assert facecore.create("backbones", "t-fake", embedding_size=3, width=5) == ("fake", 3, 5)


@pytest.mark.parametrize(
    "env, loads",
    [(None, True), ("", False), ("fc-good", True), ("FC_Good", True), ("other,fc-good", True), ("other", False)],
)
def test_facecore_load_plugins_chooses_third_party_plugins(fake_dists, load_plugins_env, env, loads):
    fake_dists.add("fc-good", GOOD_MODULE.format(component="t-fake"))
    bundled = {p["name"] for p in plugins.loaded_plugins() if p["distribution"] == "facecore"}
    load_plugins_env(env)
    assert ("t-fake" in _components("backbones")) is loads
    assert {p["name"] for p in plugins.loaded_plugins() if p["distribution"] == "facecore"} == bundled
    warned = [w for w in plugins.load_warnings() if "'other'" in w]
    assert bool(warned) is ("other" in (env or ""))


def test_changing_facecore_load_plugins_reloads_without_reset(fake_dists, monkeypatch):
    fake_dists.add("fc-good", GOOD_MODULE.format(component="t-fake"))
    assert "t-fake" in _components("backbones")
    monkeypatch.setenv(plugins.LOAD_ENV, "")
    assert "t-fake" not in _components("backbones")
    monkeypatch.delenv(plugins.LOAD_ENV)
    assert "t-fake" in _components("backbones")


def test_entry_point_with_unknown_hook_is_broken_and_unregistered(fake_dists):
    source = GOOD_MODULE.format(component="t-future") + (
        "\n@hookimpl\ndef register_losses(register):\n    pass\n"
    )
    fake_dists.add("fc-future", source)
    broken = [b for b in plugins.broken_plugins() if b.distribution == "fc-future"]
    assert len(broken) == 1 and "unknown hook 'register_losses'" in broken[0].error
    assert "another facecore version" in broken[0].error
    assert plugins.pm.get_plugin("fc-future:main") is None
    assert "t-future" not in _components("backbones")
    plugins.pm.check_pending()  # the manager is left consistent


def test_entry_point_with_misspelled_argument_is_broken(fake_dists):
    source = "from facecore import hookimpl\n\n@hookimpl\ndef register_heads(regster):\n    pass\n"
    fake_dists.add("fc-typo", source)
    broken = [b for b in plugins.broken_plugins() if b.distribution == "fc-typo"]
    assert len(broken) == 1 and "regster" in broken[0].error and "fc-typo:main" in broken[0].error
    assert "\n" not in broken[0].error
    assert plugins.pm.get_plugin("fc-typo:main") is None


def test_third_party_duplicate_of_an_in_test_name_names_both(fake_dists, register_plugin):
    fake_dists.add("fc-good", GOOD_MODULE.format(component="t-tiny"))
    register_plugin(TinyBackbones(), name="in-test")
    with pytest.raises(PluginError) as info:
        plugins.registry("backbones").get("t-tiny")
    assert "fc-good 1.2.3" in str(info.value) and "in-test" in str(info.value)


# --- create() ----------------------------------------------------------------------------


def test_create_validates_options_with_paths(register_plugin):
    register_plugin(TinyBackbones())
    with pytest.raises(ConfigError) as info:
        facecore.create("backbones", "t-tiny", embedding_size=4, width=0, depth=3)
    errors = info.value.errors
    assert any(e.startswith("t-tiny.width:") and "got 0" in e for e in errors), errors
    assert any(e.startswith("t-tiny.depth: unknown key") for e in errors), errors
    assert "backbone 't-tiny'" in str(info.value)


def test_create_passes_context_arguments_and_needs_them(register_plugin):
    register_plugin(TinyBackbones())
    assert facecore.create("backbones", "t-tiny", embedding_size=7, width=3) == ("tiny", 7, 3)
    with pytest.raises(TypeError, match="embedding_size"):
        facecore.create("backbones", "t-tiny")


def test_create_unknown_name_is_a_plugin_error(register_plugin):
    register_plugin(TinyBackbones())
    with pytest.raises(PluginError, match="did you mean 't-tiny'"):
        facecore.create("backbones", "t-tin", embedding_size=2)


def test_available_lists_sorted_names(register_plugin):
    register_plugin(TinyBackbones())
    names = facecore.available("backbones")
    assert "t-tiny" in names and names == sorted(names)


# --- the factory/schema contract ---------------------------------------------------------


def test_every_registered_component_keeps_the_factory_schema_contract():
    problems = [p for g in group_names() for n in _components(g) for p in contract_problems(plugins.registry(g).entries[n])]
    assert not problems, "\n".join(problems)


def _registration(group, factory, schema) -> Registration:
    return Registration(group, "t-x", factory, schema, "", Provider("p", "d", "1"))


@pytest.mark.parametrize(
    "group, factory, properties, required, expected",
    [
        ("heads", lambda scale=64.0: 0, {"scale": {"type": "number", "default": 32.0}}, [], "defaults to 32.0"),
        ("heads", lambda scale=64.0: 0, {}, [], "'scale' is not declared"),
        ("heads", lambda scale: 0, {"scale": {"type": "number"}}, [], "'required'"),
        ("heads", lambda: 0, {"scale": {"type": "number", "default": 1}}, [], "not an argument"),
        ("heads", lambda m=-1: 0, {"m": {"type": "number", "minimum": 0, "default": -1}}, [], "breaks its own schema"),
        ("heads", lambda flag=1: 0, {"flag": {"type": "boolean", "default": True}}, [], "defaults to True"),
        ("backbones", lambda width=1: 0, {"width": {"type": "integer", "default": 1}}, [], "'embedding_size'"),
    ],
)
def test_contract_problems_are_found(group, factory, properties, required, expected):
    schema = {"type": "object", "properties": properties, "required": required}
    problems = contract_problems(_registration(group, factory, schema))
    assert any(expected in p for p in problems), problems


def test_contract_accepts_context_arguments_and_tuple_defaults():
    def factory(embedding_size, layers=(3, 4), dropout=0.0):
        return None

    schema = {"type": "object", "properties": {
        "layers": {"type": "array", "default": [3, 4]}, "dropout": {"type": "number", "default": 0.0}}}
    assert contract_problems(_registration("backbones", factory, schema)) == []


# --- documentation meta-test -------------------------------------------------------------


def test_every_hook_is_documented_with_its_signature():
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    text = "\n".join(p.read_text() for p in docs if p.is_file())
    specs = [
        (name, func) for name, func in inspect.getmembers(hookspecs, inspect.isfunction)
        if hasattr(func, "facecore_spec")
    ]
    assert {name for name, _ in specs} == {f"register_{g}" for g in group_names()}
    missing = [f"{name}{inspect.signature(func)}" for name, func in specs
               if f"{name}{inspect.signature(func)}" not in text]
    assert not missing, f"hooks not documented in README.md or docs/*.md: {missing}"

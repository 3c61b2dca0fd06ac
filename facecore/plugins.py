"""The plugin manager: entry points loaded one by one, hooks called per plugin.

Every component, bundled or third-party, arrives through the ``facecore`` entry-point
group. A plugin that fails to import, misnames a hook or raises in its hook is recorded
as broken and the others keep working.
"""

from __future__ import annotations

import os
import re
from importlib import metadata
from typing import Any, Callable

import pluggy
from jsonschema import Draft202012Validator, SchemaError

from . import hookspecs
from .registry import GROUPS, BrokenPlugin, Provider, Registration, Registry

ENTRY_POINT_GROUP = "facecore"
LOAD_ENV = "FACECORE_LOAD_PLUGINS"
CORE_DISTRIBUTION = "facecore"

pm = pluggy.PluginManager("facecore")
pm.add_hookspecs(hookspecs)

_providers: dict[str, Provider] = {}  # pluggy plugin name -> provider, for entry-point plugins
_load_broken: list[BrokenPlugin] = []
_loaded = False
_cache: tuple[tuple, dict[str, Registry], list[BrokenPlugin]] | None = None


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _allowed_distributions() -> set[str] | None:
    """Third-party distributions allowed by FACECORE_LOAD_PLUGINS (None: all of them)."""
    value = os.environ.get(LOAD_ENV)
    if value is None:
        return None
    return {_norm(v) for v in value.split(",") if v.strip()}


def _entry_points() -> list[metadata.EntryPoint]:
    seen, unique = set(), []
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = ep.dist.metadata["Name"] if ep.dist else "?"
        key = (_norm(dist), ep.name, ep.value)
        if key not in seen:  # the same distribution can be visible twice on sys.path
            seen.add(key)
            unique.append(ep)
    return unique


def _register_module(module: Any, name: str, provider: Provider) -> None:
    """Register one plugin object and reject unknown hook names or arguments, naming it."""
    try:
        pm.register(module, name=name)
    except Exception as exc:  # pluggy's PluginValidationError for unknown arguments
        _load_broken.append(BrokenPlugin(name, provider.distribution, provider.version, _hook_error(exc)))
        return
    try:
        pm.check_pending()  # catches hooks this facecore does not know (misspelled or newer)
    except pluggy.PluginValidationError as exc:
        pm.unregister(module)
        _load_broken.append(BrokenPlugin(name, provider.distribution, provider.version, _hook_error(exc)))
        return
    _providers[name] = provider


def _hook_error(exc: Exception) -> str:
    known = ", ".join(f"register_{g}" for g in GROUPS)
    from . import __version__

    return (
        f"{exc} (facecore {__version__} knows the hooks {known}; the plugin may be written for "
        "another facecore version)"
    )


def load_plugins() -> None:
    """Load every permitted entry point once; idempotent."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    allowed = _allowed_distributions()
    for ep in _entry_points():
        dist = ep.dist.metadata["Name"] if ep.dist else "(unknown)"
        version = ep.dist.version if ep.dist else ""
        if _norm(dist) != CORE_DISTRIBUTION and allowed is not None and _norm(dist) not in allowed:
            continue
        name = f"{dist}:{ep.name}"
        provider = Provider(name, dist, version)
        try:
            module = ep.load()
        except Exception as exc:
            _load_broken.append(BrokenPlugin(name, dist, version, f"import failed: {type(exc).__name__}: {exc}"))
            continue
        _register_module(module, name, provider)


def _provider_of(plugin_name: str) -> Provider:
    return _providers.get(plugin_name, Provider(plugin_name, "(in-process)", ""))


def _collect() -> tuple[dict[str, Registry], list[BrokenPlugin]]:
    registries = {g: Registry(g) for g in GROUPS}
    broken = list(_load_broken)
    for group in GROUPS:
        caller = getattr(pm.hook, f"register_{group}")
        for impl in reversed(caller.get_hookimpls()):  # registration order
            provider = _provider_of(impl.plugin_name)
            register = _make_register(registries[group], provider)
            try:
                impl.function(**{arg: register for arg in impl.argnames})
            except Exception as exc:
                broken.append(
                    BrokenPlugin(
                        impl.plugin_name,
                        provider.distribution,
                        provider.version,
                        f"register_{group} raised {type(exc).__name__}: {exc}",
                    )
                )
    for registry in registries.values():
        for name, providers in registry.conflicts.items():
            first = providers[0]
            for other in providers[1:]:
                broken.append(
                    BrokenPlugin(
                        other.plugin,
                        other.distribution,
                        other.version,
                        f"{registry.group} name '{name}' is already registered by {first}",
                    )
                )
    return registries, broken


def _make_register(registry: Registry, provider: Provider) -> Callable[..., None]:
    def register(name: str, factory: Callable[..., Any], *, schema: dict | None = None, description: str = "") -> None:
        if not isinstance(name, str) or not name:
            raise TypeError(f"a {registry.group} name must be a non-empty string, got {name!r}")
        if not callable(factory):
            raise TypeError(f"{registry.group} '{name}': factory must be callable")
        if schema is not None:
            if not isinstance(schema, dict) or schema.get("type") != "object":
                raise TypeError(f"{registry.group} '{name}': schema must be a JSON object schema or None")
            try:
                Draft202012Validator.check_schema(schema)
            except SchemaError as exc:
                raise TypeError(f"{registry.group} '{name}': invalid options schema: {exc.message}") from None
        if name in registry.entries:
            registry.conflicts.setdefault(name, [registry.entries[name].provider]).append(provider)
            return
        registry.entries[name] = Registration(registry.group, name, factory, schema, description, provider)

    return register


def _state() -> tuple[dict[str, Registry], list[BrokenPlugin]]:
    global _cache
    load_plugins()
    key = tuple((pm.get_name(p), id(p)) for p in pm.get_plugins())
    if _cache is None or _cache[0] != key:
        registries, broken = _collect()
        _cache = (key, registries, broken)
    return _cache[1], _cache[2]


def registry(group: str) -> Registry:
    """The registry of one group (``backbones``, ``heads``, ...)."""
    if group not in GROUPS:
        from .errors import PluginError

        raise PluginError(f"unknown plugin group '{group}': groups are {', '.join(GROUPS)}")
    return _state()[0][group]


def broken_plugins() -> list[BrokenPlugin]:
    """Plugins that failed to import, register or validate, with the reason."""
    return list(_state()[1])

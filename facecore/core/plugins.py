"""The plugin manager: entry points loaded one by one, hooks called per plugin.

Every component, bundled or third-party, arrives through the ``facecore`` entry-point
group. A plugin that fails to import, names a hook this facecore does not know, takes a
hook argument the spec does not have, raises in its hook or claims a name another plugin
has is recorded as broken, and the others keep working.

An entry-point plugin with an unknown hook is unregistered again; an object registered
directly on ``pm`` is left registered (it is the caller's) but contributes nothing and is
listed as broken until the caller unregisters it.

State is module-level (``pm`` and the registries computed from it). Objects registered
directly on ``pm`` (tests, notebooks) count like entry-point plugins; the registries are
recomputed whenever the set of registered plugins changes, and the entry points are
reloaded when FACECORE_LOAD_PLUGINS changes. ``reset()`` forgets the entry-point plugins
so the next lookup loads them again (tests that change sys.path use it).
"""

from __future__ import annotations

import difflib
import os
import re
from importlib import metadata
from typing import Any, Callable

import pluggy
from jsonschema import Draft202012Validator, SchemaError

from ..errors import PluginError
from . import hookspecs
from .groups import group_names, group_spec
from .registry import BrokenPlugin, Provider, Registration, Registry

ENTRY_POINT_GROUP = "facecore"
LOAD_ENV = "FACECORE_LOAD_PLUGINS"
CORE_DISTRIBUTION = "facecore"

pm = pluggy.PluginManager("facecore")
pm.add_hookspecs(hookspecs)

_providers: dict[str, Provider] = {}  # pluggy plugin name -> provider, for entry-point plugins
_loaded_plugins: dict[str, Any] = {}  # pluggy plugin name -> object, registered by load_plugins
_load_broken: list[BrokenPlugin] = []
_load_warnings: list[str] = []
_loaded = False
_loaded_env: str | None = None  # the FACECORE_LOAD_PLUGINS value the loaded set was chosen with
_cache: tuple[tuple, list, dict[str, Registry], list[BrokenPlugin]] | None = None


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _allowed_distributions() -> set[str] | None:
    """Third-party distributions allowed by FACECORE_LOAD_PLUGINS (None: all of them)."""
    value = os.environ.get(LOAD_ENV)
    if value is None:
        return None
    return {_norm(v.strip()) for v in value.split(",") if v.strip()}


def _distribution(ep: metadata.EntryPoint) -> tuple[str, str]:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return "(unknown)", ""
    return dist.metadata["Name"] or "(unknown)", dist.version or ""


def _entry_points() -> list[metadata.EntryPoint]:
    """The group's entry points, each once: bundled first, then by distribution and name."""
    seen, unique = set(), []
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist, _ = _distribution(ep)
        key = (_norm(dist), ep.name)
        if key not in seen:  # the same distribution can be visible twice on sys.path
            seen.add(key)
            unique.append(ep)
    return sorted(unique, key=lambda ep: (_norm(_distribution(ep)[0]) != CORE_DISTRIBUTION,
                                          _norm(_distribution(ep)[0]), ep.name))


def _one_line(text: str) -> str:
    return "; ".join(line.strip() for line in str(text).splitlines() if line.strip())


def hook_names() -> tuple[str, ...]:
    """The ``register_<group>`` hooks of the groups in ``core/groups.py``."""
    return tuple(group_spec(g).hook for g in group_names())


def _version() -> str:
    try:
        return metadata.version(CORE_DISTRIBUTION)
    except metadata.PackageNotFoundError:  # a checkout on sys.path without its metadata
        return ""


def _hint() -> str:
    return (
        f"{f'facecore {_version()}'.strip()} has the hooks {', '.join(f'{h}(register)' for h in hook_names())}; "
        "the plugin may be written for another facecore version"
    )


def unknown_hooks(plugin: Any) -> list[str]:
    """Hook names ``plugin`` implements that have no spec here (misspelled or from a newer facecore).

    The per-plugin form of ``pm.check_pending()``: hooks marked ``optionalhook`` are allowed.
    """
    names = []
    for caller in pm.get_hookcallers(plugin) or []:
        if caller.has_spec():
            continue
        if any(i.plugin is plugin and not i.optionalhook for i in caller.get_hookimpls()):
            names.append(caller.name)
    return sorted(names)


def _unknown_hook_error(names: list[str]) -> str:
    parts = []
    for name in names:
        close = difflib.get_close_matches(name, hook_names(), n=1, cutoff=0.6)
        parts.append(f"'{name}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
    return f"unknown hook {', '.join(parts)}; {_hint()}"


def load_plugins() -> None:
    """Load every permitted entry point once; failures are recorded as broken.

    Idempotent while FACECORE_LOAD_PLUGINS keeps its value; when it changes, the
    entry-point plugins are reloaded (``reset()`` then load).
    """
    global _loaded, _loaded_env
    env = os.environ.get(LOAD_ENV)
    if _loaded and env == _loaded_env:
        return
    if _loaded:
        reset()
    _loaded, _loaded_env = True, env
    allowed = _allowed_distributions()
    matched: set[str] = set()
    for ep in _entry_points():
        dist, version = _distribution(ep)
        matched.add(_norm(dist))
        if _norm(dist) != CORE_DISTRIBUTION and allowed is not None and _norm(dist) not in allowed:
            continue
        name = f"{dist}:{ep.name}"
        try:
            obj = ep.load()
        except (Exception, SystemExit) as exc:
            error = f"importing {ep.value} failed: {type(exc).__name__}: {_one_line(exc)}"
            _load_broken.append(BrokenPlugin(name, dist, version, error))
            continue
        _register_loaded(obj, name, Provider(name, dist, version))
    for wanted in sorted((allowed or set()) - matched - {CORE_DISTRIBUTION}):
        _load_warnings.append(
            f"{LOAD_ENV} names '{wanted}', but no installed distribution by that name has facecore plugins"
        )


def _register_loaded(obj: Any, name: str, provider: Provider) -> None:
    """Register one entry-point object; reject bad hook arguments or names, naming the plugin."""
    try:
        pm.register(obj, name=name)
    except Exception as exc:  # PluginValidationError (unknown argument) or ValueError (registered twice)
        if pm.get_plugin(name) is obj:  # older pluggy can leave a plugin half registered
            pm.unregister(obj, name=name)
        error = _one_line(exc)
        if isinstance(exc, pluggy.PluginValidationError):
            error = f"{error}; {_hint()}"
        _load_broken.append(BrokenPlugin(name, provider.distribution, provider.version, error))
        return
    unknown = unknown_hooks(obj)
    if unknown:
        pm.unregister(obj, name=name)
        _load_broken.append(BrokenPlugin(name, provider.distribution, provider.version, _unknown_hook_error(unknown)))
        return
    _providers[name] = provider
    _loaded_plugins[name] = obj


def reset() -> None:
    """Unregister the entry-point plugins and drop cached registries; the next lookup reloads them.

    For tests and for a process that installed or removed distributions. Plugins registered
    directly on ``pm`` by the caller stay registered.
    """
    global _loaded, _loaded_env, _cache
    for name, obj in list(_loaded_plugins.items()):
        if pm.get_plugin(name) is obj:
            pm.unregister(obj, name=name)
    _loaded_plugins.clear()
    _providers.clear()
    _load_broken.clear()
    _load_warnings.clear()
    _loaded, _loaded_env = False, None
    _cache = None


def _provider_of(plugin_name: str) -> Provider:
    return _providers.get(plugin_name, Provider(plugin_name, "(in-process)", ""))


def _reject_unknown_hooks(plugins: list[tuple[str, Any]], broken: list[BrokenPlugin]) -> set[int]:
    """ids of registered plugins with unknown hooks (objects registered directly on pm land here)."""
    rejected = set()
    for name, plugin in plugins:
        unknown = unknown_hooks(plugin)
        if unknown:
            rejected.add(id(plugin))
            provider = _provider_of(name)
            broken.append(BrokenPlugin(name, provider.distribution, provider.version, _unknown_hook_error(unknown)))
    return rejected


def _conflicts(registries: dict[str, Registry]) -> list[BrokenPlugin]:
    out = []
    for group_registry in registries.values():
        for name, providers in group_registry.conflicts.items():
            first = providers[0]
            for other in providers[1:]:
                error = f"{group_registry.group} name '{name}' is registered by both {first} and {other}"
                out.append(BrokenPlugin(other.plugin, other.distribution, other.version, error))
    return out


def _collect() -> tuple[dict[str, Registry], list[BrokenPlugin]]:
    registries = {g: Registry(g) for g in group_names()}
    broken = list(_load_broken)
    plugins = [(n, p) for n, p in pm.list_name_plugin() if p is not None]
    order = {id(p): i for i, (_, p) in enumerate(plugins)}
    rejected = _reject_unknown_hooks(plugins, broken)
    for group in group_names():
        hook = group_spec(group).hook
        caller = getattr(pm.hook, hook, None)
        if caller is None or not caller.has_spec():
            raise PluginError(f"group '{group}' has no {hook} hook specification (core/hookspecs.py)")
        impls = sorted(caller.get_hookimpls(), key=lambda i: order.get(id(i.plugin), len(order)))
        for impl in impls:  # registration order: the first to claim a name keeps it
            if id(impl.plugin) in rejected:
                continue
            provider = _provider_of(impl.plugin_name)
            if impl.hookwrapper or impl.wrapper:
                broken.append(BrokenPlugin(impl.plugin_name, provider.distribution, provider.version,
                                           f"{hook} must be a plain hook implementation, not a wrapper"))
                continue
            staged: list[Registration] = []
            try:
                impl.function(**{arg: _make_register(group, provider, staged) for arg in impl.argnames})
            except Exception as exc:  # drop everything this hook registered before it failed
                error = f"{hook} raised {type(exc).__name__}: {_one_line(exc)}"
                broken.append(BrokenPlugin(impl.plugin_name, provider.distribution, provider.version, error))
                continue
            for reg in staged:
                _add(registries[group], reg)
    broken.extend(_conflicts(registries))
    for group_registry in registries.values():
        group_registry.broken = broken
    return registries, broken


def _add(registry: Registry, reg: Registration) -> None:
    if reg.name in registry.entries:
        registry.conflicts.setdefault(reg.name, [registry.entries[reg.name].provider]).append(reg.provider)
    else:
        registry.entries[reg.name] = reg


def _make_register(group: str, provider: Provider, staged: list[Registration]) -> Callable[..., None]:
    allowed = group_spec(group).declares

    def register(name: str, factory: Callable[..., Any], *, schema: dict | None = None, description: str = "",
                 **declared: Any) -> None:
        """Register ``factory`` under ``name`` with an options JSON Schema, a one-line description and the
        group's declarations (``declares`` of its spec: metrics' ``keys``, ...)."""
        if not isinstance(name, str) or not name.strip():
            raise TypeError(f"a {group} name must be a non-empty string, got {name!r}")
        if not callable(factory):
            raise TypeError(f"{group} '{name}': factory must be callable, got {type(factory).__name__}")
        if not isinstance(description, str):
            raise TypeError(f"{group} '{name}': description must be a string")
        if schema is not None:
            if not isinstance(schema, dict) or schema.get("type") != "object":
                raise TypeError(f"{group} '{name}': schema must be a JSON Schema with \"type\": \"object\", or None")
            try:
                Draft202012Validator.check_schema(schema)
            except SchemaError as exc:
                raise TypeError(f"{group} '{name}': invalid options schema: {exc.message}") from None
        unknown = sorted(set(declared) - set(allowed))
        if unknown:
            takes = f"; {group} declare {', '.join(allowed)}" if allowed else ""
            raise TypeError(f"{group} '{name}': unknown register() argument {', '.join(unknown)}{takes}")
        staged.append(Registration(group, name, factory, schema, description, provider, dict(declared)))

    return register


def _state() -> tuple[dict[str, Registry], list[BrokenPlugin]]:
    global _cache
    load_plugins()
    plugins = pm.list_name_plugin()
    key = (group_names(), *((name, id(p)) for name, p in plugins))  # a group added (tests) recomputes too
    if _cache is None or _cache[0] != key:
        registries, broken = _collect()
        _cache = (key, plugins, registries, broken)  # holding the objects keeps their ids unique
    return _cache[2], _cache[3]


def registry(group: str) -> Registry:
    """The registry of one group (``backbones``, ``heads``, ...; see ``core/groups.py``)."""
    group_spec(group)  # PluginError for an unknown group
    return _state()[0][group]


def broken_plugins() -> list[BrokenPlugin]:
    """Plugins that failed to import, register or validate, with the reason."""
    return list(_state()[1])


def registered_directly() -> list[tuple[str, Any]]:
    """(name, object) of the plugins registered on ``pm`` by callers, not loaded from entry points."""
    return [(n, p) for n, p in pm.list_name_plugin() if p is not None and _loaded_plugins.get(n) is not p]


def load_warnings() -> list[str]:
    """Notes about plugin loading that are not a broken plugin (FACECORE_LOAD_PLUGINS typos)."""
    load_plugins()
    return list(_load_warnings)


def loaded_plugins() -> list[dict[str, Any]]:
    """Each registered plugin: pluggy name, distribution, version and the hooks it implements."""
    _state()
    out = []
    for name, plugin in pm.list_name_plugin():
        if plugin is None:
            continue
        provider = _provider_of(name)
        hooks = sorted(c.name for c in pm.get_hookcallers(plugin) or [])
        out.append({"name": name, "distribution": provider.distribution, "version": provider.version, "hooks": hooks})
    return sorted(out, key=lambda p: (p["distribution"], p["name"]))

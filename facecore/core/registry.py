"""Component registries: what each plugin registered, who provided it, and lookups by name."""

from __future__ import annotations

import difflib
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from ..errors import PluginError
from .groups import group_spec

@dataclass(frozen=True)
class Provider:
    """The plugin module and the distribution (name, version) it came from."""

    plugin: str
    distribution: str
    version: str

    def __str__(self) -> str:
        return f"{self.distribution} {self.version}".strip() + f" (plugin {self.plugin})"


@dataclass(frozen=True)
class Registration:
    """One registered component: its name, factory, options schema and description."""

    group: str
    name: str
    factory: Callable[..., Any]
    schema: dict | None
    description: str
    provider: Provider
    declared: Mapping[str, Any] = field(default_factory=dict)  # the group's extra declarations (metric keys)

    @property
    def options(self) -> dict:
        """The option properties the factory accepts (empty when it takes none)."""
        return dict((self.schema or {}).get("properties", {}))

    def config_options(self) -> tuple[dict, list[str]]:
        """(properties, required) of the options a config gives: the schema's, less the group's context arguments."""
        context = group_spec(self.group).context_args
        props = {k: v for k, v in self.options.items() if k not in context}
        required = [k for k in (self.schema or {}).get("required", []) if k not in context]
        return props, required


@dataclass(frozen=True)
class BrokenPlugin:
    """A plugin that could not be loaded or whose hook failed, with the reason."""

    plugin: str
    distribution: str
    version: str
    error: str


@dataclass
class Registry:
    """The components of one group, by name; ``conflicts`` holds names claimed more than once."""

    group: str
    entries: dict[str, Registration] = field(default_factory=dict)
    conflicts: dict[str, list[Provider]] = field(default_factory=dict)
    broken: list[BrokenPlugin] = field(default_factory=list)

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self.entries)

    def __contains__(self, name: object) -> bool:
        return name in self.entries

    def provider(self, name: str) -> Provider:
        """Which plugin and distribution (name, version) registered ``name``."""
        return self.get(name).provider

    def suggest(self, name: str) -> str:
        """A 'did you mean' clause plus the installed names, for error messages."""
        close = difflib.get_close_matches(str(name), self.names(), n=1, cutoff=0.6)
        hint = f"did you mean '{close[0]}'? " if close else ""
        installed = ", ".join(self.names()) or "none"
        return f"{hint}installed {self.group}: {installed}"

    def get(self, name: str) -> Registration:
        """The registration of ``name``; PluginError when unknown or claimed by two plugins."""
        if name in self.conflicts:
            who = " and ".join(str(p) for p in self.conflicts[name])
            raise PluginError(
                f"{group_spec(self.group).singular} '{name}' is registered by both {who}; uninstall one of "
                "them or leave one out with FACECORE_LOAD_PLUGINS"
            )
        try:
            return self.entries[name]
        except KeyError:
            broken = ""
            if self.broken:
                broken = (
                    f" ({len(self.broken)} plugin(s) failed to load; "
                    "'facecore list-plugins' shows why)"
                )
            raise PluginError(
                f"unknown {group_spec(self.group).singular} '{name}': {self.suggest(name)}. "
                f"If it comes from a plugin, is that plugin installed?{broken}"
            ) from None


def _same_default(schema_default: Any, factory_default: Any) -> bool:
    if isinstance(factory_default, tuple):
        factory_default = list(factory_default)
    if isinstance(schema_default, bool) or isinstance(factory_default, bool):
        return type(schema_default) is type(factory_default) and schema_default == factory_default
    return schema_default == factory_default


def factory_parameters(factory: Callable[..., Any]) -> Mapping[str, inspect.Parameter] | None:
    """The parameters of a factory's signature; None when it cannot be inspected (a C callable)."""
    try:
        return inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return None


def accepts(reg: Registration, arg: str) -> bool:
    """Whether the factory takes the keyword ``arg`` (by name or ``**kwargs``); True when not introspectable."""
    params = factory_parameters(reg.factory)
    if params is None:
        return True
    return arg in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def missing_context(reg: Registration, context: Mapping[str, Any]) -> list[str]:
    """Context arguments of the group the factory needs (no default) that ``context`` lacks."""
    params = factory_parameters(reg.factory)
    if params is None:
        return []
    return [k for k in group_spec(reg.group).context_args
            if k not in context and k in params and params[k].default is inspect.Parameter.empty]


def contract_problems(reg: Registration) -> list[str]:
    """Mismatches between a factory's signature and its options schema (empty when they agree).

    The core passes a factory its context arguments plus the schema's options, so every
    other factory argument must be a schema option whose ``default`` equals the factory's
    default (or be listed in ``required``), and every option must be a factory argument.
    """
    from jsonschema import Draft202012Validator

    spec = group_spec(reg.group)
    where = f"{spec.singular} '{reg.name}' ({reg.provider})"
    params = factory_parameters(reg.factory)
    if params is None:
        return []  # not introspectable (a C callable): nothing to compare
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    named = {n: p for n, p in params.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    context = spec.context_args
    options = {k: v for k, v in reg.options.items() if k not in context}
    required = set((reg.schema or {}).get("required", []))
    problems = []
    for arg in spec.required_context_args:
        if arg not in named and not takes_any:
            problems.append(f"{where}: the factory must accept '{arg}' (passed by the core)")
    for name, param in named.items():
        if name in context:
            continue
        if name not in options:
            if param.default is param.empty:
                problems.append(f"{where}: factory argument '{name}' has no default and is not in the schema")
            else:
                problems.append(f"{where}: factory argument '{name}' is not declared in the schema")
            continue
        sub = options[name]
        if param.default is param.empty:
            if name not in required:
                problems.append(f"{where}: option '{name}' has no factory default, so the schema must list it in 'required'")
        elif "default" not in sub:
            problems.append(f"{where}: option '{name}' needs \"default\": {param.default!r} in the schema")
        elif not _same_default(sub["default"], param.default):
            problems.append(
                f"{where}: option '{name}' defaults to {sub['default']!r} in the schema but "
                f"{param.default!r} in the factory"
            )
    for name, sub in options.items():
        if name not in named and not takes_any:
            problems.append(f"{where}: schema option '{name}' is not an argument of the factory")
        if isinstance(sub, dict) and "default" in sub:
            for err in Draft202012Validator(sub).iter_errors(sub["default"]):
                problems.append(f"{where}: the default of option '{name}' breaks its own schema: {err.message}")
    return problems

"""Component registries: what each plugin registered, who provided it, and lookups by name."""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any, Callable

from .errors import PluginError

GROUPS: tuple[str, ...] = ("backbones", "heads", "datasets", "schedulers", "metrics")

# Arguments the core itself always passes to a group's factories; they are part of
# the group's contract, not options, so they are not validated by the plugin's schema.
CONTEXT_ARGS: dict[str, tuple[str, ...]] = {
    "backbones": ("embedding_size",),
    "heads": (),
    "datasets": ("train",),
    "schedulers": ("optimizer", "steps_per_epoch", "epochs", "warmup_epochs"),
    "metrics": (),
}

SINGULAR = {
    "backbones": "backbone",
    "heads": "head",
    "datasets": "dataset",
    "schedulers": "scheduler",
    "metrics": "metric",
}


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

    @property
    def options(self) -> dict:
        """The option properties the factory accepts (empty when it takes none)."""
        return dict((self.schema or {}).get("properties", {}))


@dataclass(frozen=True)
class BrokenPlugin:
    """A plugin that could not be loaded or whose hook failed, with the reason."""

    plugin: str
    distribution: str
    version: str
    error: str


@dataclass
class Registry:
    """The components of one group, by name."""

    group: str
    entries: dict[str, Registration] = field(default_factory=dict)
    conflicts: dict[str, list[Provider]] = field(default_factory=dict)

    def names(self) -> list[str]:
        return sorted(self.entries)

    def __contains__(self, name: object) -> bool:
        return name in self.entries

    def suggest(self, name: str) -> str:
        """A 'did you mean' clause plus the installed names, for error messages."""
        close = difflib.get_close_matches(name, self.names(), n=1, cutoff=0.6)
        hint = f"did you mean '{close[0]}'? " if close else ""
        installed = ", ".join(self.names()) or "none"
        return f"{hint}installed {self.group}: {installed}"

    def get(self, name: str) -> Registration:
        if name in self.conflicts:
            who = " and ".join(str(p) for p in self.conflicts[name])
            raise PluginError(
                f"{SINGULAR[self.group]} '{name}' is registered by both {who}; uninstall one of "
                "them or leave one out with FACECORE_LOAD_PLUGINS"
            )
        try:
            return self.entries[name]
        except KeyError:
            raise PluginError(
                f"unknown {SINGULAR[self.group]} '{name}': {self.suggest(name)}. "
                "If it comes from a plugin, is that plugin installed?"
            ) from None

"""Config loading: YAML + ``--set`` overrides + defaults, validated against the composed schema.

The core schema (schemas/config.schema.json) is extended at run time with the options
schema of each plugin the config selects, so one validation pass reports every problem,
core keys and plugin options alike, each with its dotted path.
"""

from __future__ import annotations

import copy
import json
from importlib import resources
from pathlib import Path
from typing import Any, Iterable

import yaml

from .errors import ConfigError, PluginError
from .registry import CONTEXT_ARGS, Registration
from .validation import dotted, fill_defaults, schema_errors

# Sections whose keys are core keys plus the options of the plugin that a key names.
SECTION_SLOTS: tuple[tuple[str, str, str], ...] = (
    ("model", "backbone", "backbones"),
    ("head", "type", "heads"),
    ("data", "type", "datasets"),
)
# Values that are a plugin name or {name: ..., option: value}; ``many`` for lists of them.
SPEC_SLOTS: tuple[tuple[str, str, str, bool], ...] = (
    ("training", "scheduler", "schedulers", False),
    ("eval", "metrics", "metrics", True),
)
# Values that only name a plugin.
NAME_SLOTS: tuple[tuple[str, str, str], ...] = (("eval", "dataset", "datasets"),)


def core_schema() -> dict:
    """The core keys' schema as shipped in schemas/config.schema.json."""
    text = resources.files("facecore_schemas").joinpath("config.schema.json").read_text()
    return json.loads(text)


def read_yaml(path: str | Path) -> dict:
    """Read a YAML mapping, with one clear error for a missing, unreadable or malformed file."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError([f"config file not found: {path} (check the --config path)"], str(path)) from None
    except OSError as exc:
        raise ConfigError([f"cannot read config file {path}: {exc.strerror}"], str(path)) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([f"{path} is not valid YAML{where}: {problem}"], str(path)) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([f"(top level): the config must be a mapping of keys, got {type(data).__name__}"], str(path))
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """``'training.lr=0.05'`` -> (['training', 'lr'], 0.05); values are YAML scalars."""
    if "=" not in text:
        raise ConfigError([f"override '{text}' must look like key.path=value, e.g. training.lr=0.05"])
    key, _, raw = text.partition("=")
    keys = [k.strip() for k in key.strip().split(".")]
    if not all(keys):
        raise ConfigError([f"override '{text}': the key path '{key}' has an empty part"])
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw  # not valid YAML: take it as a plain string and let the schema judge it
    return keys, value


def apply_overrides(config: dict, overrides: Iterable[str]) -> dict:
    """Set each ``key.path=value`` in a copy of ``config``, creating sections as needed."""
    config = copy.deepcopy(config)
    errors = []
    for text in overrides:
        keys, value = parse_override(text)
        node = config
        for i, key in enumerate(keys[:-1]):
            child = node.get(key)
            if child is None:
                child = node[key] = {}
            if not isinstance(child, dict):
                errors.append(f"override '{text}': {'.'.join(keys[: i + 1])} is {child!r}, not a section")
                break
            node = child
        else:
            node[keys[-1]] = value
    if errors:
        raise ConfigError(errors)
    return config


def _lookup(group: str, name: str, path: str, errors: list[str]) -> Registration | None:
    from .plugins import registry

    try:
        return registry(group).get(name)
    except PluginError as exc:
        errors.append(f"{path}: {exc}")
        return None


def _plugin_properties(reg: Registration) -> tuple[dict, list[str]]:
    context = CONTEXT_ARGS[reg.group]
    props = {k: v for k, v in reg.options.items() if k not in context}
    required = [k for k in (reg.schema or {}).get("required", []) if k not in context]
    return props, required


def _extend_section(section_schema: dict, reg: Registration) -> None:
    props, required = _plugin_properties(reg)
    own = section_schema.setdefault("properties", {})
    for key, sub in props.items():
        if key in own:  # a core key the plugin also takes: both schemas apply
            merged = {"allOf": [own[key], sub]}
            default = sub.get("default", own[key].get("default"))
            if default is not None or "default" in sub:
                merged["default"] = default
            own[key] = merged
        else:
            own[key] = sub
    section_schema["required"] = sorted(set(section_schema.get("required", [])) | set(required))


def _spec_schema(reg: Registration) -> dict:
    props, required = _plugin_properties(reg)
    return {
        "type": "object",
        "properties": {"name": {"type": "string"}, **props},
        "required": ["name", *required],
        "additionalProperties": False,
    }


def compose_schema(config: dict) -> tuple[dict, list[str]]:
    """The core schema extended with the options of every plugin ``config`` selects.

    Returns the schema and the errors about plugin names (unknown, conflicting).
    """
    schema = core_schema()
    errors: list[str] = []
    props = schema["properties"]
    for section, key, group in SECTION_SLOTS:
        node = config.get(section)
        if not isinstance(node, dict) or not isinstance(node.get(key), str):
            continue
        reg = _lookup(group, node[key], f"{section}.{key}", errors)
        if reg is None:
            props[section]["additionalProperties"] = True  # no cascade of unknown-key errors
        else:
            _extend_section(props[section], reg)
    for section, key, group, many in SPEC_SLOTS:
        node = config.get(section)
        if not isinstance(node, dict) or key not in node:
            continue
        values = node[key] if many else [node[key]]
        if not isinstance(values, list):
            continue
        item_schemas = []
        for i, spec in enumerate(values):
            path = f"{section}.{key}[{i}]" if many else f"{section}.{key}"
            name = spec if isinstance(spec, str) else spec.get("name") if isinstance(spec, dict) else None
            reg = _lookup(group, name, path, errors) if isinstance(name, str) else None
            if reg is None:
                item_schemas.append({})
            elif isinstance(spec, dict):
                item_schemas.append(_spec_schema(reg))
            else:
                _, required = _plugin_properties(reg)
                if required:
                    errors.append(f"{path}: {group[:-1]} '{name}' needs the options {', '.join(required)}; "
                                  f"write it as {{name: {name}, {required[0]}: ...}}")
                item_schemas.append({"type": "string"})
        target = props[section]["properties"]
        if many:
            target[key] = {**target[key], "prefixItems": item_schemas}
        else:
            target[key] = {**item_schemas[0], "default": target[key].get("default")} if item_schemas[0] else target[key]
    for section, key, group in NAME_SLOTS:
        node = config.get(section)
        if isinstance(node, dict) and isinstance(node.get(key), str):
            _lookup(group, node[key], f"{section}.{key}", errors)
    return schema, errors


def validate_config(config: dict, source: str | None = None) -> dict:
    """Fill defaults and validate; raise ConfigError listing every problem, or return the effective config."""
    config = copy.deepcopy(config)
    fill_defaults(core_schema(), config)  # core defaults first: they may name plugins (data.type, ...)
    schema, errors = compose_schema(config)
    fill_defaults(schema, config)
    errors = errors + schema_errors(schema, config)
    if errors:
        raise ConfigError(sorted(set(errors), key=errors.index), source)
    return config


def load_config(path: str | Path, overrides: Iterable[str] = ()) -> dict:
    """Read a YAML config, apply ``key=value`` overrides, fill defaults and validate it."""
    raw = read_yaml(path)
    return validate_config(apply_overrides(raw, overrides), str(path))


def spec_name_options(spec: str | dict) -> tuple[str, dict]:
    """A ``name`` or ``{name: ..., **options}`` value split into name and options."""
    if isinstance(spec, str):
        return spec, {}
    options = dict(spec)
    return options.pop("name"), options


def section_options(section: dict, reg: Registration) -> dict:
    """The keys of a config section that the plugin's schema declares: its options."""
    declared = reg.options
    return {k: v for k, v in section.items() if k in declared and k not in CONTEXT_ARGS[reg.group]}


def dump_config(config: dict) -> str:
    """YAML text of a config, keys in schema order."""
    return yaml.safe_dump(config, sort_keys=False, default_flow_style=None)


__all__ = [
    "apply_overrides",
    "compose_schema",
    "core_schema",
    "dotted",
    "dump_config",
    "load_config",
    "parse_override",
    "read_yaml",
    "section_options",
    "spec_name_options",
    "validate_config",
]

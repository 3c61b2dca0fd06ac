"""Config loading: YAML + ``--set`` overrides + defaults, validated against the composed schema.

The core schema is schemas/config.schema.json plus the keys that name plugins, taken from the
group table (``core/groups.py``). At run time each such key is extended with the options schema
of the plugin the config names, so one validation pass reports every problem, core keys and
plugin options alike, each with its dotted path.
"""

from __future__ import annotations

import copy
import functools
import json
import re
from importlib import resources
from pathlib import Path
from typing import Any, Iterable

import yaml

from ..errors import ConfigError, PluginError
from .groups import Slot, group_spec, slots
from .registry import Registration, accepts
from .validation import dotted, fill_defaults, schema_errors

class ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader, plus ``1e-3`` read as a float (YAML 1.2) and duplicate keys rejected.

    YAML 1.1 reads ``5e-4`` as the string "5e-4", a classic trap in learning-rate configs.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
            except TypeError:  # an unhashable key: SafeLoader reports it
                continue
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    "while reading a mapping", node.start_mark, f"found the key {key!r} twice", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


MAX_DEPTH = 64  # far deeper than any config; PyYAML's parser and composer recurse per level


def yaml_load(text: str) -> Any:
    """Parse YAML text with :class:`ConfigLoader` (safe: plain data only).

    A document nested deeper than MAX_DEPTH (``{{{{...``) is a YAMLError like any other
    malformed text, not a RecursionError from deep inside the parser.
    """
    try:
        data = yaml.load(text, Loader=ConfigLoader)  # noqa: S506 - ConfigLoader is a SafeLoader
    except RecursionError:
        data = None
        depth = MAX_DEPTH + 1
    else:
        depth = _depth(data)
    if depth > MAX_DEPTH:
        raise yaml.YAMLError(f"it is nested more than {MAX_DEPTH} levels deep; a config has a few levels of sections")
    return data


def _depth(value: Any) -> int:
    """Nesting depth of lists and mappings, counted without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            children = list(item.values())
        elif isinstance(item, list):
            children = item
        else:
            continue
        deepest = max(deepest, level)
        if level > MAX_DEPTH:
            break
        stack.extend((child, level + 1) for child in children)
    return deepest


@functools.lru_cache(maxsize=1)
def _core_schema_text() -> str:
    return resources.files("facecore_schemas").joinpath("config.schema.json").read_text()


def core_schema() -> dict:
    """The core keys' schema: schemas/config.schema.json plus every group's slots (a fresh copy each call)."""
    schema = json.loads(_core_schema_text())
    for _, slot in slots():
        _add_slot(schema, slot)
    return schema


def _add_slot(schema: dict, slot: Slot) -> None:
    """Put a slot's key into its section of the core schema (a missing section is created)."""
    node = schema
    for part in slot.section.split("."):
        props = node.setdefault("properties", {})
        if part not in props:
            props[part] = {"type": "object", "default": {}, "additionalProperties": False, "properties": {}}
        node = props[part]
    props = node.setdefault("properties", {})
    items = [(k, v) for k, v in props.items() if k != slot.key]
    if slot.after in props:
        at = [k for k, _ in items].index(slot.after) + 1
    else:
        at = 0 if slot.kind == "section" else len(items)
    items.insert(at, (slot.key, slot.fragment()))
    node["properties"] = dict(items)
    if slot.required:
        node["required"] = sorted({*node.get("required", []), slot.key})


def read_yaml(path: str | Path) -> dict:
    """Read a YAML mapping, with one clear error for a missing, unreadable or malformed file."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError([f"{path} is a folder; --config takes a YAML file (e.g. configs/resnet50.yaml)"], str(path))
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([f"config file not found: {path} (check the --config path)"], str(path)) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{path} is not a UTF-8 text file (byte {exc.start}); is it really the YAML config?"],
                          str(path)) from None
    except OSError as exc:
        raise ConfigError([f"cannot read config file {path}: {exc.strerror or exc}"], str(path)) from None
    try:
        data = yaml_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([f"{path} is not valid YAML{where}: {problem}"], str(path)) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        kind = "a list" if isinstance(data, list) else f"a single value ({data!r})"
        raise ConfigError(
            [f"(top level): the config must be a mapping of sections (model:, head:, data:, ...), got {kind}"],
            str(path),
        )
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """``'training.lr=0.05'`` -> (['training', 'lr'], 0.05); the value is read as a YAML scalar.

    Only the first ``=`` splits, so values may contain ``=``; an empty value is null; text
    that is not valid YAML (``[1,2``) is kept as a string for the schema to judge.
    """
    if "=" not in text:
        raise ConfigError([f"override '{text}' must look like key.path=value, e.g. training.lr=0.05"])
    key, _, raw = text.partition("=")
    keys = [k.strip() for k in key.strip().split(".")]
    if not all(keys):
        raise ConfigError([f"override '{text}': the key path '{key}' has an empty part"])
    try:
        value = yaml_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw  # not valid YAML: take it as a plain string and let the schema judge it
    return keys, value


def apply_overrides(config: dict, overrides: Iterable[str]) -> dict:
    """Set each ``key.path=value`` in a copy of ``config``, creating sections as needed.

    Raises ConfigError listing every malformed override at once.
    """
    config = copy.deepcopy(config)
    errors = []
    for text in overrides:
        try:
            keys, value = parse_override(text)
        except ConfigError as exc:
            errors.extend(exc.errors)
            continue
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
        raise ConfigError(errors, "the --set overrides")
    return config


def _lookup(group: str, name: str, path: str, errors: list[str]) -> Registration | None:
    from .plugins import registry

    try:
        return registry(group).get(name)
    except PluginError as exc:
        errors.append(f"{path}: {exc}")
        return None


# Whole-object constraints of a plugin schema that still apply once its properties are merged.
_OBJECT_KEYWORDS = ("allOf", "anyOf", "oneOf", "not", "if", "then", "else", "dependentRequired",
                    "dependentSchemas", "minProperties", "maxProperties")


def _object_constraints(reg: Registration) -> dict:
    return {k: v for k, v in (reg.schema or {}).items() if k in _OBJECT_KEYWORDS}


def _extend_section(section_schema: dict, reg: Registration) -> None:
    props, required = reg.config_options()
    own = section_schema.setdefault("properties", {})
    for key, sub in props.items():
        if key in own and isinstance(sub, dict):  # a core key the plugin also takes: both schemas apply
            merged = {"allOf": [own[key], sub]}
            about = sub.get("description") or own[key].get("description")
            if about:
                merged["description"] = about
            default = sub.get("default", own[key].get("default"))
            if default is not None or "default" in sub:
                merged["default"] = default
            own[key] = merged
        else:
            own[key] = sub
    section_schema["required"] = sorted(set(section_schema.get("required", [])) | set(required))
    extra = _object_constraints(reg)
    if extra:
        section_schema.setdefault("allOf", []).append(extra)


def _spec_schema(reg: Registration, core_keys: dict) -> dict:
    props, required = reg.config_options()
    return {
        "type": "object",
        "properties": {"name": {"type": "string"}, **props, **core_keys},
        "required": ["name", *required],
        "additionalProperties": False,
        **_object_constraints(reg),
    }


def _node(tree: Any, dotted_path: str, schema: bool = False) -> Any:
    """The value (or, with ``schema``, the schema) at a dotted section path; None when absent."""
    for part in dotted_path.split(".") if dotted_path else []:
        if not isinstance(tree, dict):
            return None
        tree = tree.get("properties", {}).get(part) if schema else tree.get(part)
    return tree


def _compose_sections(config: dict, props: dict, errors: list[str]) -> None:
    for spec, slot in slots():
        if slot.kind != "section":
            continue
        node, target = _node(config, slot.section), _node({"properties": props}, slot.section, schema=True)
        if not isinstance(node, dict) or target is None:
            continue
        if not isinstance(node.get(slot.key), str):  # reported by the schema; other keys cannot be judged
            target["additionalProperties"] = True
            continue
        reg = _lookup(spec.name, node[slot.key], slot.path, errors)
        if reg is not None and not all(accepts(reg, arg) for arg in spec.context_args):
            errors.append(_wrong_role(slot, reg))
            reg = None
        if reg is None:
            target["additionalProperties"] = True  # no cascade of unknown-key errors
        else:
            _extend_section(target, reg)


def _wrong_role(slot: Slot, reg: Registration) -> str:
    """A plugin named in a slot whose context arguments its factory does not take (a pair set as data.type)."""
    from .plugins import registry

    spec = group_spec(reg.group)
    group = registry(reg.group)
    missing = [arg for arg in spec.context_args if not accepts(reg, arg)]
    fits = [n for n in group.names() if all(accepts(group.entries[n], a) for a in spec.context_args)]
    args = ", ".join(f"'{a}'" for a in missing)
    what = (f"is not a training set (its factory takes no {args} argument; pair and template sets belong under eval)"
            if reg.group == "datasets" else f"cannot be used here: its factory takes no {args} argument")
    return f"{slot.path}: {spec.singular} '{reg.name}' {what}; these fit: {', '.join(fits) or 'none installed'}"


def _compose_specs(config: dict, props: dict, errors: list[str]) -> None:
    for spec, slot in slots():
        if slot.kind not in ("one", "many"):
            continue
        many = slot.kind == "many"
        node, section = _node(config, slot.section), _node({"properties": props}, slot.section, schema=True)
        if not isinstance(node, dict) or slot.key not in node or section is None:
            continue
        values = node[slot.key] if many else [node[slot.key]]
        if not isinstance(values, list):
            continue
        item_schemas = []
        for i, entry in enumerate(values):
            path = f"{slot.path}[{i}]" if many else slot.path
            name = entry if isinstance(entry, str) else entry.get("name") if isinstance(entry, dict) else None
            reg = _lookup(spec.name, name, path, errors) if isinstance(name, str) else None
            if reg is None:
                item_schemas.append({})
            elif isinstance(entry, dict):
                item_schemas.append(_spec_schema(reg, dict(slot.core_keys)))
            else:
                _, required = reg.config_options()
                if required:
                    errors.append(f"{path}: {spec.singular} '{name}' needs the options {', '.join(required)}; "
                                  f"write it as {{name: {name}, {required[0]}: ...}}")
                item_schemas.append({"type": "string"})
        target = section["properties"]
        if many:  # prefixItems replaces items for the first len(values) entries: keep the generic check
            generic = target[slot.key].get("items", {})
            item_schemas = [s or generic for s in item_schemas]
            target[slot.key] = {**target[slot.key], "prefixItems": item_schemas}
        elif item_schemas[0]:
            target[slot.key] = {**item_schemas[0], "default": target[slot.key].get("default")}


def reader_problem(slot: Slot, reg: Registration) -> str | None:
    """Why the component ``reg`` cannot fill a ``name`` slot (it lacks an option the slot needs), or None."""
    from .plugins import registry

    lacking = [n for n in slot.needs if n not in reg.options]
    if not lacking:
        return None
    group = registry(reg.group)
    readers = [n for n in group.names() if set(slot.needs) <= set(group.entries[n].options)]
    options = " and ".join(f"'{n}'" for n in slot.needs) + (" option" if len(slot.needs) == 1 else " options")
    return (f"{slot.path}: {group_spec(reg.group).singular} '{reg.name}' does not read {slot.role}s (it has no "
            f"{options}); {slot.role.replace(' ', '-')} readers: {', '.join(readers) or 'none installed'}")


def _check_readers(config: dict, errors: list[str]) -> None:
    """Each checked ``name`` slot names a component that has the options the slot needs."""
    for spec, slot in slots():
        if slot.kind != "name" or not slot.checked:
            continue
        node = _node(config, slot.section)
        if not isinstance(node, dict) or not isinstance(node.get(slot.key), str):
            continue
        reg = _lookup(spec.name, node[slot.key], slot.path, errors)
        problem = reg and reader_problem(slot, reg)
        if problem:
            errors.append(problem)


def compose_schema(config: dict) -> tuple[dict, list[str]]:
    """The core schema extended with the options of every plugin ``config`` selects.

    Returns the schema and the errors about plugin names (unknown, conflicting).
    """
    schema = core_schema()
    errors: list[str] = []
    props = schema["properties"]
    _compose_sections(config, props, errors)
    _compose_specs(config, props, errors)
    _check_readers(config, errors)
    return schema, errors


def _empty_sections(config: dict, schema: dict) -> None:
    """``head:`` with every key commented out is YAML null: read it as an empty section."""
    for key, sub in schema.get("properties", {}).items():
        if config.get(key, 0) is None and isinstance(sub, dict) and sub.get("type") == "object":
            config[key] = {}


def _schema_order(value: Any, schema: Any) -> Any:
    """``value`` with mapping keys in the schema's order (unknown keys last), recursively."""
    if not isinstance(value, dict) or not isinstance(schema, dict):
        return value
    props = dict(schema.get("properties", {}))
    for sub in schema.get("allOf", []):
        if isinstance(sub, dict):
            props.update({k: v for k, v in sub.get("properties", {}).items() if k not in props})
    keys = [k for k in props if k in value] + [k for k in value if k not in props]
    return {k: _schema_order(value[k], props.get(k)) for k in keys}


def _override_paths(overrides: Iterable[str]) -> list[tuple[str, str]]:
    out = []
    for text in overrides:
        key = text.partition("=")[0]
        out.append((".".join(k.strip() for k in key.strip().split(".")), text))
    return out


def _within(path: str, ancestor: str) -> bool:
    return path == ancestor or path.startswith(ancestor + ".") or path.startswith(ancestor + "[")


def _mark_overrides(errors: list[str], overrides: Iterable[str]) -> list[str]:
    """Append ``(from --set k=v)`` to the errors about keys an override set (or the unknown key it added)."""
    paths = _override_paths(overrides)
    marked = []
    for line in errors:
        where, _, message = line.partition(": ")
        for path, text in paths:
            if path and (_within(where, path) or (_within(path, where) and message.startswith("unknown key"))):
                line = f"{line} (from --set {text})"
                break
        marked.append(line)
    return marked


def validate_config(config: dict, source: str | None = None, overrides: Iterable[str] = ()) -> dict:
    """Fill defaults and validate; raise ConfigError listing every problem, or return the effective config.

    ``overrides`` (the ``--set`` texts already applied to ``config``) only label the errors
    they caused.
    """
    if not isinstance(config, dict):
        raise ConfigError([f"(top level): the config must be a mapping of sections, got {type(config).__name__}"],
                          source)
    config = copy.deepcopy(config)
    core = core_schema()
    _empty_sections(config, core)
    fill_defaults(core, config)  # core defaults first: they may name plugins (data.type, ...)
    _apply_switches(config)
    schema, errors = compose_schema(config)
    fill_defaults(schema, config)
    errors = errors + schema_errors(schema, config)
    if not errors:  # the metric entries are valid: what they declare can be read
        errors = _metric_key_errors(config)
    if errors:
        errors = sorted(set(errors), key=lambda e: (e.partition(": ")[0], errors.index(e)))  # by key path
        raise ConfigError(_mark_overrides(errors, overrides), source)
    return _schema_order(config, schema)


def _apply_switches(config: dict) -> None:
    """An older boolean key set to false leaves its component out of a ``many`` slot's list (see ``Slot.switches``)."""
    for _, slot in slots():
        for key, name in slot.switches.items():
            section, value = _node(config, slot.section), _node(config, key)
            if value is not False or not isinstance(section, dict) or not isinstance(section.get(slot.key), list):
                continue
            section[slot.key] = [e for e in section[slot.key]
                                 if (e.get("name") if isinstance(e, dict) else e) != name]


def _metric_key_errors(config: dict) -> list[str]:
    """Two ``eval.metrics`` entries that produce one key, and a ``checkpoint.best_metric.key`` none produces."""
    from .build import metric_key_owners

    try:
        owners, undeclared = metric_key_owners(config)
    except PluginError as exc:
        return [f"eval.metrics: {exc}"]
    errors = [f"eval.metrics: {' and '.join(where)} both produce '{key}'; keep one of them (results are "
              "one dict per pair set, so one would overwrite the other)"
              for key, where in owners.items() if len(where) > 1]
    key = config["checkpoint"]["best_metric"]["key"]
    if key not in owners and not undeclared:
        errors.append(f"checkpoint.best_metric.key: no eval.metrics entry produces '{key}'; they produce "
                      f"{', '.join(sorted(owners)) or 'nothing'}")
    return errors


def load_config(path: str | Path, overrides: Iterable[str] = ()) -> dict:
    """Read a YAML config, apply ``key=value`` overrides, fill defaults and validate it."""
    overrides = list(overrides)
    raw = read_yaml(path)
    source = str(path) if not overrides else f"{path} with {len(overrides)} --set override(s)"
    return validate_config(apply_overrides(raw, overrides), source, overrides)


def spec_name_options(spec: str | dict) -> tuple[str, dict]:
    """A ``name`` or ``{name: ..., **options}`` value split into name and options."""
    if isinstance(spec, str):
        return spec, {}
    options = dict(spec)
    return options.pop("name"), options


def section_options(section: dict, reg: Registration) -> dict:
    """The keys of a config section that the plugin's schema declares: its options."""
    declared, _ = reg.config_options()
    return {k: v for k, v in section.items() if k in declared}


class _ConfigDumper(yaml.SafeDumper):
    """Block-style mappings; lists of plain values on one line (``milestones: [8, 14]``)."""


def _represent_list(dumper: yaml.SafeDumper, data: list) -> yaml.Node:
    flat = all(not isinstance(v, (dict, list)) for v in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flat)


_ConfigDumper.add_representer(list, _represent_list)


def dump_config(config: dict) -> str:
    """YAML text of a config, keys in their dict order (``validate_config`` returns schema order)."""
    return yaml.dump(config, Dumper=_ConfigDumper, sort_keys=False, default_flow_style=False, allow_unicode=True)


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
    "yaml_load",
]

"""JSON Schema validation that reports every error as ``dotted.key.path: expectation, got value``.

jsonschema's own messages are Python reprs (``'abc' is not of type 'number'``); these read
like the YAML the user wrote (``training.lr: must be a number, got "abc" (a string)``).
"""

from __future__ import annotations

import copy
import difflib
import json
import re
from collections import defaultdict
from typing import Any, Iterable

from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError, best_match

_TYPE_WORDS = {
    "number": "a number",
    "integer": "an integer",
    "string": "a string",
    "boolean": "true or false",
    "null": "null",
    "array": "a list",
    "object": "a mapping",
}
_KIND_WORDS = {**_TYPE_WORDS, "boolean": "a boolean"}  # what a value is, as opposed to what is expected
_PLURAL = {
    "number": "numbers",
    "integer": "integers",
    "string": "strings",
    "boolean": "booleans",
    "null": "nulls",
    "array": "lists",
    "object": "mappings",
}


def dotted(path: Iterable[Any], prefix: str = "") -> str:
    """``['eval', 'metrics', 1, 'far']`` -> ``eval.metrics[1].far`` (``(top level)`` when empty)."""
    parts = [prefix] if prefix else []
    for p in path:
        if isinstance(p, int) and not isinstance(p, bool) and parts:
            parts[-1] = f"{parts[-1]}[{p}]"
        elif isinstance(p, int) and not isinstance(p, bool):
            parts.append(f"[{p}]")
        else:
            parts.append(str(p))
    return ".".join(parts) or "(top level)"


def show(value: Any, limit: int = 60) -> str:
    """A value as the user would write it in YAML/JSON (``"abc"``, ``true``, ``null``), shortened."""
    try:
        text = json.dumps(value, ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, (list, tuple)):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _join(words: list[str], last: str = "or") -> str:
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} {last} {words[-1]}"


def _types(value: Any) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def _describe_schema(schema: Any) -> str:
    """A short noun phrase for what a (sub)schema accepts, for anyOf messages."""
    if not isinstance(schema, dict):
        return "a valid value"
    if "const" in schema:
        return show(schema["const"])
    if "enum" in schema:
        return "one of " + ", ".join(show(v) for v in schema["enum"])
    types = _types(schema.get("type", []))
    if types == ["array"] and isinstance(schema.get("items"), dict) and "type" in schema["items"]:
        inner = _types(schema["items"]["type"])
        return "a list of " + _join([_PLURAL.get(t, t) for t in inner])
    if types == ["object"] and schema.get("required"):
        keys = ", ".join(f'"{k}"' for k in schema["required"])
        return f"a mapping with {keys}"
    if types:
        return _join([_TYPE_WORDS.get(t, t) for t in types])
    return "a valid value"


def _allowed_keys(schema: dict) -> list[str]:
    keys = list(schema.get("properties", {}))
    for sub in schema.get("allOf", []):
        if isinstance(sub, dict):
            keys += [k for k in sub.get("properties", {}) if k not in keys]
    return keys


def _unknown_keys(err: ValidationError, path: list, prefix: str) -> list[str]:
    allowed = _allowed_keys(err.schema)
    patterns = list(err.schema.get("patternProperties", {}))
    out = []
    for key in err.instance:
        if key in allowed or any(re.search(p, str(key)) for p in patterns):
            continue
        close = difflib.get_close_matches(str(key), [str(k) for k in allowed], n=1, cutoff=0.6)
        if close:
            hint = f'; did you mean "{close[0]}"?'
        elif allowed:
            hint = f"; known keys here: {', '.join(sorted(map(str, allowed)))}"
        else:
            hint = "; nothing is configurable here"
        out.append(f"{dotted(path + [key], prefix)}: unknown key{hint}")
    return out


def _any_of(err: ValidationError, prefix: str) -> list[str]:
    """anyOf/oneOf: explain the branch whose type matches the value, else list the choices."""
    branches: dict[int, list[ValidationError]] = defaultdict(list)
    for sub in err.context:
        branches[sub.relative_schema_path[0]].append(sub)
    kind = _json_type(err.instance)
    matching = []
    for index, errors in branches.items():
        shallow_type_errors = [e for e in errors if e.validator == "type" and not e.relative_path]
        if not shallow_type_errors:
            matching.append(index)
    path = list(err.absolute_path)
    if len(matching) == 1:
        out: list[str] = []
        for sub in branches[matching[0]]:
            out.extend(_describe(sub, prefix))
        return out
    if not matching:
        choices = _join([_describe_schema(s) for s in err.validator_value])
        return [f"{dotted(path, prefix)}: must be {choices}, got {show(err.instance)} ({_KIND_WORDS.get(kind, kind)})"]
    return _describe(best_match(err.context), prefix)


def _describe(err: ValidationError, prefix: str) -> list[str]:
    """One or more ``path: message`` lines for one jsonschema error."""
    path = list(err.absolute_path)
    where = dotted(path, prefix)
    kind, value, got = err.validator, err.validator_value, show(err.instance)
    if kind == "additionalProperties" and isinstance(err.instance, dict):
        return _unknown_keys(err, path, prefix)
    if kind == "required" and isinstance(err.instance, dict):
        props = err.schema.get("properties", {})
        out = []
        for key in (k for k in value if k not in err.instance):
            about = props.get(key, {}).get("description", "") if isinstance(props.get(key), dict) else ""
            about = f"; {about[:1].lower()}{about[1:].rstrip('.')}" if about else ""
            out.append(f"{dotted(path + [key], prefix)}: required key is missing{about}")
        return out
    if kind in ("anyOf", "oneOf") and err.context:
        return _any_of(err, prefix)
    if kind == "type":
        actual = _json_type(err.instance)
        return [f"{where}: must be {_join([_TYPE_WORDS.get(t, t) for t in _types(value)])}, "
                f"got {got} ({_KIND_WORDS.get(actual, actual)})"]
    if kind == "enum":
        hint = ""
        strings = [v for v in value if isinstance(v, str)]
        if isinstance(err.instance, str) and strings:
            close = difflib.get_close_matches(err.instance, strings, n=1, cutoff=0.6)
            hint = f'; did you mean "{close[0]}"?' if close else ""
        return [f"{where}: must be one of {', '.join(show(v) for v in value)}, got {got}{hint}"]
    if kind == "const":
        return [f"{where}: must be {show(value)}, got {got}"]
    comparisons = {"minimum": ">=", "exclusiveMinimum": ">", "maximum": "<=", "exclusiveMaximum": "<"}
    if kind in comparisons:
        return [f"{where}: must be {comparisons[kind]} {show(value)}, got {got}"]
    if kind == "multipleOf":
        return [f"{where}: must be a multiple of {show(value)}, got {got}"]
    if kind == "pattern":
        about = err.schema.get("description", "").strip().rstrip(".")
        about = f" ({about})" if about else ""
        return [f"{where}: must match the pattern {value}{about}, got {got}"]
    counts = {
        "minLength": ("at least", "character"),
        "maxLength": ("at most", "character"),
        "minItems": ("at least", "item"),
        "maxItems": ("at most", "item"),
        "minProperties": ("at least", "key"),
        "maxProperties": ("at most", "key"),
    }
    if kind in counts:
        bound, unit = counts[kind]
        return [f"{where}: must have {bound} {value} {unit}{'' if value == 1 else 's'}, got {got}"]
    if kind == "uniqueItems":
        return [f"{where}: must not repeat items, got {got}"]
    if kind == "format":
        return [f"{where}: must be a valid {value}, got {got}"]
    return [f"{where}: {err.message} (got {got})"]


def schema_errors(schema: dict, instance: Any, prefix: str = "") -> list[str]:
    """Every violation of ``schema`` by ``instance``, as ``path: message`` lines, in path order."""
    validator = Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(instance), key=lambda e: [str(p) for p in e.absolute_path])
    messages: list[str] = []
    for err in errors:
        for line in _describe(err, prefix):
            if line not in messages:
                messages.append(line)
    return messages


def fill_defaults(schema: dict, instance: Any) -> Any:
    """Fill missing keys that have a ``default`` in ``schema``, recursively.

    Goes into objects and into the objects of arrays (``prefixItems`` for the first entries,
    ``items`` for the rest), so ``{name: tar_at_far}`` in ``eval.metrics`` gets its options'
    defaults. Where a schema offers alternatives (``anyOf``/``oneOf``), an object is filled from
    the object branch.
    """
    if not isinstance(schema, dict):
        return instance
    if isinstance(instance, list):
        prefix = schema.get("prefixItems", [])
        for i, item in enumerate(instance):
            fill_defaults(prefix[i] if i < len(prefix) else schema.get("items", {}), item)
        return instance
    if not isinstance(instance, dict):
        return instance
    for branch in schema.get("anyOf", schema.get("oneOf", [])):
        if isinstance(branch, dict) and branch.get("type") == "object":
            fill_defaults(branch, instance)
            break
    props = dict(schema.get("properties", {}))
    for sub in schema.get("allOf", []):
        if isinstance(sub, dict):
            props.update(sub.get("properties", {}))
    for key, sub in props.items():
        if not isinstance(sub, dict):
            continue
        if key not in instance and "default" in sub:
            instance[key] = copy.deepcopy(sub["default"])
        if key in instance:
            target = sub
            if "allOf" in sub and "properties" not in sub:
                target = {"allOf": sub["allOf"]}
            fill_defaults(target, instance[key])
    return instance

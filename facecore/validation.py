"""JSON Schema validation that reports every error with its dotted key path."""

from __future__ import annotations

import copy
import difflib
import re
from typing import Any, Iterable

from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError, best_match


def dotted(path: Iterable[Any], prefix: str = "") -> str:
    parts = [prefix] if prefix else []
    for p in path:
        if isinstance(p, int) and parts:
            parts[-1] = f"{parts[-1]}[{p}]"
        else:
            parts.append(str(p))
    return ".".join(parts) or "(top level)"


def _allowed_keys(schema: dict) -> list[str]:
    keys = list(schema.get("properties", {}))
    for sub in schema.get("allOf", []):
        keys += list(sub.get("properties", {}))
    return keys


def _describe(err: ValidationError, prefix: str) -> list[str]:
    path = list(err.absolute_path)
    if err.validator == "additionalProperties" and isinstance(err.instance, dict):
        allowed = _allowed_keys(err.schema)
        out = []
        for key in err.instance:
            if key in allowed or any(
                re.search(p, str(key)) for p in err.schema.get("patternProperties", {})
            ):
                continue
            close = difflib.get_close_matches(str(key), allowed, n=1, cutoff=0.6)
            hint = f"; did you mean '{close[0]}'?" if close else f"; known keys: {', '.join(sorted(allowed))}"
            out.append(f"{dotted(path + [key], prefix)}: unknown key{hint}")
        return out
    if err.validator == "required":
        missing = err.message.split("'")[1] if "'" in err.message else err.message
        return [f"{dotted(path + [missing], prefix)}: required key is missing"]
    if err.validator in ("anyOf", "oneOf") and err.context:
        inner = best_match(err.context)
        return [f"{dotted(path, prefix)}: {inner.message} (got {_short(err.instance)})"]
    message = err.message
    if err.validator not in ("type", "enum", "const", "minimum", "maximum", "exclusiveMinimum",
                             "exclusiveMaximum", "pattern", "minLength", "minItems", "maxItems"):
        message = f"{message} (got {_short(err.instance)})"
    return [f"{dotted(path, prefix)}: {message}"]


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def schema_errors(schema: dict, instance: Any, prefix: str = "") -> list[str]:
    """Every violation of ``schema`` by ``instance``, as ``path: message`` lines, in path order."""
    validator = Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(instance), key=lambda e: [str(p) for p in e.absolute_path])
    messages: list[str] = []
    for err in errors:
        messages.extend(_describe(err, prefix))
    return messages


def fill_defaults(schema: dict, instance: Any) -> Any:
    """Fill missing keys that have a ``default`` in ``schema`` (recursively, objects only)."""
    if not isinstance(instance, dict) or not isinstance(schema, dict):
        return instance
    props = dict(schema.get("properties", {}))
    for sub in schema.get("allOf", []):
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

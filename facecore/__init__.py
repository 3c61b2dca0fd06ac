"""facecore: plugin-based face-recognition training.

The public API (stable for plugins and notebooks): ``hookimpl``, ``available``,
``create``, ``load_config``, ``Predictor``, the ``align`` module and the error classes.
"""

from __future__ import annotations

from typing import Any

from .errors import CheckpointError, ConfigError, DataError, FacecoreError, PluginError, TrainingError
from .hookspecs import hookimpl

__version__ = "0.1.0"


def available(group: str) -> list[str]:
    """Names registered in a group: ``backbones``, ``heads``, ``datasets``, ``schedulers``, ``metrics``."""
    from .core.plugins import registry

    return registry(group).names()


def create(group: str, name: str, **options: Any) -> Any:
    """Build a registered component after validating ``options`` against its schema.

    The group's context arguments (``embedding_size`` for backbones, ``train`` for datasets,
    ``optimizer, steps_per_epoch, epochs, warmup_epochs`` for schedulers) are passed through
    unvalidated. Unknown group or name: PluginError; bad options: ConfigError listing all.
    """
    from .core.plugins import registry
    from .core.registry import CONTEXT_ARGS, SINGULAR
    from .core.validation import schema_errors

    reg = registry(group).get(name)
    context = {k: options.pop(k) for k in CONTEXT_ARGS[group] if k in options}
    schema = dict(reg.schema or {"type": "object", "additionalProperties": False})
    schema["properties"] = {k: v for k, v in reg.options.items() if k not in CONTEXT_ARGS[group]}
    schema["required"] = [k for k in schema.get("required", []) if k not in CONTEXT_ARGS[group]]
    errors = schema_errors(schema, options, prefix=name)
    if errors:
        raise ConfigError(errors, f"the options of {SINGULAR[group]} '{name}'")
    _check_context(group, name, reg.factory, context)
    return reg.factory(**context, **options)


def _check_context(group: str, name: str, factory: Any, context: dict) -> None:
    """A clear TypeError when a caller forgets a context argument the factory needs."""
    import inspect

    from .core.registry import CONTEXT_ARGS

    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return
    missing = [
        k for k in CONTEXT_ARGS[group]
        if k not in context and k in params and params[k].default is inspect.Parameter.empty
    ]
    if missing:
        args = ", ".join(f"{k}=..." for k in missing)
        raise TypeError(f"create({group!r}, {name!r}) needs {args}: the core passes it to every one of the {group}")


def load_config(path: str, overrides: tuple[str, ...] | list[str] = ()) -> dict:
    """Read, override, default-fill and validate a YAML config (raises ConfigError)."""
    from .core.config import load_config as _load

    return _load(path, overrides)


def __getattr__(name: str) -> Any:  # torch-heavy parts load on first use
    if name == "Predictor":
        from .eval.predictor import Predictor

        return Predictor
    if name == "align":  # ``facecore.align.align_face(...)`` without importing the submodule first
        import importlib

        return importlib.import_module(".align", __name__)
    raise AttributeError(f"module 'facecore' has no attribute {name!r}")


__all__ = [
    "CheckpointError",
    "ConfigError",
    "DataError",
    "FacecoreError",
    "PluginError",
    "Predictor",
    "TrainingError",
    "__version__",
    "align",
    "available",
    "create",
    "hookimpl",
    "load_config",
]

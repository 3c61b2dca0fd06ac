"""facecore: plugin-based face-recognition training.

The public API (stable for plugins and notebooks): ``hookimpl``, ``available``,
``create``, ``load_config``, ``evaluate``, ``Predictor``, the ``align`` module and the error classes.
"""

from __future__ import annotations

from typing import Any

from .errors import CheckpointError, ConfigError, DataError, FacecoreError, PluginError, TrainingError, TrainingStopped
from .core.hookspecs import hookimpl

__version__ = "0.1.0"


def available(group: str) -> list[str]:
    """Names registered in a group: ``backbones``, ``heads``, ``datasets``, ``schedulers``, ``metrics``, ..."""
    from .core.plugins import registry

    return registry(group).names()


def create(group: str, name: str, **options: Any) -> Any:
    """Build a registered component after validating ``options`` against its schema.

    The group's context arguments (``embedding_size`` for backbones, ``train`` for datasets,
    ``optimizer, steps_per_epoch, epochs, warmup_epochs`` for schedulers) are passed through
    unvalidated. Unknown group or name: PluginError; bad options: ConfigError listing all.
    """
    from .core.build import create as _create

    return _create(group, name, **options)


def evaluate(checkpoint: str | None = None, config: str | None = None, *, bins: Any = (), ijb_root: str | None = None,
             **kwargs: Any) -> Any:
    """Evaluate a checkpoint (or ``onnx=`` an ONNX export) on .bin pair sets and IJB template sets; see
    :func:`facecore.eval.run.evaluate`.

    Returns an :class:`~facecore.eval.run.Evaluation` (per set: metrics, ROC, the files it wrote).
    """
    from .eval.run import evaluate as _evaluate

    return _evaluate(checkpoint, config, bins=bins, ijb_root=ijb_root, **kwargs)


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
    "TrainingStopped",
    "__version__",
    "align",
    "available",
    "create",
    "evaluate",
    "hookimpl",
    "load_config",
]

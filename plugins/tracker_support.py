"""What the tracker loggers (wandb, mlflow) share; registers nothing."""

from __future__ import annotations

import importlib.util


def installed(name: str) -> bool:
    """Whether the package ``name`` can be imported, found without importing it (trackers are slow to import)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False

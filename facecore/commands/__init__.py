"""CLI commands, one module each, and the helpers they share (error handling, --set)."""

from __future__ import annotations

import functools
import os
import sys
from typing import Any, Callable

import click

from ..errors import FacecoreError, TrainingStopped


def user_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Turn FacecoreError into 'Error: ...' on stderr and its exit code, with no traceback."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except FacecoreError as exc:
            if not (isinstance(exc, TrainingStopped) and os.environ.get("RANK", "0") != "0"):  # one rank says it
                click.echo(f"{exc.label}: {exc}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("Interrupted.", err=True)
            sys.exit(130)

    return wrapper


set_option = click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override a config key, e.g. --set training.lr=0.05 (repeatable; values are YAML scalars).",
)

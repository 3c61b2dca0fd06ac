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
            leave_torchrun_worker(exc.exit_code)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("Interrupted.", err=True)
            sys.exit(130)

    return wrapper


def leave_torchrun_worker(code: int) -> None:
    """Under torchrun, end this worker now with ``code``, without the interpreter's teardown.

    When a command gets here its work is written, flushed and closed (checkpoints fsynced, logs and
    TensorBoard closed, the process group destroyed by the trainer). What the teardown would still do
    is free C++ objects of torch.distributed in an order it does not control; with gloo that aborted
    a finished rank now and then ("terminate called without an active exception", SIGABRT, seen in
    CI after train() had destroyed its group), and torchrun then reports the job failed. Leaving
    here makes the exit status say what happened. A single process returns and exits normally.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    import logging

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


set_option = click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override a config key, e.g. --set training.lr=0.05 (repeatable; values are YAML scalars).",
)

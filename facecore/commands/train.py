"""``facecore train``: validate the config, then train (single process or under torchrun)."""

from __future__ import annotations

import json

import click

from . import leave_torchrun_worker, set_option, user_errors


@click.command()
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False), help="YAML config file.")
@set_option
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), help="Overrides the config's device.")
@click.option(
    "--resume",
    is_flag=False,
    flag_value="auto",
    default=None,
    metavar="[PATH]",
    help="Continue the newest run under checkpoint.save_dir, or the checkpoint at PATH.",
)
@click.option(
    "--init",
    "init",
    metavar="PATH",
    type=click.Path(dir_okay=False),
    help="Initialise the backbone from PATH to fine-tune it (same as --set model.pretrained=PATH; "
    "ignored with --resume).",
)
@click.option("--quiet", is_flag=True, help="Only warnings and errors on the console.")
@user_errors
def train(config_path: str, overrides: tuple[str, ...], device: str | None, resume: str | None, init: str | None,
          quiet: bool) -> None:
    """Train a backbone with a margin head on the configured dataset.

    Multi-GPU or multi-node: launch the same command with torchrun, e.g.
    torchrun --nproc_per_node 8 -m facecore.cli train --config X.yaml
    """
    from ..core.config import load_config

    if device:
        overrides = (*overrides, f"device={device}")
    if init:
        overrides = (*overrides, f"model.pretrained={json.dumps(init)}")  # a JSON string is a YAML scalar: any path
    config = load_config(config_path, overrides)
    from ..train.trainer import train as run_training

    summary = run_training(config, resume=resume, verbose=not quiet)
    if summary["rank"] == 0:  # under torchrun, one process reports
        _report(summary)
    leave_torchrun_worker(0)


def _report(summary: dict) -> None:
    click.echo(f"run directory: {summary['run_dir']}")
    for label, key in (("before training", "initial_metrics"), ("after training", "val_metrics")):
        for name, values in summary[key].items():
            if "accuracy" in values:
                click.echo(f"{name} {label}: accuracy {values['accuracy']:.4f} ± {values.get('accuracy_std', 0.0):.4f}")

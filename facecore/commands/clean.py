"""``facecore clean``: drop training images far from their class's dominant sub-center (label cleaning).

The work is ``facecore.eval.cleaning.clean``. No torch/numpy import at module level.
"""

from __future__ import annotations

import click

from . import set_option, user_errors


@click.command("clean")
@click.option("--checkpoint", "checkpoint_path", required=True, type=click.Path(dir_okay=False),
              help="last.pth / best.pth of 'facecore train': its backbone and class centers.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False),
              help="YAML config naming the RecordIO training set (data section), the backbone and the head; "
                   "defaults to the config stored in the checkpoint.")
@click.option("--threshold", default=75.0, show_default=True, type=float, metavar="DEGREES",
              help="Drop images whose angle to their class's dominant sub-center is above this (0 < DEGREES < 180).")
@click.option("--output", "output", required=True, type=click.Path(), metavar="DIR",
              help="Folder to write: kept/ (a RecordIO set: use it as data.root), kept.tsv, dropped.tsv, angles.png, "
                   "summary.json.")
@click.option("--batch-size", type=click.IntRange(min=1), help="Images per forward pass (default: eval.test_batch_size).")
@click.option("--device", help="auto, cpu, cuda or cuda:N (default: the config's device).")
@click.option("--num-workers", type=click.IntRange(min=0), help="DataLoader workers (default: data.num_workers).")
@click.option("--force", is_flag=True, help="Replace DIR when it is not empty (only once the new one is complete).")
@set_option
@user_errors
def clean(checkpoint_path: str, config_path: str | None, threshold: float, output: str, batch_size: int | None,
          device: str | None, num_workers: int | None, force: bool, overrides: tuple[str, ...]) -> None:
    """Clean the labels of a RecordIO training set with a trained checkpoint's class centers.

    Embeds every training image with the checkpoint's backbone and measures its angle to its class's
    dominant sub-center: the one of the class's K centers (subcenter_arcface's k; 1 for other heads)
    that most of its images are nearest to. Images above --threshold are dropped. DIR gets the kept
    images as a new RecordIO set with the same classes (kept/: train.rec, train.idx, property),
    kept.tsv (new key, original key, label, angle), dropped.tsv (original key, label, angle), a
    histogram of the angles (angles.png) and summary.json. Nothing is written unless every input is
    valid and the whole run succeeds.
    """
    from ..eval.cleaning import check_threshold
    from ..eval.cleaning import clean as run_clean

    check_threshold(threshold)  # before the checkpoint is read

    def say(line: str) -> None:
        click.echo(line, err=True)

    result = run_clean(checkpoint_path, output, config_path=config_path, overrides=overrides, threshold=threshold,
                       batch_size=batch_size, device=device, num_workers=num_workers, force=force, progress=True,
                       say=say)
    for line in result.lines():
        click.echo(line)
    click.echo(f"wrote {output}/: kept/ (RecordIO, use as data.root), kept.tsv, dropped.tsv, angles.png, summary.json",
               err=True)

"""``facecore augment-preview``: a PNG of one training batch before and after the configured augmentations."""

from __future__ import annotations

import click

from . import set_option, user_errors


@click.command("augment-preview")
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False), help="YAML config file.")
@set_option
@click.option("--output", default="augment-preview.png", show_default=True, type=click.Path(dir_okay=False),
              help="PNG file to write.")
@click.option("--batch", "count", default=16, show_default=True, type=click.IntRange(1, 256),
              help="How many images of the first training batch to show.")
@user_errors
def augment_preview(config_path: str, overrides: tuple[str, ...], output: str, count: int) -> None:
    """Show what the network sees: the first images of epoch 0 before and after data.augment.

    Rows alternate: the images as read, then the same images as the trainer augments them in
    the first batch (8 per row). Try a list with --set, e.g.
    --set 'data.augment=[{name: low_resolution, p: 1.0}]'.
    """
    from ..core.config import load_config

    config = load_config(config_path, overrides)
    from ..train.augment_preview import write_preview

    result = write_preview(config, output, count)
    listed = ", ".join(result["augmentations"]) or "none (data.augment is empty)"
    click.echo(f"wrote {result['path']} ({result['size'][0]}x{result['size'][1]}): {result['images']} images "
               f"before and after {listed}")

"""``facecore pack``: build RecordIO training sets and .bin pair sets from image files."""

from __future__ import annotations

import warnings

import click

from . import user_errors


@click.group()
def pack() -> None:
    """Pack images into training sets (rec) and verification pair sets (bin)."""


@pack.command("rec")
@click.argument("src_dir", type=click.Path(file_okay=False))
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--quality", default=95, show_default=True, type=click.IntRange(1, 100),
              help="JPEG quality for images that must be re-encoded (JPEGs of the right size are kept as they are).")
@click.option("--img-size", default=112, show_default=True, type=click.IntRange(8), help="Image height and width.")
@click.option("--no-resize", "no_resize", is_flag=True, help="Refuse images of another size instead of resizing them.")
@click.option("--force", is_flag=True, help="Overwrite train.rec/train.idx/property in OUT_DIR.")
@user_errors
def rec(src_dir: str, out_dir: str, quality: int, img_size: int, no_resize: bool, force: bool) -> None:
    """Pack SRC_DIR/<identity>/<image> into OUT_DIR/train.rec, train.idx, property (InsightFace layout)."""
    from ..data.packing import pack_rec

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        stats = pack_rec(src_dir, out_dir, quality=quality, resize=not no_resize, img_size=img_size, force=force)
    click.echo(f"Packed {stats['images']} images of {stats['identities']} identities into {out_dir}")
    _echo_warnings(caught)


@pack.command("bin")
@click.argument("pairs_file", type=click.Path(dir_okay=False))
@click.argument("out_path", type=click.Path(dir_okay=False))
@click.option("--img-size", default=112, show_default=True, type=click.IntRange(8), help="Image height and width.")
@click.option("--no-resize", "no_resize", is_flag=True, help="Refuse images of another size instead of resizing them.")
@click.option("--force", is_flag=True, help="Overwrite OUT_PATH.")
@user_errors
def bin_command(pairs_file: str, out_path: str, img_size: int, no_resize: bool, force: bool) -> None:
    """Pack the pairs in PAIRS_FILE ('path_a path_b 0|1' lines) into a .bin pair set."""
    from ..data.packing import pack_bin

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pairs = pack_bin(pairs_file, out_path, img_size=img_size, resize=not no_resize, force=force)
    click.echo(f"Packed {pairs} pairs into {out_path}")
    _echo_warnings(caught)


def _echo_warnings(caught: list) -> None:
    for w in caught:
        if issubclass(w.category, UserWarning):
            click.echo(f"Warning: {w.message}", err=True)

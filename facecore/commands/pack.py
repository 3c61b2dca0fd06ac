"""``facecore pack``: build RecordIO training sets and .bin pair sets from image files, aligning them when given landmarks."""

from __future__ import annotations

import warnings

import click

from . import user_errors


@click.group()
def pack() -> None:
    """Pack images into training sets (rec) and verification pair sets (bin)."""


landmarks_option = click.option(
    "--landmarks", type=click.Path(dir_okay=False),
    help="Align every image to the 112x112 ArcFace crop: a file of 'image_path x1 y1 ... x5 y5' lines "
         "(5 points: eyes, nose tip, mouth corners; 68 points or a trailing detector score also work).",
)
missing_option = click.option(
    "--missing-landmarks", type=click.Choice(["error", "skip"]), default="error", show_default=True,
    help="An image without a line in --landmarks stops the pack, or is left out and listed in a report file.",
)


@pack.command("rec")
@click.argument("src_dir", type=click.Path(file_okay=False))
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--quality", default=95, show_default=True, type=click.IntRange(1, 100),
              help="JPEG quality for images that must be re-encoded (JPEGs of the right size are kept as they are).")
@click.option("--img-size", default=112, show_default=True, type=click.IntRange(8), help="Image height and width.")
@click.option("--no-resize", "no_resize", is_flag=True, help="Refuse images of another size instead of resizing them.")
@click.option("--force", is_flag=True, help="Overwrite train.rec/train.idx/property in OUT_DIR.")
@landmarks_option
@missing_option
@user_errors
def rec(src_dir: str, out_dir: str, quality: int, img_size: int, no_resize: bool, force: bool,
        landmarks: str | None, missing_landmarks: str) -> None:
    """Pack SRC_DIR/<identity>/<image> into OUT_DIR/train.rec, train.idx, property (InsightFace layout).

    Paths in --landmarks are relative to SRC_DIR (or absolute).
    """
    from ..data.packing import pack_rec

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        stats = pack_rec(src_dir, out_dir, quality=quality, resize=not no_resize, img_size=img_size, force=force,
                         landmarks=landmarks, missing_landmarks=missing_landmarks)
    aligned = f" (aligned with {landmarks})" if landmarks else ""
    click.echo(f"Packed {stats['images']} images of {stats['identities']} identities into {out_dir}{aligned}")
    _echo_warnings(caught)


@pack.command("bin")
@click.argument("pairs_file", type=click.Path(dir_okay=False))
@click.argument("out_path", type=click.Path(dir_okay=False))
@click.option("--img-size", default=112, show_default=True, type=click.IntRange(8), help="Image height and width.")
@click.option("--no-resize", "no_resize", is_flag=True, help="Refuse images of another size instead of resizing them.")
@click.option("--force", is_flag=True, help="Overwrite OUT_PATH.")
@landmarks_option
@missing_option
@user_errors
def bin_command(pairs_file: str, out_path: str, img_size: int, no_resize: bool, force: bool,
                landmarks: str | None, missing_landmarks: str) -> None:
    """Pack the pairs in PAIRS_FILE ('path_a path_b 0|1' lines) into a .bin pair set.

    Paths in --landmarks are relative to PAIRS_FILE's folder, like the pairs (or absolute).
    """
    from ..data.packing import pack_bin

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pairs = pack_bin(pairs_file, out_path, img_size=img_size, resize=not no_resize, force=force,
                         landmarks=landmarks, missing_landmarks=missing_landmarks)
    aligned = f" (aligned with {landmarks})" if landmarks else ""
    click.echo(f"Packed {pairs} pairs into {out_path}{aligned}")
    _echo_warnings(caught)


def _echo_warnings(caught: list) -> None:
    for w in caught:
        if issubclass(w.category, UserWarning):
            click.echo(f"Warning: {w.message}", err=True)

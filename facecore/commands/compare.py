"""``facecore compare RUN_DIR ...``: runs side by side, as two PNGs and a table of their best numbers.

The work is ``facecore.eval.compare``. No torch import at module level (keeps ``facecore --help`` fast).
"""

from __future__ import annotations

import click

from . import user_errors


@click.command("compare")
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(), metavar="RUN_DIR...")
@click.option("--out", default=".", show_default=True, type=click.Path(file_okay=False),
              help="Folder for compare_<metric>.png and compare_roc.png.")
@click.option("--metric", default="accuracy", show_default=True, help="The validation result to plot and rank by.")
@click.option("--bin", "bins", multiple=True, type=click.Path(dir_okay=False),
              help="Pair set for the ROC curves (repeatable); default: each run's eval.bin_file.")
@click.option("--no-roc", is_flag=True, help="Only metrics.jsonl: no checkpoint is evaluated, no ROC plot.")
@click.option("--device", help="Device for the ROC evaluation: auto, cpu, cuda or cuda:N (default: the run's).")
@click.option("--batch-size", type=click.IntRange(min=1), help="Images per forward pass for the ROC evaluation.")
@user_errors
def compare_command(run_dirs: tuple[str, ...], out: str, metric: str, bins: tuple[str, ...], no_roc: bool,
                    device: str | None, batch_size: int | None) -> None:
    """Compare training runs: validation METRIC against the step (from each run's metrics.jsonl), the ROC
    curves of their best.pth overlaid (evaluated on the same pair sets), and a table of their best numbers.

    RUN_DIR is a run folder of facecore train (checkpoint.save_dir/<backbone>/<time>/).
    """
    from ..eval.compare import compare

    def say(line: str) -> None:
        click.echo(line, err=True)

    _, written, table = compare(run_dirs, out, key=metric, bins=bins, roc=not no_roc, device=device,
                                batch_size=batch_size, say=say)
    click.echo(table)
    click.echo(f"\nwrote {', '.join(str(p) for p in written) or 'no plot'}", err=True)

"""``facecore eval``: verification results of a checkpoint on .bin pair sets and IJB-B/C template sets,
as tables, files and ROC plots. The work is ``facecore.eval.run.evaluate`` (``facecore.evaluate``).

No torch/numpy import at module level (keeps ``facecore --help`` fast).
"""

from __future__ import annotations

import json

import click

from . import set_option, user_errors


@click.command("eval")
@click.option("--config", "config_path", type=click.Path(dir_okay=False),
              help="YAML config; defaults to the config stored in the checkpoint.")
@click.option("--checkpoint", "checkpoint_path", required=True, type=click.Path(dir_okay=False),
              help="best.pth / last.pth of 'facecore train', or a bare backbone state dict (needs --config).")
@click.option("--bin", "bins", multiple=True, type=click.Path(dir_okay=False),
              help="A .bin pair set (repeatable); defaults to eval.bin_file of the config.")
@click.option("--ijb", "ijb_root", type=click.Path(file_okay=False), metavar="ROOT",
              help="An IJB release folder (IJBC/meta, IJBC/loose_crop): run the IJB 1:1 protocol on it "
                   "(defaults to eval.ijb.root of the config).")
@click.option("--ijb-target", type=click.Choice(["IJBC", "IJBB"]), help="IJBC or IJBB (default: eval.ijb.target).")
@click.option("--save-features", type=click.Path(file_okay=False),
              help="Write the IJB image features, template features and pair scores as .npy files here.")
@click.option("--name", help="Name in the result file names; defaults to the backbone name.")
@click.option("--batch-size", type=click.IntRange(min=1), help="Images per forward pass (default: eval.test_batch_size).")
@click.option("--device", help="auto, cpu, cuda or cuda:N (default: the config's device).")
@click.option("--num-workers", type=click.IntRange(min=0),
              help="DataLoader workers (default: 0 for .bin sets, data.num_workers for IJB).")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON on stdout instead of a table.")
@set_option
@user_errors
def eval_command(config_path: str | None, checkpoint_path: str, bins: tuple[str, ...], ijb_root: str | None,
                 ijb_target: str | None, save_features: str | None, name: str | None, batch_size: int | None,
                 device: str | None, num_workers: int | None, as_json: bool, overrides: tuple[str, ...]) -> None:
    """Evaluate a checkpoint on .bin pair sets and IJB-B/C: accuracy, TAR@FAR, AUC, EER and ROC plots.

    With --bin or --ijb only those sets are evaluated; with neither, eval.bin_file and
    eval.ijb.root of the config. Writes test_result_<name>_<time>.txt/.json and one ROC PNG
    per set into logging.log_dir, and gives them to the loggers of logging.loggers (TensorBoard by
    default), in the tracker run the checkpoint came from when it names one.
    IJB TAR@FAR is read at the ROC point whose FPR is nearest each target (the convention of
    the published tables), with the FPR <= target value beside it.
    """
    from ..eval.run import evaluate, json_safe

    def say(line: str) -> None:
        click.echo(line, err=True)

    result = evaluate(checkpoint_path, config_path, bins=bins, ijb_root=ijb_root, ijb_target=ijb_target,
                      overrides=overrides, name=name, batch_size=batch_size, device=device, num_workers=num_workers,
                      save_features=save_features, say=None if as_json else say, warn=say)
    result.write()
    if as_json:
        click.echo(json.dumps(json_safe(result.report()), indent=2))
    else:
        click.echo(result.table())
        plots = sum(s.plot is not None for s in result.sets)
        click.echo(f"\nwrote {result.base}.txt, {result.base}.json and {plots} ROC plot(s) in {result.log_dir}", err=True)

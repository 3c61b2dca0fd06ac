"""``facecore eval``: verification results of a checkpoint on .bin pair sets and IJB-B/C template sets,
1:N identification on IJB-B/C and on folder galleries, as tables, files and plots. The work is ``facecore.eval.run.evaluate`` (``facecore.evaluate``).

No torch/numpy import at module level (keeps ``facecore --help`` fast).
"""

from __future__ import annotations

import json

import click

from . import set_option, user_errors


@click.command("eval")
@click.option("--config", "config_path", type=click.Path(dir_okay=False),
              help="YAML config; defaults to the config stored in the checkpoint.")
@click.option("--checkpoint", "checkpoint_path", type=click.Path(dir_okay=False),
              help="best.pth / last.pth of 'facecore train', or a bare backbone state dict (needs --config).")
@click.option("--onnx", "onnx_path", type=click.Path(dir_okay=False),
              help="Instead of --checkpoint: a 'facecore export' ONNX model (float32 or int8), run with ONNX Runtime "
                   "on the CPU; its stored config unless --config.")
@click.option("--bin", "bins", multiple=True, type=click.Path(dir_okay=False),
              help="A .bin pair set (repeatable); defaults to eval.bin_file of the config.")
@click.option("--ijb", "ijb_root", type=click.Path(file_okay=False), metavar="ROOT",
              help="An IJB release folder (IJBC/meta, IJBC/loose_crop): run the IJB 1:1 protocol on it "
                   "(defaults to eval.ijb.root of the config).")
@click.option("--ijb-target", type=click.Choice(["IJBC", "IJBB"]), help="IJBC or IJBB (default: eval.ijb.target).")
@click.option("--ijb-protocol", type=click.Choice(["auto", "1:1", "1:N", "both"]),
              help="IJB protocols: 1:1, 1:N, both, or auto: 1:1 and 1:N when its meta files are there "
                   "(default: eval.ijb.protocol).")
@click.option("--gallery", "gallery", type=click.Path(file_okay=False), metavar="DIR",
              help="1:N gallery: DIR/<identity>/<image>, or flat images named <identity>_<n>.jpg (TinyFace's "
                   "Gallery_Match); needs --probe.")
@click.option("--probe", "probe", type=click.Path(file_okay=False), metavar="DIR",
              help="1:N probes in the same layout as --gallery (TinyFace's Probe).")
@click.option("--distractors", type=click.Path(file_okay=False), metavar="DIR",
              help="Images of nobody in the probes, added to the gallery (any folder depth; TinyFace's "
                   "Gallery_Distractor, MegaFace-style sets).")
@click.option("--per-image", is_flag=True,
              help="One gallery entry and one probe per image, instead of one pooled template per identity "
                   "(TinyFace's published protocol).")
@click.option("--save-features", type=click.Path(file_okay=False),
              help="Write the IJB / gallery features, scores and top-k ranks as .npy files here.")
@click.option("--name", help="Name in the result file names; defaults to the backbone name.")
@click.option("--batch-size", type=click.IntRange(min=1), help="Images per forward pass (default: eval.test_batch_size).")
@click.option("--device", help="auto, cpu, cuda or cuda:N (default: the config's device).")
@click.option("--num-workers", type=click.IntRange(min=0),
              help="DataLoader workers (default: 0 for .bin sets, data.num_workers for IJB).")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON on stdout instead of a table.")
@set_option
@user_errors
def eval_command(config_path: str | None, checkpoint_path: str | None, onnx_path: str | None, bins: tuple[str, ...],
                 ijb_root: str | None, ijb_target: str | None, ijb_protocol: str | None, gallery: str | None,
                 probe: str | None, distractors: str | None, per_image: bool, save_features: str | None,
                 name: str | None, batch_size: int | None, device: str | None, num_workers: int | None,
                 as_json: bool, overrides: tuple[str, ...]) -> None:
    """Evaluate a checkpoint or an ONNX export: verification on .bin pair sets and IJB-B/C, 1:N identification on IJB-B/C and folders.

    With --bin, --ijb or --gallery only those sets are evaluated; with none, eval.bin_file and
    eval.ijb.root of the config. Writes test_result_<name>_<time>.txt/.json, one ROC PNG per
    verification set and a CMC and a TPIR-vs-FPIR PNG per 1:N set into logging.log_dir, and gives
    them to the loggers of logging.loggers (TensorBoard by default), in the tracker run the
    checkpoint came from when it names one. IJB TAR@FAR is read at the ROC point whose
    FPR is nearest each target (the convention of the published tables), with the FPR <= target
    value beside it. 1:N: open set per gallery (TPIR at FPIR, rank-N) and, labelled, the
    closed-set numbers of older tables; docs/identification.md states the conventions.
    """
    from ..eval.run import evaluate, json_safe

    def say(line: str) -> None:
        click.echo(line, err=True)

    result = evaluate(checkpoint_path, config_path, onnx=onnx_path, bins=bins, ijb_root=ijb_root, ijb_target=ijb_target,
                      ijb_protocol=ijb_protocol, gallery=gallery, probe=probe, distractors=distractors,
                      per_image=per_image, overrides=overrides, name=name, batch_size=batch_size, device=device,
                      num_workers=num_workers,
                      save_features=save_features, say=None if as_json else say, warn=say)
    result.write()
    if as_json:
        click.echo(json.dumps(json_safe(result.report()), indent=2))
    else:
        click.echo(result.table())
        plots = sum(s.plot is not None for s in result.sets) + sum(len(s.plots) for s in result.sets)
        click.echo(f"\nwrote {result.base}.txt, {result.base}.json and {plots} plot(s) in {result.log_dir}", err=True)

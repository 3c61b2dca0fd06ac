"""``facecore index build``: a gallery of face folders embedded into a ``.fcidx`` file for ``facecore identify``.

No torch/numpy import at module level (keeps ``facecore --help`` fast).
"""

from __future__ import annotations

import click

from . import set_option, user_errors


@click.group("index")
def index() -> None:
    """Gallery indexes: the embeddings of known people, searched by 'facecore identify'."""


@index.command("build")
@click.option("--checkpoint", "checkpoint_path", required=True, type=click.Path(dir_okay=False),
              help="best.pth / last.pth of 'facecore train', or a bare backbone state dict (needs --config).")
@click.option("--config", "config_path", type=click.Path(dir_okay=False),
              help="YAML config; defaults to the config stored in the checkpoint.")
@click.option("--gallery", required=True, type=click.Path(file_okay=False),
              help="Folder of aligned faces, one sub-folder per identity (its name is the identity's name).")
@click.option("--output", required=True, type=click.Path(dir_okay=False), help="Index file to write, e.g. gallery.fcidx.")
@click.option("--calibrate", type=click.Path(file_okay=False),
              help="Faces of people NOT in the gallery (sub-folders per identity and/or loose images): their best "
                   "scores give the open-set thresholds at FPIR 1e-1..1e-4, stored in the index.")
@click.option("--per-image", is_flag=True,
              help="One row per gallery image instead of one template per identity (the mean of its images).")
@click.option("--device", help="auto, cpu, cuda or cuda:N (default: the config's device).")
@set_option
@user_errors
def build(checkpoint_path: str, config_path: str | None, gallery: str, output: str, calibrate: str | None,
          per_image: bool, device: str | None, overrides: tuple[str, ...]) -> None:
    """Embed a gallery folder and write it, with the model's fingerprint, to an index file (json + npy in a zip)."""
    from ..eval.gallery_index import build_index, check_writable
    from ..eval.predictor import Predictor

    check_writable(output)
    predictor = Predictor(config_path, checkpoint_path, device=device, overrides=overrides)
    idx = build_index(predictor, gallery, per_image=per_image, calibrate=calibrate, progress=True)
    idx.save(output)
    rows = (f"{idx.size} images of {idx.identities} identities" if per_image
            else f"{idx.size} identities ({sum(idx.counts or [])} images pooled)")
    click.echo(f"wrote {output}: {rows}, {idx.embeddings.shape[1]}-d, backbone "
               f"'{idx.model['model']['backbone']}' ({idx.fingerprint[:19]}...)")
    if not idx.calibrated:
        click.echo("not calibrated: 'facecore identify' will show the best matches but call no one unknown "
                   "(add --calibrate DIR with faces of people outside the gallery)")
        return
    shown = [f"{label} {thr:.4f}" if thr is not None else f"{label} not measurable (needs {round(1 / float(label))})"
             for label, thr in idx.thresholds().items()]
    click.echo(f"calibrated on {idx.calibration_scores.size} images of {idx.calibration['identities']} identities "
               f"outside the gallery; thresholds at FPIR {', '.join(shown)}")

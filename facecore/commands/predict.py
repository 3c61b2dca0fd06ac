"""``facecore predict``: the similarity of two face images, and same/different given a threshold.

No torch/numpy import at module level (keeps ``facecore --help`` fast).
"""

from __future__ import annotations

import json

import click

from . import set_option, user_errors


@click.command("predict")
@click.argument("image_a", type=click.Path(exists=True, dir_okay=False))
@click.argument("image_b", type=click.Path(exists=True, dir_okay=False))
@click.option("--checkpoint", "checkpoint_path", required=True, type=click.Path(dir_okay=False),
              help="best.pth / last.pth of 'facecore train', or a bare backbone state dict (needs --config).")
@click.option("--config", "config_path", type=click.Path(dir_okay=False),
              help="YAML config; defaults to the config stored in the checkpoint.")
@click.option("--threshold", type=click.FloatRange(-1, 1),
              help="Cosine threshold for same/different (default: the checkpoint's validation threshold).")
@click.option("--device", help="auto, cpu, cuda or cuda:N (default: the config's device).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@set_option
@user_errors
def predict(image_a: str, image_b: str, checkpoint_path: str, config_path: str | None, threshold: float | None,
            device: str | None, as_json: bool, overrides: tuple[str, ...]) -> None:
    """Compare two aligned face images (112x112; other sizes are resized with a warning)."""
    from ..eval.predictor import Predictor

    predictor = Predictor(config_path, checkpoint_path, device=device, overrides=overrides)
    similarity = predictor.predict(image_a, image_b)
    thr = predictor.threshold if threshold is None else threshold
    source = "given" if threshold is not None else "from the checkpoint's validation"
    same = None if thr is None else similarity > thr
    if as_json:
        click.echo(json.dumps({"similarity": similarity, "threshold": thr, "same": same}))
        return
    click.echo(f"similarity: {similarity:.4f}")
    if same is None:
        click.echo("no threshold (the checkpoint holds no validation results): pass --threshold to decide")
    else:
        verdict = "same person" if same else "different people"
        click.echo(f"{verdict} (threshold {thr:.4f}, {source})")

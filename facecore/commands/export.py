"""``facecore export``: a trained backbone to ONNX or TorchScript, checked against PyTorch.

No torch/numpy import at module level (keeps ``facecore --help`` fast).
"""

from __future__ import annotations

import click

from . import set_option, user_errors


@click.command("export")
@click.option("--checkpoint", "checkpoint_path", required=True, type=click.Path(dir_okay=False),
              help="best.pth / last.pth of 'facecore train', or a bare backbone state dict (needs --config).")
@click.option("--config", "config_path", type=click.Path(dir_okay=False),
              help="YAML config; defaults to the config stored in the checkpoint.")
@click.option("--format", "fmt", type=click.Choice(["onnx", "torchscript"]), default="onnx", show_default=True)
@click.option("--output", required=True, type=click.Path(dir_okay=False), help="File to write, e.g. model.onnx.")
@click.option("--no-check", is_flag=True, help="Skip comparing the export with PyTorch on a random batch.")
@set_option
@user_errors
def export(checkpoint_path: str, config_path: str | None, fmt: str, output: str, no_check: bool,
           overrides: tuple[str, ...]) -> None:
    """Export the backbone: input 'images' (N,3,H,W) in [-1,1], output 'embeddings' (N,D), batch axis dynamic."""
    from ..eval.evaluation import load_trained_backbone
    from ..eval.export import OPSET, TOLERANCE, export_backbone, onnxruntime_available

    backbone, config, _ = load_trained_backbone(checkpoint_path, config_path, overrides)
    diff = export_backbone(backbone, output, fmt, img_size=config["data"]["img_size"], check=not no_check)
    what = f"ONNX (opset {OPSET})" if fmt == "onnx" else "TorchScript"
    click.echo(f"wrote {output}: {what}, {config['model']['backbone']}, input {config['data']['img_size']}x"
               f"{config['data']['img_size']}, embedding size {config['model']['embedding_size']}")
    if diff is not None:
        click.echo(f"checked against PyTorch on a random batch: max abs diff {diff:.2e} "
                   f"(limit {TOLERANCE:g} x max(1, max |output|))")
    elif no_check:
        click.echo("not checked (--no-check)")
    elif fmt == "onnx" and not onnxruntime_available():
        click.echo("not checked: onnxruntime is not installed (pip install 'facecore[onnx]')")

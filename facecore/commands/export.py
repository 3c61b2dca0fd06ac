"""``facecore export``: a trained backbone to ONNX (float32, or int8 calibrated on your images) or TorchScript,
checked against PyTorch.

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
@click.option("--quantize", type=click.Choice(["int8"]),
              help="ONNX only: static int8 quantisation with ONNX Runtime of the Conv/Gemm/MatMul layers (needs --calibrate).")
@click.option("--calibrate", "calibration", type=click.Path(), metavar="FILE.bin|DIR",
              help="Images to calibrate the int8 ranges on: a .bin pair set or a folder of aligned face images of your data.")
@click.option("--calibration-images", type=click.IntRange(min=1), default=200, show_default=True,
              help="How many calibration images to use (evenly spaced over the set).")
@click.option("--no-check", is_flag=True, help="Skip comparing the export with PyTorch on a random batch.")
@set_option
@user_errors
def export(checkpoint_path: str, config_path: str | None, fmt: str, output: str, quantize: str | None,
           calibration: str | None, calibration_images: int, no_check: bool, overrides: tuple[str, ...]) -> None:
    """Export the backbone: input 'images' (N,3,H,W) in [-1,1], output 'embeddings' (N,D), batch axis dynamic.

    ONNX exports carry facecore metadata (backbone, sizes, input normalisation, precision, config,
    validation threshold) that 'facecore eval --onnx' and Predictor(onnx_path=...) read. With
    --quantize int8 the convolutions and linear layers run in int8 on ONNX Runtime's CPU provider,
    calibrated on --calibrate; measure what that costs with 'facecore eval --onnx'.
    """
    from ..errors import ConfigError

    if quantize and fmt != "onnx":
        raise ConfigError([f"--quantize {quantize} is for --format onnx (ONNX Runtime runs the int8 model)"])
    if quantize and not calibration:
        raise ConfigError([f"--quantize {quantize} needs --calibrate FILE.bin|DIR: images of your data to set "
                           "the int8 ranges on"])
    if calibration and not quantize:
        raise ConfigError(["--calibrate is for --quantize int8; without it the export stays float32"])

    from ..eval.evaluation import load_trained_backbone
    from ..eval.export import OPSET, TOLERANCE, export_backbone, onnxruntime_available
    from ..eval.onnx_runtime import metadata
    from ..eval.predictor import threshold_from_checkpoint

    backbone, config, ckpt = load_trained_backbone(checkpoint_path, config_path, overrides)
    img_size = config["data"]["img_size"]
    threshold = threshold_from_checkpoint(ckpt, config)
    report = None
    if quantize:
        from ..eval.quantize import calibration_images as load_calibration
        from ..eval.quantize import export_int8

        images, label = load_calibration(calibration, img_size, calibration_images)  # before anything is written
        click.echo(f"calibrating on {label}...", err=True)
        meta = metadata(config, quantized="int8 (QDQ: Conv/Gemm/MatMul weights int8 7-bit per channel, "
                                          "activations uint8 per tensor)", threshold=threshold,
                        extra={"calibration": label})
        diff, report = export_int8(backbone, output, images, label, img_size=img_size, check=not no_check,
                                   metadata=meta)
    else:
        meta = metadata(config, threshold=threshold) if fmt == "onnx" else None
        diff = export_backbone(backbone, output, fmt, img_size=img_size, check=not no_check, metadata=meta)
    what = f"ONNX (opset {OPSET}{', int8' if quantize else ''})" if fmt == "onnx" else "TorchScript"
    click.echo(f"wrote {output}: {what}, {config['model']['backbone']}, input {img_size}x"
               f"{img_size}, embedding size {config['model']['embedding_size']}")
    if diff is not None:
        checked = "the float32 graph " if quantize else ""
        click.echo(f"checked {checked}against PyTorch on a random batch: max abs diff {diff:.2e} "
                   f"(limit {TOLERANCE:g} x max(1, max |output|))")
    elif no_check:
        click.echo("not checked (--no-check)")
    elif fmt == "onnx" and not onnxruntime_available():
        click.echo("not checked: onnxruntime is not installed (pip install 'facecore[onnx]')")
    for line in report.lines() if report else ():
        click.echo(line)

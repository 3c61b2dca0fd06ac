"""``facecore export --quantize int8``: static int8 quantisation calibrated on the user's images, and its bad inputs."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from helpers import TinyIRPlugin, face_like_images, make_tiny_ir_export_set, png_bytes
from PIL import Image

from facecore.cli import main
from facecore.core import plugins
from facecore.data.binfile import write_bin
from facecore.eval import export as export_module
from facecore.eval.onnx_runtime import OnnxModel
from facecore.eval.quantize import calibration_images, op_counts

BACKBONE = "tiny-int8-net"


def export_cli(*args):
    return CliRunner().invoke(main, ["export", *args])


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The tiny IR network's checkpoint, exported once as int8 (calibrated on calib.bin) and once as float32."""
    root = tmp_path_factory.mktemp("int8")
    plugin = TinyIRPlugin(BACKBONE)
    plugins.pm.register(plugin, name="tiny-int8-plugin")
    try:
        net = make_tiny_ir_export_set(root, BACKBONE)
        int8 = export_cli("--checkpoint", str(root / "best.pth"), "--output", str(root / "int8.onnx"),
                          "--quantize", "int8", "--calibrate", str(root / "calib.bin"))
        fp32 = export_cli("--checkpoint", str(root / "best.pth"), "--output", str(root / "fp32.onnx"))
    finally:
        plugins.pm.unregister(plugin)
    return root, net, int8, fp32


@pytest.fixture
def tiny_plugin(register_plugin):
    register_plugin(TinyIRPlugin(BACKBONE), name="tiny-int8-plugin")


def test_int8_export_quantises_every_convolution_and_linear_layer(exported):
    root, _, int8, _ = exported
    assert int8.exit_code == 0, int8.output
    assert "quantised: Conv 9/9, Gemm 1/1 (100% of Conv nodes)" in int8.output
    assert f"calibrated on {root / 'calib.bin'}: 32 images" in int8.output
    counts, left = op_counts(root / "int8.onnx")
    assert counts["Conv"] == (9, 9) and counts["Gemm"] == (1, 1)
    # what ONNX Runtime cannot run in int8 here stays float, and the export says so
    assert left["PRelu"] == 4 and left["Add"] == 3 and "PRelu x4" in int8.output
    graph = onnx.load(str(root / "int8.onnx")).graph
    int8_weights = [t for t in graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 4]
    assert len(int8_weights) == 9  # every conv weight is stored as int8, one scale per output channel
    model = OnnxModel(root / "int8.onnx")
    assert model.precision == "int8" and model.metadata["calibration"] == f"{root / 'calib.bin'}: 32 images"
    assert model.backbone == BACKBONE and model.embedding_size == 16 and model.threshold == pytest.approx(0.4)


def test_int8_embeddings_stay_close_to_float32_on_held_out_images(exported):
    root, _, int8, fp32 = exported
    assert fp32.exit_code == 0, fp32.output
    x, _ = calibration_images(root / "test.bin", 112)  # images the ranges were not calibrated on
    a, b = OnnxModel(root / "fp32.onnx").run(x), OnnxModel(root / "int8.onnx").run(x)
    assert np.abs(a - b).max() > 1e-4  # really computed in int8
    cos = np.sum(a * b, axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    # 7-bit weights, uint8 activations: measured mean 0.998, min 0.99 on this set; full-range int8 weights
    # on an AVX2 CPU without VNNI saturate and gave mean 0.96, min 0.90
    assert cos.mean() > 0.99 and cos.min() > 0.97, (cos.mean(), cos.min())
    assert "int8 vs float32 on 32 calibration images: cosine of embeddings mean" in int8.output


def test_float32_export_stays_float32(exported):
    root, _, _, fp32 = exported
    assert fp32.exit_code == 0, fp32.output
    graph = onnx.load(str(root / "fp32.onnx")).graph
    assert not [n for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert OnnxModel(root / "fp32.onnx").quantized == "no"
    assert "ONNX (opset 17)," in fp32.output and "quantised" not in fp32.output


def test_calibration_images_from_a_folder_are_spread_and_normalized(tmp_path):
    images = face_like_images(7, seed=3)
    for i, image in enumerate(images):  # identity folders, as a training set is laid out
        folder = tmp_path / f"id{i % 2}"
        folder.mkdir(exist_ok=True)
        Image.fromarray(image).save(folder / f"{i}.png")
    (tmp_path / ".hidden").mkdir()
    Image.fromarray(images[0][:50]).save(tmp_path / ".hidden" / "x.png")  # skipped: hidden
    (tmp_path / "notes.txt").write_text("not an image")
    x, label = calibration_images(tmp_path, 112, limit=4)
    assert x.shape == (4, 3, 112, 112) and x.dtype == np.float32
    assert label == f"{tmp_path}: 4 of 7 images"
    files = sorted(tmp_path.rglob("[0-9].png"))  # id0/0, id0/2, id0/4, id0/6, id1/1, id1/3, id1/5
    for got, k in zip(x, [0, 2, 4, 6]):  # evenly spaced over the sorted files
        want = np.asarray(Image.open(files[k]), dtype=np.float32).transpose(2, 0, 1) / 127.5 - 1
        np.testing.assert_allclose(got, want, atol=1e-6)


def _write_png(path, size):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(face_like_images(1, size=size)[0]).save(path)
    return path


@pytest.mark.parametrize("case", ["missing", "empty folder", "small image in folder", "small images in .bin",
                                  "empty .bin", "one image"])
def test_bad_calibration_sets_are_named_and_nothing_is_written(exported, tiny_plugin, tmp_path, case):
    root = exported[0]
    bad = tmp_path / "calibration"
    if case == "missing":
        source, message = bad, "calibration set not found"
    elif case == "empty folder":
        bad.mkdir()
        source, message = bad, "has no .jpg/.jpeg/.png images"
    elif case == "small image in folder":
        _write_png(bad / "a" / "0.png", 112)
        source, message = bad, f"{_write_png(bad / 'b' / '1.png', 64)}: the image is 64x64 but the model takes 112x112"
    elif case == "small images in .bin":
        source = tmp_path / "small.bin"
        write_bin(source, [png_bytes(i) for i in face_like_images(2, size=64)], [True])
        message = f"{source}: image 0: the image is 64x64 but the model takes 112x112"
    elif case == "empty .bin":
        source = tmp_path / "empty.bin"
        write_bin(source, [], [])
        source, message = source, "holds no images"
    else:
        source = _write_png(tmp_path / "face.png", 112)
        message = "is one image: pass a .bin pair set or a folder"
    out = tmp_path / "out" / "model.onnx"
    result = export_cli("--checkpoint", str(root / "best.pth"), "--output", str(out), "--quantize", "int8",
                        "--calibrate", str(source))
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert message in result.output and str(source) in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not out.parent.exists()  # checked before anything is written


def test_a_failed_int8_export_leaves_the_existing_file_alone(exported, tiny_plugin, monkeypatch):
    root = exported[0]
    out = root / "kept.onnx"
    out.write_bytes(b"the previous export")
    before = sorted(p.name for p in root.iterdir())
    monkeypatch.setattr(export_module, "TOLERANCE", -1.0)  # the float32 check now fails, after files are staged
    result = export_cli("--checkpoint", str(root / "best.pth"), "--output", str(out), "--quantize", "int8",
                        "--calibrate", str(root / "calib.bin"))
    assert result.exit_code == 1 and "differs from the PyTorch model" in result.output and str(out) in result.output
    assert out.read_bytes() == b"the previous export"
    assert sorted(p.name for p in root.iterdir()) == before  # no staging folder left behind


def test_quantize_and_calibrate_go_together(exported):
    ckpt = str(exported[0] / "best.pth")
    for args, message in [
        (["--quantize", "int8"], "--quantize int8 needs --calibrate"),
        (["--quantize", "int8", "--calibrate", "x.bin", "--format", "torchscript"], "is for --format onnx"),
        (["--calibrate", "x.bin"], "without it the export stays float32"),
    ]:
        result = export_cli("--checkpoint", ckpt, "--output", "never.onnx", *args)
        assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output

"""ONNX exports run by ONNX Runtime: ``facecore eval --onnx``, ``Predictor(onnx_path=...)`` without torch, metadata."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import TinyIRPlugin, TinyNet, face_like_images, make_tiny_ir_export_set, subprocess_env
from PIL import Image

import facecore
from facecore.cli import main
from facecore.core import plugins
from facecore.core.config import load_config
from facecore.data.synthetic_ijb import make_ijb_data
from facecore.errors import DataError
from facecore.eval.export import check_limit, export_onnx
from facecore.eval.onnx_runtime import OnnxModel, metadata
from facecore.eval.quantize import calibration_images, export_int8

BACKBONE = "tiny-onnx-eval-net"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny IR checkpoint, its float32 and int8 exports, two face PNGs and a small synthetic IJB-C."""
    root = tmp_path_factory.mktemp("onnx-eval")
    plugin = TinyIRPlugin(BACKBONE)
    plugins.pm.register(plugin, name="tiny-onnx-eval-plugin")
    try:
        net = make_tiny_ir_export_set(root, BACKBONE)
        config = load_config(str(root / "config.yaml"))
        export_onnx(net, root / "fp32.onnx", metadata=metadata(config, threshold=0.4))
        images, label = calibration_images(root / "calib.bin", 112)
        export_int8(net, root / "int8.onnx", images, label, check=False,
                    metadata=metadata(config, quantized="int8 (test)", threshold=0.4))
    finally:
        plugins.pm.unregister(plugin)
    for name, image in zip("ab", face_like_images(2, seed=5)):
        Image.fromarray(image).save(root / f"{name}.png")
    make_ijb_data(root / "ijb", identities=2, templates_per_identity=2, seed=0, progress=False)
    return root, net


@pytest.fixture
def tiny_plugin(register_plugin):
    register_plugin(TinyIRPlugin(BACKBONE), name="tiny-onnx-eval-plugin")


def eval_json(*args):
    result = CliRunner().invoke(main, ["eval", *args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_onnx_model_matches_torch_and_carries_its_description(models):
    root, net = models
    model = OnnxModel(root / "fp32.onnx")
    x = torch.rand(5, 3, 112, 112) * 2 - 1
    with torch.no_grad():
        want = net(x).numpy()
    got = model.run(x.numpy())
    np.testing.assert_allclose(got, want, atol=check_limit(want))
    as_tensor = model(x)  # the form the eval pass calls it with
    assert isinstance(as_tensor, torch.Tensor) and torch.equal(as_tensor, torch.from_numpy(got))
    assert (model.backbone, model.embedding_size, model.img_size, model.precision) == (BACKBONE, 16, 112, "float32")
    assert model.threshold == pytest.approx(0.4) and model.metadata["version"] == facecore.__version__
    assert model.config["model"]["backbone"] == BACKBONE and "(x - 127.5) / 127.5" in model.metadata["input"]


def test_eval_onnx_reports_what_eval_of_the_checkpoint_reports(models, tiny_plugin):
    root, _ = models
    bin_file = str(root / "test.bin")
    torch_run = eval_json("--checkpoint", str(root / "best.pth"), "--bin", bin_file)
    fp32_run = eval_json("--onnx", str(root / "fp32.onnx"), "--bin", bin_file)
    assert torch_run["runtime"] == "torch" and fp32_run["runtime"] == "onnxruntime float32"
    assert fp32_run["checkpoint"] == str(root / "fp32.onnx") and fp32_run["config"] == "stored in the ONNX model"
    want, got = torch_run["results"]["test"], fp32_run["results"]["test"]
    assert set(got) == set(want)
    for key, value in want.items():
        assert got[key] == (None if value is None else pytest.approx(value, abs=1e-6)), key
    int8_run = eval_json("--onnx", str(root / "int8.onnx"), "--bin", bin_file)
    assert int8_run["runtime"] == "onnxruntime int8" and set(int8_run["results"]["test"]) == set(want)


def test_eval_onnx_runs_the_ijb_protocol(models, tiny_plugin):
    root, _ = models
    ijb = str(root / "ijb")
    want = eval_json("--checkpoint", str(root / "best.pth"), "--ijb", ijb, "--num-workers", "0")["ijb"]["IJBC"]
    got = eval_json("--onnx", str(root / "fp32.onnx"), "--ijb", ijb, "--num-workers", "0")["ijb"]["IJBC"]
    assert got["pairs"] == want["pairs"] > 0
    assert got["auc"] == pytest.approx(want["auc"], abs=1e-6)
    assert got["tar_nearest_fpr"] == pytest.approx(want["tar_nearest_fpr"], abs=1e-6)


def test_predictor_with_onnx_needs_no_torch(models, tiny_plugin):
    root, _ = models
    a, b = str(root / "a.png"), str(root / "b.png")
    script = (
        "import json, sys\n"
        "import facecore\n"
        f"p = facecore.Predictor(onnx_path={str(root / 'fp32.onnx')!r})\n"
        f"e = p.embed([{a!r}, {b!r}])\n"
        f"out = dict(emb=e.tolist(), sim=p.predict({a!r}, {b!r}), same=p.is_same({a!r}, {b!r}), thr=p.threshold)\n"
        "out['torch'] = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
        "print(json.dumps(out))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=subprocess_env(),
                          timeout=120)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["torch"] == []
    reference = facecore.Predictor(checkpoint_path=str(root / "best.pth"), use_cpu=True)
    np.testing.assert_allclose(np.array(out["emb"]), reference.embed([a, b]), atol=1e-5)
    assert out["sim"] == pytest.approx(reference.predict(a, b), abs=1e-5)
    assert out["thr"] == pytest.approx(reference.threshold) == pytest.approx(0.4)
    assert out["same"] is (out["sim"] > 0.4)


def test_predictor_with_int8_follows_the_protocol(models):
    root, _ = models
    p = facecore.Predictor(onnx_path=str(root / "int8.onnx"))
    a = np.asarray(Image.open(root / "a.png"))
    e = p.embed(np.stack([a, a[:, ::-1]]))  # an image and its mirror: the flip-sum makes them one embedding
    assert e.shape == (2, 16) and np.linalg.norm(e, axis=1) == pytest.approx([1, 1], abs=1e-5)
    np.testing.assert_allclose(e[0], e[1], atol=1e-5)
    with pytest.raises(Exception, match="onnx_path= alone"):
        facecore.Predictor(str(root / "config.yaml"), onnx_path=str(root / "int8.onnx"))


def _plain_onnx(path):
    """An ONNX model facecore did not write: no metadata."""
    net = TinyNet(8).eval()
    with warnings.catch_warnings():  # the TorchScript-based exporter warns it is legacy
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.zeros(1, 3, 112, 112),), str(path), dynamo=False, input_names=["images"])
    return path


@pytest.mark.parametrize("case", ["not facecore", "not onnx", "missing"])
def test_a_file_that_is_not_a_facecore_export_is_named(models, tmp_path, case):
    root, _ = models
    path = tmp_path / "model.onnx"
    if case == "not facecore":
        _plain_onnx(path)
        message = "is not a facecore export (no facecore.version"
    elif case == "not onnx":
        path.write_bytes(b"this is not a protobuf")
        message = "is not an ONNX model ONNX Runtime can load"
    else:
        message = "ONNX model not found"
    result = CliRunner().invoke(main, ["eval", "--onnx", str(path), "--bin", str(root / "test.bin")])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert message in result.output and str(path) in result.output
    assert not (tmp_path / "logs").exists() and sorted(tmp_path.iterdir()) == ([path] if path.exists() else [])
    with pytest.raises(DataError, match=message.replace("(", r"\(")):
        facecore.Predictor(onnx_path=str(path))


def test_eval_takes_a_checkpoint_or_an_onnx_model(models):
    root, _ = models
    for args, word in [([], "neither"), (["--checkpoint", str(root / "best.pth"), "--onnx", str(root / "fp32.onnx")],
                                         "both")]:
        result = CliRunner().invoke(main, ["eval", *args, "--bin", str(root / "test.bin")])
        assert result.exit_code == 2 and f"or an ONNX export (--onnx), not {word}" in result.output
    result = CliRunner().invoke(main, ["eval", "--onnx", str(root / "fp32.onnx"), "--device", "cuda"])
    assert result.exit_code != 0 and "Traceback" not in result.output

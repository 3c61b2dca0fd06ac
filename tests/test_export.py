"""``facecore export``: ONNX (dynamic batch, opset 17) and TorchScript, checked against PyTorch."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import yaml
from click.testing import CliRunner
from helpers import TinyBackbonePlugin, TinyNet

import facecore
from facecore.eval import export as export_module
from facecore.core.checkpoint import save_checkpoint
from facecore.cli import main

BACKBONE = "tiny-export-net"


@pytest.fixture
def checkpoint(register_plugin, tmp_path):
    register_plugin(TinyBackbonePlugin(BACKBONE), name="tiny-export-plugin")
    config = {"device": "cpu", "model": {"backbone": BACKBONE, "embedding_size": 8},
              "head": {"type": "arcface", "num_classes": 10}, "data": {"root": str(tmp_path)}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    torch.manual_seed(0)
    net = TinyNet(8)
    for bn in (net.body[1], net.body[6]):  # non-trivial running statistics, as after training
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    net.eval()
    save_checkpoint({"config": facecore.load_config(str(tmp_path / "config.yaml")), "backbone": net.state_dict()},
                    tmp_path / "best.pth")
    return tmp_path, net


def export_cli(*args):
    return CliRunner().invoke(main, ["export", *args])


def test_onnx_export_has_a_dynamic_batch_and_matches_pytorch(checkpoint):
    root, net = checkpoint
    out = root / "model.onnx"
    result = export_cli("--checkpoint", str(root / "best.pth"), "--format", "onnx", "--output", str(out))
    assert result.exit_code == 0, result.output
    assert "max abs diff" in result.output and "opset 17" in result.output
    model = onnx.load(str(out))
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [17]
    batch_dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert model.graph.input[0].name == "images" and batch_dim.dim_param == "batch"
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for n in (1, 5):
        x = torch.rand(n, 3, 112, 112) * 2 - 1
        got = session.run(["embeddings"], {"images": x.numpy()})[0]
        with torch.no_grad():
            np.testing.assert_allclose(got, net(x).numpy(), atol=1e-4)


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_torchscript_export_matches_pytorch(checkpoint):
    root, net = checkpoint
    out = root / "model.pt"
    result = export_cli("--checkpoint", str(root / "best.pth"), "--format", "torchscript", "--output", str(out))
    assert result.exit_code == 0, result.output
    loaded = torch.jit.load(str(out))
    x = torch.rand(4, 3, 112, 112) * 2 - 1
    with torch.no_grad():
        np.testing.assert_allclose(loaded(x).numpy(), net(x).numpy(), atol=1e-5)


def test_a_mismatching_export_is_an_error(checkpoint, monkeypatch):
    root, _ = checkpoint
    monkeypatch.setattr(export_module, "TOLERANCE", -1.0)  # any difference, even 0, now counts as a mismatch
    result = export_cli("--checkpoint", str(root / "best.pth"), "--output", str(root / "m.onnx"))
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "differs from the PyTorch model" in result.output and "m.onnx" in result.output


def test_without_onnxruntime_the_check_is_skipped(checkpoint, monkeypatch):
    root, _ = checkpoint
    monkeypatch.setattr(export_module, "onnxruntime_available", lambda: False)
    result = export_cli("--checkpoint", str(root / "best.pth"), "--output", str(root / "m.onnx"))
    assert result.exit_code == 0, result.output
    assert "onnxruntime is not installed" in result.output and (root / "m.onnx").is_file()


def test_bare_state_dict_needs_a_config(checkpoint):
    root, net = checkpoint
    torch.save(net.state_dict(), root / "backbone.pth")
    result = export_cli("--checkpoint", str(root / "backbone.pth"), "--output", str(root / "m.onnx"))
    assert result.exit_code != 0 and "--config" in result.output and "Traceback" not in result.output
    result = export_cli("--checkpoint", str(root / "backbone.pth"), "--config", str(root / "config.yaml"),
                        "--output", str(root / "m.onnx"), "--no-check")
    assert result.exit_code == 0 and "not checked (--no-check)" in result.output


def test_check_limit_scales_with_large_outputs():
    # fp32 rounding grows with the values: 1e-4 absolute up to |output| 1, then 1e-4 per unit
    assert export_module.check_limit(np.array([0.5, -0.25])) == pytest.approx(1e-4)
    assert export_module.check_limit(np.array([3.0, -2000.0])) == pytest.approx(0.2)

"""Predictor (embeddings, similarity, stored threshold) and ``facecore predict``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from helpers import TinyBackbonePlugin, TinyNet
from PIL import Image

import facecore
from facecore.core.checkpoint import save_checkpoint
from facecore.cli import main
from facecore.errors import CheckpointError, FacecoreError

BACKBONE = "tiny-predict-net"


@pytest.fixture
def model_dir(register_plugin, tmp_path):
    """Three PNG faces, a checkpoint with validation thresholds, one without, and the network."""
    register_plugin(TinyBackbonePlugin(BACKBONE), name="tiny-predict-plugin")
    rng = np.random.default_rng(0)
    for name in "abc":
        small = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
        Image.fromarray(small).resize((112, 112), Image.BILINEAR).save(tmp_path / f"{name}.png")
    config = {"device": "cpu", "model": {"backbone": BACKBONE, "embedding_size": 8},
              "head": {"type": "arcface", "num_classes": 10}, "data": {"root": str(tmp_path)}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    effective = facecore.load_config(str(tmp_path / "config.yaml"))
    torch.manual_seed(0)
    net = TinyNet(8).eval()
    # squared-distance thresholds 1.2 and 1.4 are cosine thresholds 0.4 and 0.3: mean 0.35
    val = {"lfw": {"accuracy": 0.9, "best_threshold": 1.2}, "cfp_fp": {"accuracy": 0.8, "best_threshold": 1.4}}
    save_checkpoint({"config": effective, "backbone": net.state_dict(), "val_metrics": val}, tmp_path / "best.pth")
    save_checkpoint({"config": effective, "backbone": net.state_dict(), "val_metrics": {}}, tmp_path / "last.pth")
    torch.save(net.state_dict(), tmp_path / "backbone.pth")
    return tmp_path, net


def reference_embedding(net, path):
    """Flip-summed, normalized embedding computed here from the file (PNG: decoding is exact)."""
    x = torch.from_numpy(np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)).permute(2, 0, 1)[None]
    x = (x - 127.5) / 127.5
    with torch.no_grad():
        e = (net(x) + net(torch.flip(x, dims=[3])))[0].double().numpy()
    return e / np.linalg.norm(e)


def test_embed_and_predict_follow_the_evaluation_protocol(model_dir):
    root, net = model_dir
    predictor = facecore.Predictor(checkpoint_path=str(root / "best.pth"))
    paths = [str(root / f"{n}.png") for n in "abc"]
    emb = predictor.embed(paths)
    assert emb.shape == (3, 8) and emb.dtype == np.float32
    for row, path in zip(emb, paths):
        np.testing.assert_allclose(row, reference_embedding(net, path), atol=1e-5)
    sim = predictor.predict(paths[0], paths[1])
    assert sim == pytest.approx(float(reference_embedding(net, paths[0]) @ reference_embedding(net, paths[1])), abs=1e-5)
    assert predictor.predict(paths[1], paths[0]) == pytest.approx(sim, abs=1e-6)
    assert predictor.predict(paths[2], paths[2]) == pytest.approx(1.0, abs=1e-6)


def test_paths_pil_images_and_arrays_are_the_same_input(model_dir):
    root, _ = model_dir
    predictor = facecore.Predictor(None, str(root / "best.pth"), use_cpu=True)
    assert predictor.device == torch.device("cpu")
    path = root / "a.png"
    array = np.asarray(Image.open(path).convert("RGB"))
    from_path = predictor.embed(str(path))
    assert from_path.shape == (1, 8)
    np.testing.assert_allclose(predictor.embed(Image.open(path)), from_path, atol=1e-6)
    np.testing.assert_allclose(predictor.embed(array), from_path, atol=1e-6)
    batch = predictor.embed(np.stack([array, array]))  # (N, H, W, 3) uint8 is a batch
    np.testing.assert_allclose(batch, np.vstack([from_path, from_path]), atol=1e-6)


def test_other_sizes_are_resized_with_a_warning(model_dir):
    root, _ = model_dir
    predictor = facecore.Predictor(checkpoint_path=str(root / "best.pth"))
    big = np.asarray(Image.open(root / "a.png").convert("RGB").resize((150, 150)))
    with pytest.warns(UserWarning, match="150x150"):
        emb = predictor.embed(big)
    assert emb.shape == (1, 8)


def test_threshold_from_validation_results(model_dir):
    root, _ = model_dir
    predictor = facecore.Predictor(checkpoint_path=str(root / "best.pth"))
    assert predictor.threshold == pytest.approx(0.35)
    a, b = str(root / "a.png"), str(root / "b.png")
    sim = predictor.predict(a, b)
    assert predictor.is_same(a, b) is (sim > 0.35)
    assert predictor.is_same(a, b, threshold=sim - 1e-3) is True
    assert predictor.is_same(a, b, threshold=sim + 1e-3) is False


def test_no_stored_threshold(model_dir):
    root, _ = model_dir
    predictor = facecore.Predictor(checkpoint_path=str(root / "last.pth"))
    assert predictor.threshold is None
    with pytest.raises(FacecoreError, match="no threshold"):
        predictor.is_same(str(root / "a.png"), str(root / "b.png"))


def test_bare_state_dict_needs_a_config(model_dir):
    root, net = model_dir
    with pytest.raises(CheckpointError, match="--config"):
        facecore.Predictor(checkpoint_path=str(root / "backbone.pth"))
    predictor = facecore.Predictor(str(root / "config.yaml"), str(root / "backbone.pth"))
    assert predictor.threshold is None
    np.testing.assert_allclose(predictor.embed(str(root / "a.png"))[0], reference_embedding(net, root / "a.png"), atol=1e-5)


def predict_cli(*args):
    return CliRunner().invoke(main, ["predict", *args])


def test_predict_command(model_dir):
    root, net = model_dir
    a, b = str(root / "a.png"), str(root / "b.png")
    sim = float(reference_embedding(net, a) @ reference_embedding(net, b))
    result = predict_cli(a, b, "--checkpoint", str(root / "best.pth"))
    assert result.exit_code == 0, result.output
    assert f"similarity: {sim:.4f}" in result.output
    assert ("same person" if sim > 0.35 else "different people") in result.output and "0.3500" in result.output
    result = predict_cli(a, a, "--checkpoint", str(root / "last.pth"), "--json")
    assert json.loads(result.stdout) == {"similarity": pytest.approx(1.0, abs=1e-6), "threshold": None, "same": None}
    result = predict_cli(a, b, "--checkpoint", str(root / "last.pth"), "--threshold", str(sim - 0.01), "--json")
    assert json.loads(result.stdout)["same"] is True
    result = predict_cli(a, b, "--checkpoint", str(root / "last.pth"))
    assert "pass --threshold" in result.output


def test_predict_command_errors(model_dir, monkeypatch):
    root, _ = model_dir
    a = str(root / "a.png")
    result = predict_cli(a, a, "--checkpoint", str(root / "backbone.pth"))
    assert result.exit_code != 0 and "--config" in result.output and "Traceback" not in result.output
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = predict_cli(a, a, "--checkpoint", str(root / "best.pth"), "--device", "cuda")
    assert result.exit_code != 0 and "cuda" in result.output and "Traceback" not in result.output
    (root / "broken.png").write_bytes(b"\x89PNG but not really")
    result = predict_cli(a, str(root / "broken.png"), "--checkpoint", str(root / "best.pth"))
    assert result.exit_code != 0 and "broken.png" in result.output and "Traceback" not in result.output

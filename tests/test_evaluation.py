"""The evaluator (embed with mirrors, metrics, device choice) and the ``facecore eval`` command."""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from PIL import Image
from torch import nn

import facecore
from facecore import hookimpl
from facecore.core.checkpoint import save_checkpoint
from facecore.cli import main
from facecore.errors import FacecoreError
from facecore.eval.evaluation import embed, evaluate_pair_set, l2_normalize, resolve_device

BACKBONE = "tiny-eval-net"


class TinyNet(nn.Module):
    """A few-thousand-parameter backbone: conv, BN, PReLU, pool, linear, BN."""

    def __init__(self, embedding_size: int = 8, width: int = 4):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, width, 3, 2, 1, bias=False), nn.BatchNorm2d(width), nn.PReLU(width),
                                  nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(16 * width, embedding_size),
                                  nn.BatchNorm1d(embedding_size))
        self.seen: list[tuple[bool, bool]] = []  # (training, grad enabled) at each forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append((self.training, torch.is_grad_enabled()))
        return self.body(x)


class TinyPlugin:
    @hookimpl
    def register_backbones(self, register):
        schema = {"type": "object", "additionalProperties": False,
                  "properties": {"width": {"type": "integer", "minimum": 1, "default": 4}}}
        register(BACKBONE, TinyNet, schema=schema, description="test backbone")


@pytest.fixture
def tiny(register_plugin):
    register_plugin(TinyPlugin(), name="tiny-eval-plugin")
    return TinyNet


def jpeg(seed: int, size: int = 112) -> bytes:
    """A distinct, smooth colour pattern per seed (JPEG bytes)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((size, size), Image.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def write_pairs(path: Path, pairs: int, seed: int = 0) -> np.ndarray:
    """A .bin set where "same" pairs are the same image twice and "different" pairs two patterns."""
    rng = np.random.default_rng(seed)
    issame = np.arange(pairs) % 2 == 0
    rng.shuffle(issame)
    bins = []
    for i, same in enumerate(issame):
        a = jpeg(seed * 10_000 + 2 * i)
        bins += [a, a if same else jpeg(seed * 10_000 + 2 * i + 1)]
    path.write_bytes(pickle.dumps((bins, [bool(s) for s in issame]), protocol=4))
    return issame


@pytest.fixture
def run_dir(tiny, tmp_path):
    """data/lfw.bin + data/cfp_fp.bin, a config, and best.pth holding that config and weights."""
    data = tmp_path / "data"
    data.mkdir()
    write_pairs(data / "lfw.bin", 20, seed=1)
    write_pairs(data / "cfp_fp.bin", 30, seed=2)
    config = {
        "device": "cpu",
        "model": {"backbone": BACKBONE, "embedding_size": 8},
        "head": {"type": "arcface", "num_classes": 10},
        "data": {"root": str(data)},
        "logging": {"log_dir": str(tmp_path / "logs"), "tensorboard": True},
        "eval": {"bin_file": ["lfw.bin", "cfp_fp.bin"], "test_batch_size": 16},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    effective = facecore.load_config(str(tmp_path / "config.yaml"))
    torch.manual_seed(0)
    net = TinyNet(8)
    save_checkpoint({"config": effective, "backbone": net.state_dict(), "step": 7,
                     "val_metrics": {"lfw": {"accuracy": 0.9, "best_threshold": 1.2}}}, tmp_path / "best.pth")
    torch.save(net.state_dict(), tmp_path / "backbone.pth")  # a bare state dict, as InsightFace ships
    return tmp_path


def invoke(*args: str):
    return CliRunner().invoke(main, ["eval", *args])


# ----------------------------------------------------------------------------- evaluator
@pytest.mark.parametrize("was_training", [True, False])
def test_embed_order_mirrors_mode_and_grad(was_training):
    torch.manual_seed(0)
    net = TinyNet(6).train(was_training)
    images = [torch.rand(3, 112, 112) * 2 - 1 for _ in range(7)]
    plain, mirrored = embed(net, images, batch_size=3, device="cpu")
    assert net.training is was_training
    assert net.seen and all(mode == (False, False) for mode in net.seen)  # eval mode, no grad
    assert plain.dtype == np.float32 and plain.shape == (7, 6) and mirrored.shape == (7, 6)
    batch = torch.stack(images)
    with torch.no_grad():
        net.eval()
        np.testing.assert_allclose(plain, net(batch).numpy(), atol=1e-5)
        np.testing.assert_allclose(mirrored, net(torch.flip(batch, dims=[3])).numpy(), atol=1e-5)
    assert not np.allclose(plain, mirrored)


def test_embed_accepts_image_label_items():
    net = TinyNet(4)
    images = [torch.rand(3, 112, 112) for _ in range(5)]
    plain, _ = embed(net, [(x, 0) for x in images], batch_size=2, device="cpu")
    np.testing.assert_allclose(plain, embed(net, images, batch_size=5, device="cpu")[0], atol=1e-6)


class Recorder:
    """A metric that keeps what it was given."""

    def __init__(self, flip: bool, key: str):
        self.flip, self.key, self.got = flip, key, None

    def __call__(self, embeddings, issame):
        self.got = embeddings
        return {self.key: float(len(issame))}


class Pairs(list):
    issame = np.array([True, False, True])


def test_evaluate_pair_set_gives_each_metric_its_flip_choice():
    torch.manual_seed(0)
    net = TinyNet(5)
    data = Pairs(torch.rand(3, 112, 112) * 2 - 1 for _ in range(6))
    with_flip, without = Recorder(True, "a"), Recorder(False, "b")
    out = evaluate_pair_set(net, data, [("a", with_flip), ("b", without)], batch_size=4, device="cpu")
    assert out == {"a": 3.0, "b": 3.0}
    plain, mirrored = embed(net, data, 4, "cpu")
    np.testing.assert_allclose(with_flip.got, l2_normalize(plain + mirrored), atol=1e-6)
    np.testing.assert_allclose(without.got, l2_normalize(plain), atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(with_flip.got, axis=1), 1, atol=1e-6)


def test_resolve_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(FacecoreError, match="cuda"):
        resolve_device("cuda")
    with pytest.raises(FacecoreError, match="'gpu' is not one of auto, cpu, cuda"):
        resolve_device("gpu")


def test_bundled_metrics_on_the_real_pair_set(tiny, run_dir):
    # same pairs are identical images, so any backbone separates them: accuracy 1 checks the pairing
    dataset = facecore.create("datasets", "bin-pairs", path=str(run_dir / "data" / "lfw.bin"))
    metrics = [(n, facecore.create("metrics", n)) for n in ("verification", "auc", "eer")]
    out = evaluate_pair_set(TinyNet(8), dataset, metrics, batch_size=8, device="cpu")
    assert out["accuracy"] == 1.0 and out["auc"] == 1.0 and out["eer"] == 0.0


# ----------------------------------------------------------------------------- facecore eval
def test_eval_with_the_stored_config(run_dir):
    result = invoke("--checkpoint", str(run_dir / "best.pth"), "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert list(report["results"]) == ["lfw", "cfp_fp"]
    lfw = report["results"]["lfw"]
    assert lfw["accuracy"] == 1.0 and lfw["auc"] == 1.0 and lfw["eer"] == 0.0
    assert lfw["tar@far=1e-01"] == 1.0
    assert lfw["tar@far=1e-03"] is None  # 10 different pairs cannot measure FAR 1e-3: NaN -> null
    assert report["step"] == 7
    assert "warning [lfw]: tar_at_far: FAR 0.001 needs at least 1000 different pairs" in result.stderr
    logs = run_dir / "logs"
    stem = f"test_result_{BACKBONE}_{report['timestamp']}"
    assert json.loads((logs / f"{stem}.json").read_text()) == report
    text = (logs / f"{stem}.txt").read_text()
    assert "lfw" in text and "cfp_fp" in text and "100.00 ± 0.00" in text
    for name, png in report["roc_plots"].items():
        with Image.open(png) as img:
            assert img.format == "PNG" and img.size == (640, 480), name
    assert list((logs / "tensorboard" / BACKBONE).glob("eval_*/events.out.tfevents.*"))


def test_eval_table_bins_name_and_no_tensorboard(run_dir):
    extra = run_dir / "extra.bin"
    write_pairs(extra, 12, seed=3)
    result = invoke("--checkpoint", str(run_dir / "best.pth"), "--bin", str(extra), "--name", "mine",
                    "--batch-size", "5", "--set", "logging.tensorboard=false")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split()[:3] == ["set", "accuracy", "(%)"] and "AUC" in lines[0] and "EER" in lines[0]
    assert [ln.split()[0] for ln in lines[2:]] == ["extra"]
    assert len(list((run_dir / "logs").glob("test_result_mine_*.txt"))) == 1
    assert len(list((run_dir / "logs").glob("roc_mine_extra_*.png"))) == 1
    assert not (run_dir / "logs" / "tensorboard").exists()


def test_eval_bare_state_dict_needs_a_config(run_dir):
    result = invoke("--checkpoint", str(run_dir / "backbone.pth"))
    assert result.exit_code != 0
    assert "pass --config" in result.output and "Traceback" not in result.output
    result = invoke("--checkpoint", str(run_dir / "backbone.pth"), "--config", str(run_dir / "config.yaml"), "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["results"]["lfw"]["accuracy"] == 1.0


def test_eval_checkpoint_for_another_model(run_dir):
    result = invoke("--checkpoint", str(run_dir / "best.pth"), "--set", "model.embedding_size=16")
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "best.pth" in result.output and f"backbone '{BACKBONE}'" in result.output
    assert "embedding_size 8" in result.output and "shape mismatch" in result.output


def test_eval_file_that_is_not_a_checkpoint(run_dir):
    bad = run_dir / "notes.pth"
    bad.write_bytes(b"not a checkpoint at all")
    result = invoke("--checkpoint", str(bad), "--config", str(run_dir / "config.yaml"))
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "notes.pth is not a PyTorch checkpoint" in result.output


def test_eval_cuda_without_cuda(run_dir, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = invoke("--checkpoint", str(run_dir / "best.pth"), "--device", "cuda")
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "cuda" in result.output and "--device cpu" in result.output
    result = invoke("--checkpoint", str(run_dir / "best.pth"), "--device", "gpu")
    assert result.exit_code != 0 and "'gpu' is not one of" in result.output and "Traceback" not in result.output


def test_eval_missing_pair_set_and_none_configured(run_dir):
    result = invoke("--checkpoint", str(run_dir / "best.pth"), "--bin", str(run_dir / "nope.bin"))
    assert result.exit_code != 0 and "pair set not found" in result.output and "nope.bin" in result.output
    result = invoke("--checkpoint", str(run_dir / "best.pth"), "--set", "eval.bin_file=null")
    assert result.exit_code != 0 and "eval.bin_file" in result.output and "Traceback" not in result.output


# ----------------------------------------------------------------------------- ROC plot
def test_roc_plot_axis_and_curves(tmp_path):
    from facecore.eval.evaluation import RocCurve
    from facecore.eval.roc_plot import COLORS, fpr_floor, plot_roc, thin_polyline

    # 3,000 different pairs: the finest FPR step is 1/3000, so the log axis starts at 1e-4
    fine = RocCurve(np.r_[0.0, np.arange(1, 3001) / 3000], np.r_[0.0, np.linspace(0.5, 1, 3000)], np.zeros(3001))
    coarse = RocCurve(np.array([0.0, 0.5, 1.0]), np.array([0.0, 0.9, 1.0]), np.zeros(3))
    assert fpr_floor({"a": fine}) == pytest.approx(1e-4)
    assert fpr_floor({"b": coarse}) == pytest.approx(0.1)
    assert fpr_floor({"a": fine, "b": coarse}) == pytest.approx(1e-4)
    img = plot_roc({"a": fine, "b": coarse}, tmp_path / "roc.png", size=(400, 300))
    with Image.open(tmp_path / "roc.png") as saved:
        assert saved.size == (400, 300) and saved.format == "PNG"
    colours = {tuple(c) for c in np.asarray(img).reshape(-1, 3)}
    assert COLORS[0] in colours and COLORS[1] in colours
    # thinning keeps the first and last point of each pixel column, so the ends survive
    xs = np.linspace(0, 10, 1000)
    pts = thin_polyline(xs, xs * 2)
    assert pts[0] == (0.0, 0.0) and pts[-1] == (10.0, 20.0) and len(pts) <= 22


# ----------------------------------------------------------------------------- the library
def test_pair_set_names_are_stems_made_unique():
    from facecore.core.build import pair_set_names

    assert pair_set_names(["a/lfw.bin", "b/lfw.bin", "cfp_fp.bin", "c/lfw.bin"]) == ["lfw", "lfw-2", "cfp_fp", "lfw-3"]
    assert pair_set_names([]) == []


def test_evaluate_returns_results_and_writes_only_when_asked(run_dir):
    extra = run_dir / "data" / "sub" / "lfw.bin"
    extra.parent.mkdir()
    write_pairs(extra, 12, seed=3)
    lines = []
    result = facecore.evaluate(str(run_dir / "best.pth"), bins=[run_dir / "data" / "lfw.bin", extra], say=lines.append)
    assert [s.name for s in result.sets] == ["lfw", "lfw-2"] and result.step == 7
    assert result.results["lfw"]["accuracy"] == 1.0 and result.sets[0].roc is not None
    assert lines[0].startswith("evaluating lfw (20 pairs) on cpu")
    assert not (run_dir / "logs").exists()  # nothing written yet
    written = result.write()
    assert all(p.is_file() for p in written) and len(written) == 4  # .txt, .json, two ROC PNGs
    assert json.loads(written[1].read_text())["roc_plots"] == {s.name: str(s.plot) for s in result.sets}

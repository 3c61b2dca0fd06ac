"""Label cleaning: ``demo-data --label-noise`` writes the stated share of wrong labels and the truth, and
``facecore clean`` partitions a RecordIO set by the angle to each class's dominant sub-center, with the
angles of an independent NumPy computation, a kept set that reads back, and bad input refused."""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from facecore import cli, create
from facecore.core.build import build_backbone
from facecore.core.checkpoint import save_checkpoint
from facecore.core.config import validate_config
from facecore.data.recordio import RecordReader, unpack
from facecore.data.synthetic import encode_jpeg, make_demo_data, read_label_noise, render_sample
from facecore.errors import ConfigError
from facecore.eval.cleaning import Angles, dominant_subcenters

IDS, PER_ID, NOISE, SEED = 6, 5, 0.2, 3
SMALL = dict(train_identities=IDS, images_per_identity=PER_ID, test_identities=4, test_images_per_identity=3, pairs=20)
K, EMB = 3, 16


def _run(*args: str):
    return CliRunner().invoke(cli.main, list(args))


def _records(root: Path) -> dict[int, tuple[int, bytes]]:
    """{key: (label, image bytes)} of every image record of an InsightFace-layout set."""
    reader = RecordReader(root / "train.rec", root / "train.idx")
    a = int(reader.header(0).label[0])
    out = {}
    for key in range(1, a):
        header, data = unpack(reader.read(key))
        out[key] = (int(header.label), bytes(data))
    return out


@pytest.fixture(scope="module")
def noisy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo data with 20% label noise, made through the CLI."""
    out = tmp_path_factory.mktemp("noisy") / "demo"
    args = ["demo-data", str(out), "--label-noise", str(NOISE), "--seed", str(SEED)]
    args += [f"--{k.replace('_', '-')}={v}" for k, v in SMALL.items()]
    result = _run(*args)
    assert result.exit_code == 0, result.output
    assert "6 of 30 training images carry another identity's label" in result.output
    return out


# -- demo-data --label-noise ------------------------------------------------------------------------
def test_label_noise_relabels_the_stated_share_and_writes_the_truth(noisy: Path):
    truth = read_label_noise(noisy / "train" / "label_noise.tsv")
    records = _records(noisy / "train")
    assert len(records) == IDS * PER_ID and len(truth) == round(NOISE * IDS * PER_ID)
    for key, (given, true) in truth.items():
        label, data = records[key]
        assert label == given != true  # packed under the wrong identity
        # the image really is one of the true identity's (byte-identical to its rendering)
        assert any(data == encode_jpeg(render_sample(SEED, true, n)[0]) for n in range(PER_ID))
    clean_keys = set(records) - set(truth)
    counts = np.bincount([records[k][0] for k in clean_keys], minlength=IDS)
    assert counts.min() >= 1  # every identity keeps images under its own label


def test_label_noise_is_deterministic_from_the_seed(noisy: Path, tmp_path: Path):
    again = make_demo_data(tmp_path / "a", seed=SEED, label_noise=NOISE, progress=False, workers=1, **SMALL)
    other = make_demo_data(tmp_path / "b", seed=SEED + 1, label_noise=NOISE, progress=False, workers=1, **SMALL)
    truth = (noisy / "train" / "label_noise.tsv").read_text()
    assert Path(again["label_noise_file"]).read_text() == truth
    assert Path(other["label_noise_file"]).read_text() != truth
    with pytest.raises(ConfigError, match="label_noise"):  # one image per identity: none may move
        make_demo_data(tmp_path / "c", label_noise=0.5, **{**SMALL, "images_per_identity": 1})


# -- clean ------------------------------------------------------------------------------------------
def _config(data: Path, head: dict) -> dict:
    return validate_config({
        "seed": 0, "device": "cpu",
        "model": {"backbone": "fastcontextface", "embedding_size": EMB, "depths": [1, 1, 1, 1], "dims": [8, 8, 8, 16]},
        "head": {"num_classes": IDS, **head},
        "data": {"root": str(data), "batch_size": 8, "num_workers": 0},
        "eval": {"test_batch_size": 7},
    })


def _embed(config: dict, backbone: torch.nn.Module, data: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(keys, labels, float64 embeddings) of every image, decoded with Pillow one at a time."""
    keys, labels, feats = [], [], []
    with torch.no_grad():
        for key, (label, data_bytes) in sorted(_records(data).items()):
            pixels = np.asarray(Image.open(BytesIO(data_bytes)).convert("RGB"), dtype=np.float32)
            x = torch.from_numpy((pixels - 127.5) / 127.5).permute(2, 0, 1)[None]
            keys.append(key)
            labels.append(label)
            feats.append(backbone(x)[0].double().numpy())
    return np.array(keys), np.array(labels), np.stack(feats)


def _checkpoint(tmp: Path, data: Path, head: dict, k: int) -> tuple[Path, dict, np.ndarray]:
    """A checkpoint whose centers sit near its class's images (so the angles spread), and the true angles."""
    torch.manual_seed(0)
    config = _config(data, head)
    backbone = build_backbone(config).eval()
    keys, labels, feats = _embed(config, backbone, data)
    unit = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    rng = np.random.default_rng(0)
    means = np.stack([unit[labels == c].mean(0) for c in range(IDS)])
    centers = np.repeat(means, k, axis=0) + rng.normal(0, 0.3 * np.abs(means).mean(), (IDS * k, EMB))
    path = tmp / f"k{k}.pth"
    save_checkpoint({"config": config, "backbone": backbone.state_dict(),
                     "classifier": {"weight": torch.from_numpy(centers).float()}}, path)
    # the independent reference: float64 NumPy, nearest and dominant sub-centers counted by hand
    w = centers.astype(np.float32).astype(np.float64)
    w /= np.linalg.norm(w, axis=1, keepdims=True)
    cos = np.stack([w[labels[i] * k : labels[i] * k + k] @ unit[i] for i in range(len(keys))])
    dominant = []
    for c in range(IDS):
        votes = [0] * k
        for i in np.flatnonzero(labels == c):
            votes[int(np.argmax(cos[i]))] += 1
        dominant.append(votes.index(max(votes)))
    angles = np.degrees(np.arccos(np.clip([cos[i, dominant[labels[i]]] for i in range(len(keys))], -1, 1)))
    return path, config, np.stack([keys, labels, angles], 1)


def _table(path: Path) -> np.ndarray:
    return np.loadtxt(path, delimiter="\t", skiprows=1, ndmin=2)


@pytest.mark.parametrize("head,k", [({"type": "subcenter_arcface", "k": K}, K), ({"type": "arcface"}, 1)])
def test_clean_partitions_the_set_by_the_angle_to_the_dominant_sub_center(noisy, tmp_path, head, k):
    data = noisy / "train"
    ckpt, _, truth = _checkpoint(tmp_path, data, head, k)
    threshold = float(np.median(truth[:, 2]))  # about half dropped
    out = tmp_path / "cleaned"
    result = _run("clean", "--checkpoint", str(ckpt), "--threshold", f"{threshold}", "--output", str(out))
    assert result.exit_code == 0, result.output
    kept, dropped = _table(out / "kept.tsv"), _table(out / "dropped.tsv")
    # a partition of the set's images: every key once, kept or dropped as its angle says
    assert sorted(kept[:, 1].tolist() + dropped[:, 0].tolist()) == truth[:, 0].tolist()
    by_key = {int(r[0]): r for r in truth}
    for key, label, angle in np.concatenate([kept[:, 1:], dropped]):
        assert label == by_key[int(key)][1]
        assert angle == pytest.approx(by_key[int(key)][2], abs=2e-3)
    assert (dropped[:, 2] > threshold).all() and (kept[:, 3] <= threshold).all() and len(dropped) and len(kept)
    # the kept set is a RecordIO data.root: same classes, the kept images byte for byte under their labels
    kept_set = create("datasets", "recordio", root=str(out / "kept"), train=False)
    assert len(kept_set) == len(kept) and kept_set.num_classes == IDS
    original, rewritten = _records(data), _records(out / "kept")
    for new_key, old_key, label, _ in kept:
        assert rewritten[int(new_key)] == original[int(old_key)] and original[int(old_key)][0] == label
    assert list(kept_set.labels) == sorted(kept[:, 2].astype(int).tolist())
    assert Image.open(out / "angles.png").size == (720, 420)
    assert f"{len(dropped)}" in result.output and "dropped" in result.output
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".cleaned")]  # the temporary folder is gone


def test_dominant_sub_center_is_the_one_most_images_are_nearest_to():
    labels = np.array([0, 0, 0, 1, 1, 1, 1])
    cos = np.array([[0.1, 0.9, 0.0], [0.2, 0.8, 0.1], [0.95, 0.0, 0.0],  # class 0: two nearest sub-center 1
                    [0.0, 0.0, 0.5], [0.6, 0.0, 0.0], [0.0, 0.7, 0.0], [0.0, 0.0, 0.1]])  # class 1: 2 for 2
    assert dominant_subcenters(labels, cos.argmax(1), 3, 3).tolist() == [1, 2, 0]  # ties: the lower; empty: 0
    angles = Angles(np.arange(7), labels, cos, 3)
    # the third image is nearest sub-center 0 but is measured against the dominant one (cos 0)
    assert angles.degrees[2] == pytest.approx(90.0) and angles.degrees[0] == pytest.approx(np.degrees(np.arccos(0.9)))
    assert angles.on_dominant().tolist() == [True, True, False, True, False, False, True]


# -- bad input: one message, exit 1, nothing written --------------------------------------------------
def test_bad_input_is_one_message_and_writes_nothing(noisy, tmp_path):
    data = noisy / "train"
    ckpt, config, _ = _checkpoint(tmp_path, data, {"type": "subcenter_arcface", "k": K}, K)
    out = tmp_path / "out"

    def refused(*args: str, says: list[str]) -> None:
        result = _run("clean", "--output", str(out), *args)
        assert result.exit_code == 1, result.output
        assert "Traceback" not in result.output and all(s in result.output for s in says), result.output
        assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]

    for bad in ("0", "180", "-5"):
        refused("--checkpoint", str(ckpt), "--threshold", bad, says=["--threshold", "(0, 180)"])
    bare = tmp_path / "backbone.pth"
    torch.save(torch.load(ckpt, weights_only=True)["backbone"], bare)
    cfg_file = tmp_path / "config.yaml"
    import yaml

    cfg_file.write_text(yaml.safe_dump(config))
    refused("--checkpoint", str(bare), "--config", str(cfg_file), says=[str(bare), "class centers"])
    folder_cfg = tmp_path / "folder.yaml"
    folder_cfg.write_text(yaml.safe_dump({**config, "data": {"type": "image-folder", "root": str(noisy / "train_images")}}))
    refused("--checkpoint", str(ckpt), "--config", str(folder_cfg), says=["data.type", "image-folder", "RecordIO"])
    arc_cfg = tmp_path / "arcface.yaml"
    arc_cfg.write_text(yaml.safe_dump({**config, "head": {"type": "arcface", "num_classes": IDS}}))
    refused("--checkpoint", str(ckpt), "--config", str(arc_cfg), says=[str(ckpt), f"({IDS * K}, {EMB})", "k?"])
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    result = _run("clean", "--checkpoint", str(ckpt), "--output", str(out))
    assert result.exit_code == 1 and "not empty" in result.output and "--force" in result.output
    assert (out / "mine.txt").read_text() == "keep me"

"""Gallery indexes for deployment: ``facecore index build``, ``facecore identify``, ``Predictor.identify``."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from helpers import TinyBackbonePlugin, TinyNet
from PIL import Image

import facecore
from facecore.cli import main
from facecore.core.checkpoint import save_checkpoint
from facecore.errors import DataError
from facecore.eval.fingerprint import model_fingerprint
from facecore.eval.gallery_index import GalleryIndex, load_index

BACKBONE = "tiny-index-net"
GALLERY = {"alice": 2, "bob": 3, "carol": 2}  # identity -> images
CALIBRATION = {"dave": 4, "erin": 4}  # identities outside the gallery, plus LOOSE loose images
LOOSE = 2


def face(path, rng):
    """A smooth random 112x112 PNG (PNG: decoding is exact, so embeddings can be recomputed here)."""
    small = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    Image.fromarray(small).resize((112, 112), Image.BILINEAR).save(path)
    return path


@pytest.fixture
def setup(register_plugin, tmp_path):
    """A gallery, a calibration folder, two checkpoints of the tiny network with different weights."""
    register_plugin(TinyBackbonePlugin(BACKBONE), name="tiny-index-plugin")
    rng = np.random.default_rng(0)
    for root, people in (("gallery", GALLERY), ("calibration", CALIBRATION)):
        for name, n in people.items():
            (tmp_path / root / name).mkdir(parents=True)
            for i in range(n):
                face(tmp_path / root / name / f"{i}.png", rng)
    for i in range(LOOSE):
        face(tmp_path / "calibration" / f"loose{i}.png", rng)
    config = {"device": "cpu", "model": {"backbone": BACKBONE, "embedding_size": 8},
              "head": {"type": "arcface", "num_classes": 10}, "data": {"root": str(tmp_path)}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    effective = facecore.load_config(str(tmp_path / "config.yaml"))
    for seed, name in ((0, "model.pth"), (1, "other.pth")):
        torch.manual_seed(seed)
        save_checkpoint({"config": effective, "backbone": TinyNet(8).eval().state_dict()}, tmp_path / name)
    return tmp_path


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def build(root, *extra, output="gallery.fcidx", checkpoint="model.pth"):
    return cli("index", "build", "--checkpoint", root / checkpoint, "--gallery", root / "gallery",
               "--output", root / output, *extra)


def unit(x):
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_build_pools_each_identity_and_calibrates_on_outsiders(setup):
    root = setup
    result = build(root, "--calibrate", root / "calibration")
    assert result.exit_code == 0, result.output
    assert "3 identities (7 images pooled)" in result.output and "1e-02 not measurable (needs 100)" in result.output
    # The file holds json and npy members only, each readable without pickle.
    with zipfile.ZipFile(root / "gallery.fcidx") as zf:
        assert sorted(zf.namelist()) == ["calibration.npy", "embeddings.npy", "header.json"]
        header = json.loads(zf.read("header.json"))
        for member in ("embeddings.npy", "calibration.npy"):
            with zf.open(member) as fh:
                np.lib.format.read_array(fh, allow_pickle=False)
    index = load_index(root / "gallery.fcidx")
    predictor = facecore.Predictor(checkpoint_path=str(root / "model.pth"))
    assert index.fingerprint == predictor.fingerprint == header["fingerprint"]
    assert index.names == sorted(GALLERY) and index.counts == [GALLERY[n] for n in sorted(GALLERY)]
    templates = np.stack([unit(predictor.embed([str(p) for p in sorted((root / "gallery" / n).iterdir())]).mean(0))
                          for n in sorted(GALLERY)])
    np.testing.assert_allclose(index.embeddings, templates, atol=1e-5)
    # Calibration: each outsider image's best score against the templates.
    outsiders = sorted((root / "calibration").glob("*.png")) + sorted((root / "calibration").glob("*/*.png"))
    best = (predictor.embed([str(p) for p in outsiders]).astype(np.float64) @ templates.T).max(1)
    n = sum(CALIBRATION.values()) + LOOSE  # 10 images: FPIR 0.1 lets 1 of them above the threshold
    np.testing.assert_allclose(index.calibration_scores, best, atol=1e-5)
    assert index.calibration["identities"] == len(CALIBRATION) + LOOSE
    thresholds = header["calibration"]["thresholds"]
    assert thresholds["1e-01"] == pytest.approx(np.sort(best)[::-1][int(0.1 * n)], abs=1e-5)
    assert thresholds["1e-02"] is None and thresholds["1e-04"] is None


def test_identify_ranks_and_decides_like_the_scores_say(setup):
    root = setup
    assert build(root, "--calibrate", root / "calibration").exit_code == 0
    index = load_index(root / "gallery.fcidx")
    predictor = facecore.Predictor(checkpoint_path=str(root / "model.pth"))
    threshold = index.threshold(0.1)[0]
    outsiders = sorted((root / "calibration").glob("**/*.png"))
    scores = (predictor.embed([str(p) for p in outsiders]) @ index.embeddings.T).max(1)
    lowest, highest = outsiders[int(np.argmin(scores))], outsiders[int(np.argmax(scores))]
    probe = root / "gallery" / "bob" / "1.png"
    images = [probe, lowest, highest]
    found = predictor.identify([str(p) for p in images], root / "gallery.fcidx", fpir=0.1, top_k=2)
    expected = predictor.embed([str(p) for p in images]) @ index.embeddings.T
    for r, row in zip(found, expected):
        order = np.argsort(-row)[:2]
        assert [m.name for m in r.matches] == [index.names[j] for j in order]
        np.testing.assert_allclose([m.score for m in r.matches], row[order], atol=1e-5)
        assert r.threshold == pytest.approx(threshold)
        if abs(row.max() - threshold) > 1e-5:  # (a score re-computed here may differ from the search's by 1e-7)
            assert r.known is bool(row.max() > threshold)
    assert found[1].known is False and found[1].identity is None  # an outsider below the threshold: unknown
    assert found[2].known is True  # the outsider with the highest score is the false alarm FPIR 0.1 allows
    # The command prints the same, and its JSON is Predictor.identify's.
    result = cli("identify", *images, "--index", root / "gallery.fcidx", "--checkpoint", root / "model.pth",
                 "--fpir", "0.1", "--top-k", "2", "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [r["known"] for r in rows] == [r.known for r in found]
    assert [[m["name"] for m in r["matches"]] for r in rows] == [[m.name for m in r.matches] for r in found]
    result = cli("identify", lowest, "--index", root / "gallery.fcidx", "--checkpoint", root / "model.pth",
                 "--fpir", "0.1")
    assert result.exit_code == 0 and f"{lowest}: unknown (best " in result.output


def test_uncalibrated_index_and_unmeasurable_fpir_are_said(setup):
    root = setup
    assert build(root).exit_code == 0
    probe = root / "gallery" / "carol" / "0.png"
    result = cli("identify", probe, "--index", root / "gallery.fcidx", "--checkpoint", root / "model.pth")
    assert result.exit_code == 0, result.output
    assert "not calibrated" in result.output and "not decided" in result.output and ": unknown" not in result.output
    assert build(root, "--calibrate", root / "calibration").exit_code == 0
    [r] = facecore.Predictor(checkpoint_path=str(root / "model.pth")).identify(str(probe), root / "gallery.fcidx")
    assert r.known is None and r.threshold is None and "not measurable with the 10 calibration images" in r.note


def test_per_image_rows_name_their_files(setup):
    root = setup
    result = build(root, "--per-image")
    assert result.exit_code == 0, result.output
    index = load_index(root / "gallery.fcidx")
    assert index.size == sum(GALLERY.values()) and index.names.count("bob") == 3 and "bob/2.png" in index.images
    [r] = facecore.Predictor(checkpoint_path=str(root / "model.pth")).identify(
        str(root / "gallery" / "bob" / "2.png"), index, top_k=3)
    assert (r.matches[0].name, r.matches[0].image) == ("bob", "bob/2.png")
    assert r.matches[0].score == pytest.approx(1.0, abs=1e-5)


def test_fingerprint_follows_weights_and_config_not_the_batch_counter():
    torch.manual_seed(0)
    net = TinyNet(8)
    config = {"model": {"backbone": "x", "embedding_size": 8, "pretrained": None}, "data": {"img_size": 112}}
    base = model_fingerprint(net, config)
    twin = TinyNet(8)
    twin.load_state_dict(net.state_dict())
    assert model_fingerprint(twin, {**config, "model": {**config["model"], "pretrained": "a.pth"}}) == base
    twin.body[1].num_batches_tracked += 5  # a counter eval never reads
    assert model_fingerprint(twin, config) == base
    with torch.no_grad():
        twin.body[5].bias[3] += 1e-6
    assert model_fingerprint(twin, config) != base
    assert model_fingerprint(net, {**config, "data": {"img_size": 96}}) != base


def expect_error(result, *names):
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and result.output.startswith("Error: ")
    for name in names:
        assert str(name) in result.output


def test_bad_inputs_name_the_file_and_write_nothing(setup):
    root = setup
    out = root / "gallery.fcidx"
    # An index built with another model is refused, before any probe is embedded.
    assert build(root, checkpoint="other.pth").exit_code == 0
    probe = root / "gallery" / "alice" / "0.png"
    expect_error(cli("identify", probe, "--index", out, "--checkpoint", root / "model.pth"), out, "another model")
    # A failed build leaves the old index as it was, and no temporary file.
    before = out.read_bytes()
    (root / "empty").mkdir()
    expect_error(cli("index", "build", "--checkpoint", root / "model.pth", "--gallery", root / "empty",
                     "--output", out), root / "empty")
    (root / "gallery" / "bob" / "notes.jpg").write_text("not an image")
    expect_error(build(root), root / "gallery" / "bob" / "notes.jpg")
    (root / "gallery" / "bob" / "notes.jpg").unlink()
    (root / "calibration" / "alice").mkdir()  # a gallery identity among the outsiders
    expect_error(build(root, "--calibrate", root / "calibration"), root / "calibration", "alice")
    assert out.read_bytes() == before and sorted(p.name for p in root.glob("*.fcidx*")) == ["gallery.fcidx"]
    assert not any(root.glob(".gallery.fcidx*"))
    # A truncated or damaged index, and a probe that is not an image.
    (root / "cut.fcidx").write_bytes(before[: len(before) // 2])
    expect_error(cli("identify", probe, "--index", root / "cut.fcidx", "--checkpoint", root / "model.pth"),
                 root / "cut.fcidx")
    flipped = bytearray(before)
    flipped[before.index(b"\x93NUMPY") + 200] ^= 0xFF  # a byte of the embeddings: the CRC-32 check fails
    (root / "flipped.fcidx").write_bytes(bytes(flipped))
    with pytest.raises(DataError, match="flipped.fcidx"):
        load_index(root / "flipped.fcidx")
    (root / "photo.jpg").write_text("hello")
    expect_error(cli("identify", root / "photo.jpg", "--index", out, "--checkpoint", root / "other.pth"),
                 root / "photo.jpg")


def test_faiss_search_finds_the_exact_top_match():
    pytest.importorskip("faiss")
    rng = np.random.default_rng(0)
    gallery = unit(rng.standard_normal((500, 16))).astype(np.float32)
    probes = unit(gallery[:50] + 0.3 * rng.standard_normal((50, 16)) / 4).astype(np.float32)
    index = GalleryIndex(embeddings=gallery, names=[f"id{i}" for i in range(500)], fingerprint="x", model={})
    exact_scores, exact_rows = index.search(probes, 3)
    scores, rows = index.search(probes, 3, method="faiss")
    assert scores.shape == rows.shape == (50, 3) and (rows[:, 0] == exact_rows[:, 0]).mean() >= 0.98
    same = rows[:, 0] == exact_rows[:, 0]
    np.testing.assert_allclose(scores[same, 0], exact_scores[same, 0], atol=1e-5)

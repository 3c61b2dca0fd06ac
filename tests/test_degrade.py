"""Degraded copies of the held-out faces (facecore demo-data --degraded): reproducible, lower quality, same pairs."""

from __future__ import annotations

import json

import numpy as np
from click.testing import CliRunner
from PIL import Image

from facecore.commands.demo_data import demo_data
from facecore.data.binfile import load_bin
from facecore.data.degrade import degrade
from facecore.data.synthetic import make_demo_data, render_sample

SMALL = dict(train_identities=4, images_per_identity=2, test_identities=5, test_images_per_identity=4, pairs=20)


def detail(image: Image.Image) -> float:
    """Mean absolute difference of horizontally adjacent grey pixels: fine detail."""
    x = np.asarray(image.convert("L"), dtype=np.float32)
    return float(np.abs(np.diff(x, axis=1)).mean())


def test_degradation_is_seeded_and_removes_detail():
    faces = [render_sample(0, i, 0)[0] for i in range(6)]
    out = [degrade(face, np.random.default_rng([0, i])) for i, face in enumerate(faces)]
    again = [degrade(face, np.random.default_rng([0, i])) for i, face in enumerate(faces)]
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(out, again))
    other = degrade(faces[0], np.random.default_rng([1, 0]))
    assert not np.array_equal(np.asarray(other), np.asarray(out[0]))
    assert all(o.size == f.size == (112, 112) and o.mode == "RGB" for o, f in zip(out, faces))
    assert np.mean([detail(o) for o in out]) < 0.6 * np.mean([detail(f) for f in faces])


def test_demo_data_degraded_writes_the_same_pairs_with_degraded_images(tmp_path):
    out = tmp_path / "demo"
    summary = make_demo_data(out, seed=0, progress=False, workers=1, degraded=True, **SMALL)
    clean, issame = load_bin(out / "test.bin")
    bad, bad_issame = load_bin(out / "test_degraded.bin")
    assert np.array_equal(issame, bad_issame) and len(bad) == len(clean) == 40
    assert all(a != b for a, b in zip(clean, bad))
    strip = lambda line: [p.split("/", 1)[-1] for p in line.split()]  # noqa: E731 - folder name differs
    pairs = (out / "test_pairs.txt").read_text().splitlines()
    degraded_pairs = (out / "test_degraded_pairs.txt").read_text().splitlines()
    assert [strip(a) for a in pairs] == [strip(b) for b in degraded_pairs]
    assert summary["test_degraded_bin"] == str(out / "test_degraded.bin")
    assert 0 <= summary["raw_pixel_accuracy_degraded"] <= 1
    assert json.loads((out / "manifest.json").read_text())["params"]["degraded"] is True
    assert make_demo_data(out, seed=0, progress=False, workers=1, degraded=True, **SMALL)["reused"]
    make_demo_data(out, seed=0, progress=False, workers=1, **SMALL)  # without: the degraded set goes
    assert not (out / "test_degraded.bin").exists() and (out / "test.bin").exists()


def test_cli_degraded_flag_reports_the_second_set(tmp_path):
    args = [str(tmp_path / "d"), "--train-identities", "3", "--images-per-identity", "2", "--test-identities", "4",
            "--test-images-per-identity", "3", "--pairs", "20", "--degraded"]
    result = CliRunner().invoke(demo_data, args)
    assert result.exit_code == 0, result.output
    assert "test_degraded.bin" in result.output and (tmp_path / "d" / "test_degraded.bin").is_file()

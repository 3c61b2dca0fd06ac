"""Synthetic quick-start data: determinism, layout, balanced disjoint pairs, and that identity
survives the nuisance while raw pixels do not reveal it."""

from __future__ import annotations

import json
import subprocess
import sys
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from facecore.data.binfile import load_bin
from facecore.commands.demo_data import demo_data
from facecore.errors import ConfigError, DataError
from facecore.data.synthetic import (
    encode_jpeg,
    generate_identity_folder,
    make_demo_data,
    raw_pixel_baseline,
    raw_pixel_scores,
    render_sample,
    verification_accuracy,
    write_pairs,
)

SMALL = dict(train_identities=5, images_per_identity=3, test_identities=6, test_images_per_identity=4, pairs=40)


def folder_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.jpg"))}


def test_same_seed_same_bytes_and_seeds_differ():
    a = encode_jpeg(render_sample(3, 5, 2)[0])
    assert a == encode_jpeg(render_sample(3, 5, 2)[0])
    assert a != encode_jpeg(render_sample(4, 5, 2)[0])  # another seed
    assert a != encode_jpeg(render_sample(3, 5, 3)[0])  # another image of the same identity
    assert a != encode_jpeg(render_sample(3, 5, 2, stream=1)[0])  # the held-out stream


def test_folder_is_deterministic_and_independent_of_workers(tmp_path):
    generate_identity_folder(tmp_path / "a", 8, 1, seed=1, workers=1, progress=False)
    generate_identity_folder(tmp_path / "b", 8, 1, seed=1, workers=2, progress=False)
    generate_identity_folder(tmp_path / "c", 8, 1, seed=2, workers=1, progress=False)
    a, b, c = (folder_bytes(tmp_path / x) for x in "abc")
    assert a == b
    assert a.keys() == c.keys() and all(a[k] != c[k] for k in a)


def test_folder_layout_and_image_format(tmp_path):
    count = generate_identity_folder(tmp_path, 3, 4, seed=0, first_identity=7, img_size=96, progress=False)
    assert count == 12
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00007", "00008", "00009"]
    for folder in tmp_path.iterdir():
        assert sorted(p.name for p in folder.iterdir()) == ["000.jpg", "001.jpg", "002.jpg", "003.jpg"]
    with Image.open(tmp_path / "00008" / "003.jpg") as im:
        assert (im.format, im.mode, im.size) == ("JPEG", "RGB", (96, 96))


def test_pairs_are_balanced_per_fold_and_point_at_real_images(tmp_path):
    generate_identity_folder(tmp_path / "imgs", 6, 4, seed=0, progress=False)  # 36 distinct same pairs
    n = write_pairs(tmp_path / "imgs", tmp_path / "pairs.txt", 60, seed=0)
    lines = (tmp_path / "pairs.txt").read_text().split("\n")[:-1]
    assert n == len(lines) == 60
    rows = [line.split() for line in lines]
    for fold in np.array_split(np.arange(60), 10):
        labels = [rows[i][2] for i in fold]
        assert labels.count("1") == labels.count("0")
    for a, b, same in rows:
        assert (tmp_path / a).is_file() and (tmp_path / b).is_file() and a != b
        assert (Path(a).parent == Path(b).parent) == (same == "1")
    same_pairs = [(a, b) for a, b, s in rows if s == "1"]
    assert len(set(same_pairs)) == len(same_pairs)  # no repeats while distinct pairs remain


def test_write_pairs_needs_two_identities(tmp_path):
    generate_identity_folder(tmp_path / "imgs", 1, 3, seed=0, progress=False)
    with pytest.raises(DataError, match="at least 2 identities"):
        write_pairs(tmp_path / "imgs", tmp_path / "pairs.txt", 20, seed=0)


def test_make_demo_data_writes_disjoint_packed_sets(tmp_path):
    out = tmp_path / "demo"
    summary = make_demo_data(out, seed=0, progress=False, workers=1, **SMALL)
    assert not summary["reused"]
    assert (out / "train" / "property").read_text().strip() == "5,112,112"
    assert (out / "train" / "train.rec").stat().st_size > 0 and (out / "train" / "train.idx").is_file()
    images, issame = load_bin(out / "test.bin")
    assert len(images) == 2 * len(issame) == 80 and issame.sum() == 20
    train_ids = {p.name for p in (out / "train_images").iterdir()}
    test_ids = {p.name for p in (out / "test_images").iterdir()}
    assert len(train_ids) == 5 and len(test_ids) == 6 and not train_ids & test_ids
    assert summary["train_images"] == 15 and summary["test_images"] == 24 and summary["pairs"] == 40
    assert 0.0 <= summary["raw_pixel_accuracy"] <= 1.0
    assert json.loads((out / "manifest.json").read_text())["params"]["seed"] == 0


def test_make_demo_data_reuses_matching_data_and_redoes_changed(tmp_path):
    out = tmp_path / "demo"
    make_demo_data(out, seed=0, progress=False, workers=1, **SMALL)
    stamp = (out / "test.bin").stat().st_mtime_ns
    again = make_demo_data(out, seed=0, progress=False, workers=1, **SMALL)
    assert again["reused"] and (out / "test.bin").stat().st_mtime_ns == stamp
    before = folder_bytes(out / "test_images")
    changed = make_demo_data(out, seed=1, progress=False, workers=1, **SMALL)
    assert not changed["reused"] and folder_bytes(out / "test_images") != before
    (out / "test.bin").unlink()  # incomplete data is regenerated even with the same settings
    assert not make_demo_data(out, seed=1, progress=False, workers=1, **SMALL)["reused"]


def test_make_demo_data_refuses_a_foreign_folder_unless_forced(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="notes.txt.*--force"):
        make_demo_data(tmp_path, progress=False, workers=1, **SMALL)
    make_demo_data(tmp_path, progress=False, workers=1, force=True, **SMALL)
    assert (tmp_path / "notes.txt").read_text() == "mine" and (tmp_path / "test.bin").is_file()


def test_make_demo_data_finishes_an_interrupted_run(tmp_path):
    make_demo_data(tmp_path, progress=False, workers=1, **SMALL)
    (tmp_path / "manifest.json").unlink()  # as if killed before the manifest was written
    (tmp_path / "test.bin").unlink()
    assert not make_demo_data(tmp_path, progress=False, workers=1, **SMALL)["reused"]
    assert (tmp_path / "test.bin").is_file()


def test_impossible_pair_count_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="pairs"):
        make_demo_data(tmp_path, **{**SMALL, "pairs": 1000})


def test_verification_accuracy_on_known_scores():
    rng = np.random.default_rng(0)
    same = np.tile([True, False], 200)
    assert verification_accuracy(np.where(same, 0.9, 0.1), same) == 1.0
    assert abs(verification_accuracy(rng.uniform(-1, 1, 400), same) - 0.5) < 0.1
    noisy = np.where(same, 0.3, -0.3) + rng.normal(0, 0.3, 400)  # about 84% separable
    assert 0.75 < verification_accuracy(noisy, same) < 0.92


def _aligned_face(image: Image.Image, matrix: np.ndarray, n: int = 32) -> np.ndarray:
    """The face region resampled in canonical (pose-free) coordinates, each channel standardized."""
    to_canonical = np.array([[1.5 / n, 0, -0.75], [0, 1.8 / n, -0.9], [0, 0, 1]])
    m = np.vstack([matrix, [0, 0, 1]]) @ to_canonical
    crop = np.asarray(image.transform((n, n), Image.AFFINE, tuple(m[:2].ravel()), Image.BILINEAR), np.float32)
    crop = (crop - crop.mean((0, 1))) / (crop.std((0, 1)) + 1e-3)
    return crop.ravel() / np.linalg.norm(crop)


def test_identity_survives_nuisance_but_raw_pixels_do_not_show_it(tmp_path):
    # Identity measure: undo each image's (known) pose and lighting level, compare the face regions.
    faces = {}
    for ident in range(12):
        for n in range(4):
            image, matrix = render_sample(0, ident, n, stream=1)
            faces[ident, n] = _aligned_face(Image.open(BytesIO(encode_jpeg(image))), matrix)
    same = [faces[i, a] @ faces[i, b] for i in range(12) for a in range(4) for b in range(a + 1, 4)]
    diff = [faces[i, a] @ faces[j, a] for i in range(12) for j in range(i + 1, 12) for a in range(4)]
    assert np.mean(same) - np.mean(diff) > 0.2

    generate_identity_folder(tmp_path / "imgs", 20, 5, seed=0, stream=1, progress=False)
    write_pairs(tmp_path / "imgs", tmp_path / "pairs.txt", 200, seed=0)
    assert raw_pixel_baseline(tmp_path / "pairs.txt") < 0.8
    scores, issame = raw_pixel_scores(tmp_path / "pairs.txt")
    assert abs(scores[issame].mean() - scores[~issame].mean()) < 0.5 * (np.mean(same) - np.mean(diff))


def test_cli_writes_data_and_reports_baseline(tmp_path):
    args = [str(tmp_path / "d"), "--train-identities", "4", "--images-per-identity", "2", "--test-identities", "5",
            "--pairs", "20", "--seed", "3"]
    result = CliRunner().invoke(demo_data, args)
    assert result.exit_code == 0, result.output
    assert "raw-pixel baseline" in result.output and (tmp_path / "d" / "test.bin").is_file()
    again = CliRunner().invoke(demo_data, args)
    assert again.exit_code == 0 and "nothing regenerated" in again.output


def test_cli_reports_bad_settings_without_traceback(tmp_path):
    result = CliRunner().invoke(demo_data, [str(tmp_path / "d"), "--test-identities", "2", "--pairs", "400"])
    assert result.exit_code == 2
    assert "pairs" in result.output and "Traceback" not in result.output


def test_cli_module_imports_no_numpy_or_torch():
    code = ("import sys, facecore.commands.demo_data; "
            "print(sorted(m for m in ('numpy', 'torch', 'PIL') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"

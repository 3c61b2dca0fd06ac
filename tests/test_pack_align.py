"""``facecore pack rec|bin --landmarks``: images aligned while packing, missing landmarks reported, bad files named."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image, ImageFilter

from facecore.cli import main
from facecore.data.binfile import load_bin
from facecore.data.images import decode_image
from facecore.data.landmarks import read_landmark_file
from facecore.data.packing import pack_bin, pack_rec
from facecore.data.recordio import RecordReader, unpack
from facecore.data.synthetic import render_sample
from facecore.data.synthetic_ijb import loose_crop
from facecore.errors import DataError


def fmt(points: np.ndarray) -> str:
    return " ".join(f"{v:.4f}" for v in np.asarray(points).ravel())


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray], Path]:
    """photos/<who>/<n>.png loose crops of known 112x112 faces, and their landmarks file (paths relative)."""
    root = tmp_path_factory.mktemp("align") / "photos"
    rng = np.random.default_rng(0)
    faces, lines = {}, []
    for who in ("ann", "bob"):
        for n in range(2):
            face = np.asarray(render_sample(1, len(faces), 0)[0].filter(ImageFilter.GaussianBlur(1.0)))
            crop, points, _ = loose_crop(face, rng)
            rel = f"{who}/{n}.png"
            (root / who).mkdir(parents=True, exist_ok=True)
            Image.fromarray(crop).save(root / rel)
            faces[rel] = face
            lines.append(f"{rel} {fmt(points)}")
    landmarks = root.parent / "landmarks.txt"
    landmarks.write_text("# path x1 y1 ... x5 y5\n" + "\n".join(lines) + "\n")
    return root, faces, landmarks


def close_to(data: bytes, face: np.ndarray) -> float:
    """Mean absolute difference on the interior (JPEG at quality 95 adds about a grey level)."""
    return float(np.abs(decode_image(data).astype(int) - face)[8:104, 8:104].mean())


def test_pack_rec_aligns_every_image(photos, tmp_path):
    root, faces, landmarks = photos
    stats = pack_rec(root, tmp_path / "rec", landmarks=landmarks, progress=False)
    assert stats == {"images": 4, "identities": 2, "resized": 0, "aligned": 4, "skipped": 0}
    reader = RecordReader(tmp_path / "rec" / "train.rec", tmp_path / "rec" / "train.idx")
    for key, rel in enumerate(sorted(faces), 1):
        header, data = unpack(reader.read(key))
        assert header.label == (0 if rel.startswith("ann") else 1)
        assert close_to(data, faces[rel]) < 3.0, rel
    assert not (tmp_path / "rec" / "missing_landmarks.txt").exists()


def test_missing_landmarks_stop_or_are_skipped_and_reported(photos, tmp_path):
    root, faces, landmarks = photos
    partial = tmp_path / "partial.txt"
    kept = [line for line in landmarks.read_text().splitlines() if not line.startswith("bob/")]
    partial.write_text("\n".join(kept) + "\n")
    with pytest.raises(DataError, match=r"2 of 4 images have no line in .*partial\.txt: bob/0\.png, bob/1\.png"):
        pack_rec(root, tmp_path / "rec", landmarks=partial, progress=False)
    assert not (tmp_path / "rec").exists()
    with pytest.warns(UserWarning, match=r"2 image\(s\) without landmarks were left out: bob/0\.png, bob/1\.png"):
        stats = pack_rec(root, tmp_path / "rec", landmarks=partial, missing_landmarks="skip", progress=False)
    assert stats["images"] == 2 and stats["identities"] == 1 and stats["skipped"] == 2  # bob had no image left
    report = (tmp_path / "rec" / "missing_landmarks.txt").read_text().splitlines()
    assert report[1:] == ["bob/0.png", "bob/1.png"]


def test_landmarks_for_images_that_do_not_exist(photos, tmp_path):
    root, _, landmarks = photos
    bad = tmp_path / "bad.txt"
    bad.write_text(landmarks.read_text() + "carl/9.png " + " ".join(["50"] * 10) + "\n")
    with pytest.raises(DataError, match=r"names 1 image\(s\) that do not exist under .*: carl/9\.png \(line 6\)"):
        pack_rec(root, tmp_path / "rec", landmarks=bad, progress=False)


@pytest.mark.parametrize("line, message", [
    ("ann/0.png 1 2 3", r"line 1: expected an image path then 10 numbers .* got 3 values"),
    ("ann/0.png 1 2 3 4 5 6 7 8 9 x", r"line 1: 'x' is not a number"),
    ("ann/0.png 1 2 3 4 5 6 7 8 9 inf", r"line 1: the landmarks of ann/0\.png contain NaN or infinite"),
])
def test_malformed_landmark_lines_name_the_line(tmp_path, line, message):
    path = tmp_path / "lm.txt"
    path.write_text(line + "\n")
    with pytest.raises(DataError, match=message):
        read_landmark_file(path)


def test_landmark_file_forms(tmp_path):
    path = tmp_path / "lm.txt"
    pts68 = np.arange(136, dtype=float)
    path.write_text("a.jpg " + " ".join(["1"] * 10) + "\n\nb.jpg " + " ".join(["2"] * 10) + " 0.9\n"
                    "c.jpg " + fmt(pts68) + "\n")
    marks = read_landmark_file(path)
    assert marks.names == ["a.jpg", "b.jpg", "c.jpg"] and marks.lines.tolist() == [1, 3, 4]
    assert np.isnan(marks.scores[0]) and marks.scores[1] == 0.9
    np.testing.assert_allclose(marks.points[2, 2], pts68.reshape(68, 2)[30])
    with pytest.raises(DataError, match="landmarks file not found"):
        read_landmark_file(tmp_path / "nope.txt")


def test_pack_bin_aligns_and_skips_pairs_without_landmarks(photos, tmp_path):
    root, faces, landmarks = photos
    pairs = root.parent / "pairs.txt"
    pairs.write_text("photos/ann/0.png photos/ann/1.png 1\nphotos/ann/0.png photos/bob/0.png 0\n")
    relative = root.parent / "lm_rel.txt"  # relative to the pairs file's folder, like the pairs
    relative.write_text("".join(f"photos/{line}\n" for line in landmarks.read_text().splitlines()[1:]))
    assert pack_bin(pairs, tmp_path / "a.bin", landmarks=relative, progress=False) == 2
    images, issame = load_bin(tmp_path / "a.bin")
    assert issame.tolist() == [True, False]
    assert close_to(images[1], faces["ann/1.png"]) < 3.0 and close_to(images[3], faces["bob/0.png"]) < 3.0
    without_bob = root.parent / "lm_nobob.txt"
    without_bob.write_text("".join(line + "\n" for line in relative.read_text().splitlines() if "bob" not in line))
    with pytest.raises(DataError, match=r"1 of 3 images of the pairs have no line .*photos/bob/0\.png"):
        pack_bin(pairs, tmp_path / "b.bin", landmarks=without_bob, progress=False)
    with pytest.warns(UserWarning, match=r"left out with their 1 pair\(s\)"):
        assert pack_bin(pairs, tmp_path / "b.bin", landmarks=without_bob, missing_landmarks="skip",
                        progress=False) == 1
    assert (tmp_path / "b.missing_landmarks.txt").read_text().splitlines()[1:] == ["photos/bob/0.png"]


def test_cli_pack_with_landmarks(photos, tmp_path):
    root, _, landmarks = photos
    runner = CliRunner()
    result = runner.invoke(main, ["pack", "rec", str(root), str(tmp_path / "rec"), "--landmarks", str(landmarks)])
    assert result.exit_code == 0, result.output
    assert "Packed 4 images of 2 identities" in result.output and "aligned with" in result.output
    partial = tmp_path / "partial.txt"
    partial.write_text(landmarks.read_text().splitlines()[1] + "\n")
    result = runner.invoke(main, ["pack", "rec", str(root), str(tmp_path / "r2"), "--landmarks", str(partial)])
    assert result.exit_code == 1 and "3 of 4 images have no line" in result.output
    assert "--missing-landmarks skip" in result.output and "Traceback" not in result.output
    result = runner.invoke(main, ["pack", "rec", str(root), str(tmp_path / "r2"), "--landmarks", str(partial),
                                  "--missing-landmarks", "skip"])
    assert result.exit_code == 0, result.output
    assert "Packed 1 images of 1 identities" in result.output and "3 image(s) without landmarks" in result.output
    result = runner.invoke(main, ["pack", "rec", str(root), str(tmp_path / "r3"), "--landmarks", str(tmp_path / "x")])
    assert result.exit_code == 1 and "landmarks file not found" in result.output and "Traceback" not in result.output

"""Packing: image folder -> RecordIO set, pairs list -> .bin, the ``facecore pack`` CLI, round trips."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from facecore.data.binfile import load_bin
from facecore.cli import main
from facecore.errors import DataError
from facecore.data.images import decode_image
from facecore.data.packing import pack_bin, pack_rec
from facecore.data.recordio import RecordReader, unpack
from facecore_plugins.recordio import RecordIODataset, read_property


def rgb_array(seed: int, size: int = 16) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.array(Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize((size, size)))


def save(path: Path, array: np.ndarray, fmt: str = "JPEG") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format=fmt)
    return path


@pytest.fixture
def tree(tmp_path) -> Path:
    root = tmp_path / "faces"
    save(root / "zed" / "1.jpg", rgb_array(1))
    save(root / "zed" / "2.jpg", rgb_array(2))
    save(root / "amy" / "1.png", rgb_array(3), "PNG")
    save(root / "amy" / "2.jpg", rgb_array(4, size=24))  # another size: resized
    save(root / "amy" / "3.jpg", rgb_array(5))
    return root


def test_pack_rec_round_trip(tree, tmp_path):
    out = tmp_path / "rec"
    with pytest.warns(UserWarning, match="1 of 5 images were not 16x16 and were resized"):
        stats = pack_rec(tree, out, img_size=16, progress=False)
    assert stats == {"images": 5, "identities": 2, "resized": 1, "aligned": 0, "skipped": 0}
    assert sorted(p.name for p in out.iterdir()) == ["property", "train.idx", "train.rec"]
    assert read_property(out / "property") == (2, 16, 16)

    reader = RecordReader(out / "train.rec", out / "train.idx")
    header, rest = unpack(reader.read(0))
    assert header.label.tolist() == [6, 8] and len(rest) == 0
    sources = {  # key: (source, what the packer does with it)
        1: ("amy/1.png", "re-encode"), 2: ("amy/2.jpg", "resize"), 3: ("amy/3.jpg", "keep"),
        4: ("zed/1.jpg", "keep"), 5: ("zed/2.jpg", "keep"),
    }
    for key, (name, action) in sources.items():
        src = tree / name
        header, data = unpack(reader.read(key))
        assert header.flag == 0 and header.label == (0 if name.startswith("amy") else 1)
        assert bytes(data[:3]) == b"\xff\xd8\xff"
        if action == "keep":
            assert bytes(data) == src.read_bytes()
            assert np.array_equal(decode_image(data), decode_image(src.read_bytes()))
        elif action == "re-encode":
            assert np.abs(decode_image(data).astype(int) - rgb_array(3)).mean() < 8
        else:
            assert decode_image(data).shape == (16, 16, 3)
    assert [unpack(reader.read(k))[0].label.tolist() for k in (6, 7)] == [[1, 4], [4, 6]]

    ds = RecordIODataset(str(out), img_size=16)
    assert ds.layout == "insightface" and ds.num_classes == 2 and len(ds) == 5
    assert [ds[i][1] for i in range(5)] == [0, 0, 0, 1, 1] == ds.labels.tolist()


def test_pack_rec_refuses_resize_and_leaves_nothing(tree, tmp_path):
    out = tmp_path / "rec"
    with pytest.raises(DataError, match=r"2\.jpg is 24x24, not 16x16"):
        pack_rec(tree, out, img_size=16, resize=False, progress=False)
    assert list(out.iterdir()) == []  # no half-written set, no temporary folder


def test_pack_rec_bad_image_leaves_nothing(tree, tmp_path):
    (tree / "zed" / "3.jpg").write_bytes(b"\xff\xd8\xff broken")
    out = tmp_path / "rec"
    with pytest.raises(DataError, match=r"zed/3\.jpg: cannot decode"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pack_rec(tree, out, img_size=16, progress=False)
    assert list(out.iterdir()) == []


def test_pack_rec_overwrite_needs_force(tree, tmp_path):
    out = tmp_path / "rec"
    out.mkdir()
    (out / "train.rec").write_bytes(b"old")
    with pytest.raises(DataError, match="already exist.*--force"):
        pack_rec(tree, out, img_size=16, progress=False)
    assert (out / "train.rec").read_bytes() == b"old"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pack_rec(tree, out, img_size=16, progress=False, force=True)
    assert RecordIODataset(str(out), img_size=16).num_classes == 2


def write_pairs_file(tmp_path: Path, tree: Path) -> Path:
    pairs = tmp_path / "lists" / "pairs.txt"
    pairs.parent.mkdir()
    pairs.write_text(
        "# a comment\n"
        "\n"
        f"../faces/amy/1.png ../faces/amy/3.jpg 1\n"
        f"{tree / 'zed' / '1.jpg'}\t../faces/amy/3.jpg 0\n"
    )
    return pairs


def test_pack_bin_round_trip(tree, tmp_path):
    pairs = write_pairs_file(tmp_path, tree)
    out = tmp_path / "sets" / "mine.bin"
    assert pack_bin(pairs, out, img_size=16, progress=False) == 2
    assert out.read_bytes()[:2] == b"\x80\x04"  # pickle protocol 4
    images, issame = load_bin(out)
    assert issame.tolist() == [True, False] and len(images) == 4
    assert images[1] == images[3] == (tree / "amy" / "3.jpg").read_bytes()
    assert images[2] == (tree / "zed" / "1.jpg").read_bytes()
    assert images[0][:3] == b"\xff\xd8\xff"  # the PNG, re-encoded


@pytest.mark.parametrize("line", ["a.jpg b.jpg", "a.jpg b.jpg 2", "a.jpg b.jpg 1 extra"])
def test_pack_bin_malformed_line(tmp_path, line):
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("# header\n" + line + "\n")
    with pytest.raises(DataError, match=r"pairs\.txt line 2: expected 'path_a path_b 0\|1'"):
        pack_bin(pairs, tmp_path / "x.bin", progress=False)
    assert not (tmp_path / "x.bin").exists()


def test_pack_bin_missing_image_names_the_line(tmp_path):
    pairs = tmp_path / "pairs.txt"
    save(tmp_path / "a.jpg", rgb_array(1))
    pairs.write_text("a.jpg a.jpg 1\na.jpg nope.jpg 0\n")
    with pytest.raises(DataError, match=r"line 2: image .*nope\.jpg cannot be read"):
        pack_bin(pairs, tmp_path / "x.bin", img_size=16, progress=False)


def test_cli_pack_rec_and_bin(tree, tmp_path):
    runner = CliRunner()
    out = tmp_path / "rec"
    result = runner.invoke(main, ["pack", "rec", str(tree), str(out), "--img-size", "16", "--quality", "90"])
    assert result.exit_code == 0, result.output
    assert "Packed 5 images of 2 identities" in result.output and "were resized" in result.output
    again = runner.invoke(main, ["pack", "rec", str(tree), str(out), "--img-size", "16"])
    assert again.exit_code == 1 and "Error:" in again.output and "--force" in again.output
    assert "Traceback" not in again.output
    strict = runner.invoke(main, ["pack", "rec", str(tree), str(tmp_path / "r2"), "--img-size", "16", "--no-resize"])
    assert strict.exit_code == 1 and "24x24, not 16x16" in strict.output

    pairs = write_pairs_file(tmp_path, tree)
    result = runner.invoke(main, ["pack", "bin", str(pairs), str(tmp_path / "p.bin"), "--img-size", "16"])
    assert result.exit_code == 0, result.output
    assert "Packed 2 pairs" in result.output
    forced = runner.invoke(main, ["pack", "bin", str(pairs), str(tmp_path / "p.bin"), "--img-size", "16", "--force"])
    assert forced.exit_code == 0
    refused = runner.invoke(main, ["pack", "bin", str(pairs), str(tmp_path / "p.bin"), "--img-size", "16"])
    assert refused.exit_code == 1 and "--force" in refused.output


def test_pack_module_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, facecore.commands.pack; print('torch' in sys.modules, 'numpy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]

"""facecore augment-preview: a PNG grid of the first training images before and after data.augment."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from helpers import make_tiny_data
from PIL import Image

from facecore import cli
from facecore.train.augment_preview import BACKGROUND, GAP


@pytest.fixture(scope="module")
def config_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("preview")
    data = make_tiny_data(root, identities=3, per_identity=4, pairs=20)
    path = root / "c.yaml"
    path.write_text(yaml.safe_dump({
        "seed": 1, "device": "cpu",
        "model": {"backbone": "fastcontextface"},
        "data": {"root": str(data), "batch_size": 4, "num_workers": 0,
                 "augment": [{"name": "low_resolution", "p": 1.0, "scale": [0.2, 0.3]}, "flip"]},
    }))
    return path


def rows(png: Path, tile: int = 112) -> list[np.ndarray]:
    """The grid's rows of tiles, top to bottom (gaps cut away)."""
    x = np.asarray(Image.open(png).convert("RGB"))
    count = (x.shape[0] - GAP) // (tile + GAP)
    return [x[GAP + r * (tile + GAP): GAP + r * (tile + GAP) + tile] for r in range(count)]


def test_preview_writes_before_and_after_rows(config_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "sub" / "grid.png"
    result = CliRunner().invoke(cli.main, ["augment-preview", "--config", str(config_file), "--output", str(out),
                                           "--batch", "10"])
    assert result.exit_code == 0, result.output
    assert "low_resolution (p 1)" in result.output and "flip (p 0.5)" in result.output
    image = Image.open(out)
    assert image.format == "PNG" and image.size == (8 * (112 + GAP) + GAP, 4 * (112 + GAP) + GAP)  # 10 images: 2 x 2 rows
    before, after, before2, after2 = rows(out)
    assert np.abs(before.astype(int) - after.astype(int)).mean() > 2  # every image went through low_resolution
    assert np.abs(before2[:, :2 * 116].astype(int) - after2[:, :2 * 116].astype(int)).mean() > 2
    assert (before2[:, 2 * (112 + GAP) + GAP:] == BACKGROUND).all()  # only 2 images in the second group
    assert not np.array_equal(before, before2)


def test_without_augmentations_after_equals_before(config_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "grid.png"
    result = CliRunner().invoke(cli.main, ["augment-preview", "--config", str(config_file), "--output", str(out),
                                           "--batch", "3", "--set", "data.augment=[]"])
    assert result.exit_code == 0, result.output
    assert Image.open(out).size == (3 * (112 + GAP) + GAP, 2 * (112 + GAP) + GAP)
    before, after = rows(out)
    assert np.array_equal(before, after) and before.any()


def test_bad_augmentation_config_is_one_message(config_file: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(cli.main, ["augment-preview", "--config", str(config_file), "--output",
                                           str(tmp_path / "g.png"), "--set", "data.augment=[{name: blurr}]"])
    assert result.exit_code == 2 and "data.augment[0]: unknown augmentation 'blurr'" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "g.png").exists()

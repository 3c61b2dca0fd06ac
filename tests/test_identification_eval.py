"""1:N in ``facecore eval``: IJB-C 1:N from the synthetic release, folder galleries (identity folders, TinyFace's
flat names, distractors), the files written, and bad input named with exit 1 and nothing written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from PIL import Image

import facecore
from facecore.cli import main
from facecore.core.checkpoint import save_checkpoint
from facecore.data.synthetic_ijb import make_ijb_data
from facecore.errors import DataError
from facecore.eval.gallery import name_identity, read_identity_folder
from facecore.eval.ijb_1n import read_template_subjects
from tests.helpers import TinyBackbonePlugin, TinyNet

BACKBONE = "tiny-1n-net"


@pytest.fixture(scope="module")
def ijb_root(tmp_path_factory) -> Path:
    """A synthetic IJB-C of 6 identities x 3 templates: galleries G1, G2 of 3 templates each, 12 probes."""
    root = tmp_path_factory.mktemp("ijb1n")
    summary = make_ijb_data(root, identities=6, templates_per_identity=3, seed=0, progress=False)
    assert summary["gallery_templates"] == 6 and summary["probe_templates"] == 12
    return root


@pytest.fixture
def run_dir(register_plugin, tmp_path) -> Path:
    register_plugin(TinyBackbonePlugin(BACKBONE), name="tiny-1n-plugin")
    config = {"device": "cpu", "model": {"backbone": BACKBONE, "embedding_size": 8},
              "head": {"type": "arcface", "num_classes": 10}, "data": {"root": str(tmp_path), "num_workers": 0},
              "logging": {"log_dir": str(tmp_path / "logs"), "tensorboard": False}, "eval": {"test_batch_size": 32}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    torch.manual_seed(0)
    save_checkpoint({"config": facecore.load_config(str(tmp_path / "config.yaml")),
                     "backbone": TinyNet(8).state_dict(), "step": 3}, tmp_path / "best.pth")
    return tmp_path


def invoke(run_dir: Path, *args: str):
    return CliRunner().invoke(main, ["eval", "--checkpoint", str(run_dir / "best.pth"), *args])


def nothing_written(run_dir: Path, *folders: Path) -> bool:
    logs = run_dir / "logs"
    return not (logs.exists() and any(logs.iterdir())) and not any(f.exists() for f in folders)


# ----------------------------------------------------------------------------- IJB-C 1:N
def test_ijb_1n_end_to_end_from_saved_features(run_dir, ijb_root):
    feats = run_dir / "features"
    result = invoke(run_dir, "--ijb", str(ijb_root), "--ijb-protocol", "both", "--save-features", str(feats), "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert list(report["results"]) == ["IJBC", "IJBC-1N"]
    block = report["identification"]["IJBC-1N"]
    assert block["galleries"] == {"G1": 3, "G2": 3} and block["probes"] == 12
    # G1 holds the even identities' first templates: their 6 other templates are its mated probes
    assert [(block["open_set"][g]["mated"], block["open_set"][g]["nonmated"]) for g in ("G1", "G2")] == [(6, 6), (6, 6)]
    assert block["open_set"]["G1"]["tpir"] == [None] * 4 and block["open_set"]["G1"]["smallest_measurable_fpir"] == 1 / 6
    numbers = report["results"]["IJBC-1N"]
    assert numbers["G1/tpir@fpir=1e-01"] is None  # strict JSON: not measurable is null

    a = {p.name[len("ijbc-1n_"):-4]: np.load(p) for p in feats.glob("ijbc-1n_*.npy")}
    pooled = {t: f for t, f in zip(np.load(feats / "ijbc_template_ids.npy"), np.load(feats / "ijbc_template_features.npy"))}
    for g in ("g1", "g2"):  # templates pooled as for 1:1, and the score matrix is their cosine
        np.testing.assert_array_equal(a[f"{g}_template_features"], np.stack([pooled[t] for t in a[f"{g}_template_ids"]]))
        np.testing.assert_allclose(a[f"{g}_scores"], a["probe_template_features"] @ a[f"{g}_template_features"].T,
                                   atol=1e-6)
    # the reported numbers follow from the saved score matrices
    for g, name in (("g1", "G1"), ("g2", "G2")):
        scores, ids, probe_ids = a[f"{g}_scores"], a[f"{g}_subject_ids"], a["probe_subject_ids"]
        mated = np.isin(probe_ids, ids)
        rank1 = ids[scores.argmax(axis=1)] == probe_ids
        assert numbers[f"{name}/rank-1"] == pytest.approx(rank1[mated].mean())
        np.testing.assert_array_equal(a[f"{g}_top_indices"][:, 0], scores.argmax(axis=1))
    merged_ids = np.r_[a["g1_subject_ids"], a["g2_subject_ids"]]
    merged = np.c_[a["g1_scores"], a["g2_scores"]]
    assert numbers["closed/rank-1"] == pytest.approx((merged_ids[merged.argmax(axis=1)] == a["probe_subject_ids"]).mean())
    assert numbers["mean/rank-1"] == pytest.approx((numbers["G1/rank-1"] + numbers["G2/rank-1"]) / 2)

    logs = run_dir / "logs"
    text = (logs / f"test_result_{BACKBONE}_{report['timestamp']}.txt").read_text()
    assert "IJBC 1:N open set" in text and "closed set as in older published tables" in text and "n/m" in text
    plots = report["identification_plots"]["IJBC-1N"]
    assert [Path(p).name.split("_")[0] for p in plots] == ["cmc", "tpir"]
    for p in plots:
        with Image.open(p) as png:
            assert png.format == "PNG" and png.size == (640, 480)


def test_protocol_from_the_config_and_1n_without_the_pair_file(run_dir, ijb_root, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(ijb_root, folder)
    (folder / "IJBC" / "meta" / "ijbc_template_pair_label.txt").unlink()  # 1:N does not need the 1:1 pairs
    result = invoke(run_dir, "--ijb", str(folder), "--set", "eval.ijb.protocol=1:N", "--json")
    assert result.exit_code == 0, result.output
    assert list(json.loads(result.stdout)["results"]) == ["IJBC-1N"]
    only_11 = invoke(run_dir, "--ijb", str(ijb_root), "--ijb-protocol", "1:1", "--json")
    assert list(json.loads(only_11.stdout)["results"]) == ["IJBC"]


def test_reading_the_1n_meta_files(tmp_path):
    path = tmp_path / "g.csv"
    path.write_text("TEMPLATE_ID,SUBJECT_ID,FILENAME\n7,2,a.jpg\n3,1,b.jpg\n7,2,c.jpg\n")  # a row per image
    assert read_template_subjects(path).tolist() == [[3, 1], [7, 2]]
    path.write_text("TEMPLATE_ID,SUBJECT_ID\n7,2\n7,3\n")
    with pytest.raises(DataError, match=r"g\.csv: template 7 belongs to subject 2 on line 2 but to subject 3 on line 3"):
        read_template_subjects(path)
    path.write_text("TEMPLATE_ID,SUBJECT_ID\n")
    with pytest.raises(DataError, match="lists no templates"):
        read_template_subjects(path)


@pytest.mark.parametrize("edit, message", [
    (lambda m: (m / "ijbc_1N_gallery_G2.csv").write_text("TEMPLATE_ID,SUBJECT_ID\n12,3\nx,4\n"),
     r"ijbc_1N_gallery_G2\.csv line 3: expected 'TEMPLATE_ID,SUBJECT_ID,\.\.\.'"),
    (lambda m: (m / "ijbc_1N_probe_mixed.csv").unlink(), r"lacks ijbc_1N_probe_mixed\.csv: the 1:N protocol of IJBC"),
    (lambda m: (m / "ijbc_1N_probe_mixed.csv").write_text(
        (m / "ijbc_1N_probe_mixed.csv").read_text() + "99999,1,x.jpg\n"),
     r"ijbc_1N_probe_mixed\.csv names 1 template\(s\) that have no images in .*ijbc_face_tid_mid\.txt: 99999"),
], ids=["corrupt-line", "missing-file", "probe-not-in-the-1:1-meta"])
def test_bad_1n_files_are_named_and_nothing_is_written(run_dir, ijb_root, tmp_path, edit, message):
    folder = tmp_path / "copy"
    shutil.copytree(ijb_root, folder)
    edit(folder / "IJBC" / "meta")
    feats = tmp_path / "features"
    result = invoke(run_dir, "--ijb", str(folder), "--ijb-protocol", "1:N", "--save-features", str(feats))
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1
    assert result.output.startswith("Error: ") and __import__("re").search(message, result.output), result.output
    assert nothing_written(run_dir, feats)


def test_auto_with_some_1n_files_names_the_missing_ones(run_dir, ijb_root, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(ijb_root, folder)
    (folder / "IJBC" / "meta" / "ijbc_1N_gallery_G1.csv").unlink()
    result = invoke(run_dir, "--ijb", str(folder))
    assert result.exit_code == 1 and "lacks ijbc_1N_gallery_G1.csv" in result.output and "--ijb-protocol 1:1" in result.output
    assert nothing_written(run_dir)


# ----------------------------------------------------------------------------- folder galleries
def write_images(folder: Path, names: list[str], seed: int, size: int = 112) -> None:
    rng = np.random.default_rng(seed)
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / name)


@pytest.fixture
def folders(tmp_path) -> dict[str, Path]:
    """Gallery: identity folders a, b, c (2 images each). Probes: flat TinyFace names (a, b mated; z not),
    smaller than 112 (resized). Distractors: nested."""
    write_images(tmp_path / "gallery", [f"{p}/{i}.png" for p in "abc" for i in range(2)], 1)
    write_images(tmp_path / "probe", ["a_1.png", "a_2.png", "b_1.png", "z_1.png"], 2, size=24)
    write_images(tmp_path / "distractors", ["x/1.png", "x/y/2.png", "3.png"], 3)
    return {k: tmp_path / k for k in ("gallery", "probe", "distractors")}


def test_folder_gallery_pooled_and_per_image(run_dir, folders):
    args = ["--gallery", str(folders["gallery"]), "--probe", str(folders["probe"]), "--distractors",
            str(folders["distractors"]), "--json"]
    pooled = invoke(run_dir, *args, "--save-features", str(run_dir / "feats"))
    assert pooled.exit_code == 0, pooled.output
    block = json.loads(pooled.stdout)["identification"]["gallery"]
    # 3 identity templates + 3 distractors; probes pooled: a, b mated, z non-mated
    assert block["galleries"] == {"gallery": 6} and block["probes"] == 3
    assert (block["open_set"]["gallery"]["mated"], block["open_set"]["gallery"]["nonmated"]) == (2, 1)
    assert block["closed_set"]["probes"] == 2 and block["closed_set"]["left_out"] == 1
    saved = np.load(run_dir / "feats" / "gallery_gallery_scores.npy")
    assert saved.shape == (3, 6)
    names = np.load(run_dir / "feats" / "gallery_identity_names.npy").tolist()
    assert names == ["a", "b", "c", "z"]
    assert np.load(run_dir / "feats" / "gallery_gallery_identity_ids.npy").tolist() == [0, 1, 2, -1, -1, -1]
    per_image = invoke(run_dir, *args, "--per-image")
    block = json.loads(per_image.stdout)["identification"]["gallery"]
    assert block["galleries"] == {"gallery": 9} and block["probes"] == 4
    assert (block["open_set"]["gallery"]["mated"], block["open_set"]["gallery"]["nonmated"]) == (3, 1)


def test_tinyface_names_and_layout_rules(tmp_path):
    assert [name_identity(n) for n in ("12_3.jpg", "12_3_x.png", "solo.jpg")] == ["12", "12", "solo"]
    write_images(tmp_path / "mixed", ["a/1.png", "b_1.png"], 0, size=8)
    with pytest.raises(DataError, match="holds both sub-folders"):
        read_identity_folder(tmp_path / "mixed", "gallery")


@pytest.mark.parametrize("which", ["gallery", "probe", "distractors"])
def test_an_empty_folder_is_named_and_nothing_is_written(run_dir, folders, which):
    shutil.rmtree(folders[which])
    folders[which].mkdir()
    feats = run_dir / "feats"
    result = invoke(run_dir, "--gallery", str(folders["gallery"]), "--probe", str(folders["probe"]),
                    "--distractors", str(folders["distractors"]), "--save-features", str(feats))
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert f"{which} folder {folders[which]}" in result.output and "no" in result.output
    assert nothing_written(run_dir, feats)


def test_gallery_needs_probe(run_dir, folders):
    result = invoke(run_dir, "--gallery", str(folders["gallery"]))
    assert result.exit_code == 2 and "--gallery and --probe go together" in result.output

"""IJB-B/C template verification: the ``ijb`` plugin, the vectorized protocol against a plain reference,
``facecore eval --ijb`` end to end, ``demo-data --ijb``, and bad input named without tracebacks."""

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
from sklearn.metrics import roc_curve

import facecore
from facecore.cli import main
from facecore.core.checkpoint import save_checkpoint
from facecore.data.synthetic_ijb import make_ijb_data
from facecore.errors import DataError, PluginError
from facecore.eval import ijb
from facecore.eval.evaluation import RocCurve, roc_from_scores
from tests.helpers import TinyBackbonePlugin, TinyNet

BACKBONE = "tiny-ijb-net"


@pytest.fixture(scope="module")
def ijb_root(tmp_path_factory) -> Path:
    """A synthetic IJB-C of 6 identities x 3 templates (18 templates, 153 pairs)."""
    root = tmp_path_factory.mktemp("ijb")
    summary = make_ijb_data(root, identities=6, templates_per_identity=3, seed=0, progress=False)
    assert summary["templates"] == 18 and summary["pairs"] == 153 and summary["genuine"] == 18
    return root


def copy_set(ijb_root: Path, tmp_path: Path) -> Path:
    shutil.copytree(ijb_root, tmp_path / "copy")
    return tmp_path / "copy"


# ----------------------------------------------------------------------------- a plain reference
def reference_protocol(features, templates, medias, scores, pairs, *, norm_score=True, detector_score=True):
    """Template features and pair scores written out with loops, in float64."""
    x = np.asarray(features, dtype=np.float64).copy()
    if not norm_score:
        x /= np.linalg.norm(x, axis=1, keepdims=True)
    if detector_score:
        x *= np.asarray(scores)[:, None]
    pooled = {}
    for t in np.unique(templates):
        mine = templates == t
        total = np.zeros(x.shape[1])
        for m in np.unique(medias[mine]):
            total += x[mine & (medias == m)].mean(axis=0)
        pooled[t] = total / np.linalg.norm(total)
    return pooled, np.array([pooled[a] @ pooled[b] for a, b in pairs])


def reference_tar(sims, labels, targets=ijb.FAR_TARGETS):
    """TAR read the way InsightFace's IJB script does (scikit-learn's ROC, flipped, nearest FPR), and FPR <= target."""
    fpr, tpr, _ = roc_curve(labels, sims)
    fpr, tpr = np.flipud(fpr), np.flipud(tpr)
    nearest = [float(tpr[min(zip(np.abs(fpr - t), range(len(fpr))))[1]]) for t in targets]
    full_fpr, full_tpr, _ = roc_curve(labels, sims, drop_intermediate=False)
    strict = [float(full_tpr[full_fpr <= t].max()) for t in targets]
    return nearest, strict


def random_protocol(seed: int = 0, images: int = 1500, people: int = 60, per_person: int = 5):
    """Random features with identity structure, templates of 1-3 medias, every template pair."""
    rng = np.random.default_rng(seed)
    n_templates = people * per_person
    person_of = np.arange(n_templates) // per_person  # template index -> person
    template_of = np.sort(np.r_[np.arange(n_templates), rng.integers(0, n_templates, images - n_templates)])
    centres = rng.standard_normal((people, 32))
    features = (centres[person_of[template_of]] + 1.2 * rng.standard_normal((images, 32))).astype(np.float32)
    features *= rng.uniform(0.5, 2.0, (images, 1)).astype(np.float32)  # norms that norm_score keeps
    ids = 7 + 5 * np.arange(n_templates)
    medias = 1000 + template_of * 4 + rng.integers(0, 3, images)
    a, b = np.triu_indices(n_templates, 1)
    pairs = np.stack([ids[a], ids[b]], 1)
    labels = person_of[a] == person_of[b]
    return features, ids[template_of], medias, rng.uniform(0.3, 1.0, images), pairs, labels


# ----------------------------------------------------------------------------- protocol
@pytest.mark.parametrize("norm_score, detector_score", [(True, True), (False, True), (True, False), (False, False)])
def test_fast_protocol_equals_the_reference(norm_score, detector_score):
    features, templates, medias, scores, pairs, labels = random_protocol()
    data = ijb.TemplateSet("IJBC", templates, medias, scores, pairs, labels)
    result = ijb.evaluate_templates(features.copy(), data, norm_score=norm_score, detector_score=detector_score)
    pooled, sims = reference_protocol(features, templates, medias, scores, pairs, norm_score=norm_score,
                                      detector_score=detector_score)
    np.testing.assert_array_equal(result.template_ids, sorted(pooled))
    np.testing.assert_allclose(result.template_features, np.stack([pooled[t] for t in result.template_ids]),
                               atol=2e-6)
    np.testing.assert_allclose(result.scores, sims, atol=2e-6)
    # float32 scores may swap pairs that float64 tells apart by 1e-7, so each reading is compared on the same scores
    assert (result.tar, result.tar_strict) == reference_tar(result.scores, labels)
    genuine = int(labels.sum())
    read = ijb.tar_at_far(roc_from_scores(sims, labels), ijb.FAR_TARGETS, negatives=labels.size - genuine,
                          positives=genuine)
    assert (read["tar"], read["tar_strict"]) == reference_tar(sims, labels)
    assert result.pairs == 44850 and result.genuine == 600 and result.templates == 300
    assert 0.0 < result.tar[3] < result.tar[5] < 1.0  # a real curve, not a degenerate one
    if norm_score and detector_score:  # here the two readings differ, so the comparison tells conventions apart
        assert result.tar != result.tar_strict
    keys = result.results()
    assert keys["tar@far=1e-03"] == result.tar[3] and keys["tar@far<=1e-03"] == result.tar_strict[3]


@pytest.mark.parametrize("ratio", [ijb.GEMM_RATIO, 0])
def test_pair_scores_by_blocks_and_by_gathers(monkeypatch, ratio):
    monkeypatch.setattr(ijb, "GEMM_RATIO", ratio)  # 0: every block is gathered
    monkeypatch.setattr(ijb, "BLOCK_BYTES", 4 * 200 * 37)  # 37 rows per block: many blocks
    monkeypatch.setattr(ijb, "GATHER_CHUNK", 100)
    rng = np.random.default_rng(1)
    feats = rng.standard_normal((200, 24)).astype(np.float32)
    first, second = rng.integers(0, 200, 5000), rng.integers(0, 200, 5000)
    expected = np.einsum("ij,ij->i", feats[first].astype(np.float64), feats[second])
    np.testing.assert_allclose(ijb.pair_scores(feats, first, second), expected, atol=1e-5)


@pytest.mark.parametrize("span", [ijb.LOOKUP_SPAN, 0])  # 0: binary search instead of a lookup table
def test_template_rows_and_unknown_templates(monkeypatch, span):
    monkeypatch.setattr(ijb, "LOOKUP_SPAN", span)
    ids = np.array([-4, 1, 3, 7])
    rows = ijb.template_rows(ids, np.array([[1, 7], [-4, 3], [7, 7]]))
    assert rows.tolist() == [[1, 3], [0, 2], [3, 3]] and rows.dtype == np.int32
    with pytest.raises(DataError, match=r"2 template\(s\) of the pairs have no images: 5, 9"):
        ijb.template_rows(ids, np.array([[1, 5], [9, 3], [1, 3]]))


def _argsort_roc(scores, labels):
    """The textbook ROC: one argsort, cumulative counts at the last index of each run of equal scores."""
    order = np.argsort(-scores.astype(np.float64), kind="stable")
    s, y = scores[order], labels[order]
    last = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]
    tps = np.cumsum(y)[last]
    fps = last + 1 - tps
    return np.r_[0.0, fps / (~labels).sum()], np.r_[0.0, tps / labels.sum()], np.r_[np.inf, s[last]]


def test_the_two_sort_roc_equals_the_argsort_roc():
    rng = np.random.default_rng(2)
    for dtype in (np.float32, np.float64):
        scores = np.round(rng.standard_normal(4000), 1).astype(dtype)  # many ties
        labels = rng.random(4000) < 0.2
        for a, b in zip(roc_from_scores(scores, labels), _argsort_roc(scores, labels)):
            np.testing.assert_array_equal(a, b)
    with pytest.raises(DataError, match="needs both same and different"):
        roc_from_scores(scores, np.zeros(4000, bool))
    with pytest.raises(DataError, match="NaN or infinite"):
        roc_from_scores(np.r_[scores[:-1], np.nan], labels, check_finite=True)


def test_tar_readings_nearest_and_strict():
    # 8 negatives, 10 positives; every point bends, so scikit-learn would keep them all
    roc = RocCurve(np.array([0.0, 0.125, 0.375, 0.5, 1.0]), np.array([0.0, 0.5, 0.6, 0.7, 1.0]), np.zeros(5))
    read = ijb.tar_at_far(roc, [0.25, 0.4, 0.0625], negatives=8, positives=10)
    assert read["tar"] == [0.6, 0.6, 0.5]  # 0.125 and 0.375 are equally near 0.25: the larger TPR
    assert read["fpr"] == [0.375, 0.375, 0.125]  # the nearest point may lie above the target
    assert read["tar_strict"] == [0.5, 0.6, 0.0]


def test_published_reading_uses_the_points_sklearn_keeps():
    # a horizontal run at TPR 0.5 from FPR 0.1 to 0.4 (equal steps), then a step up to 0.9:
    # scikit-learn keeps the run's ends, so a target of 0.31 reads the corner at FPR 0.4 (TPR 0.9)
    fpr = np.array([0.0, 0.1, 0.2, 0.3, 0.4, 0.4, 1.0])
    tpr = np.array([0.0, 0.5, 0.5, 0.5, 0.5, 0.9, 1.0])
    roc = RocCurve(fpr, tpr, np.zeros(7))
    assert ijb.published_points(roc, negatives=10, positives=10).tolist() == [0, 1, 4, 5, 6]
    read = ijb.tar_at_far(roc, [0.31], negatives=10, positives=10)
    assert read["tar"] == [0.9] and read["fpr"] == [0.4] and read["tar_strict"] == [0.5]


# ----------------------------------------------------------------------------- the ijb plugin
def test_plugin_reads_the_published_layout(ijb_root):
    data = facecore.create("datasets", "ijb", root=str(ijb_root))
    meta = ijb_root / "IJBC" / "meta"
    faces = [line.split() for line in (meta / "ijbc_face_tid_mid.txt").read_text().splitlines()]
    assert len(data) == len(faces) == len(data.image_names) and data.name == "IJBC"
    assert data.templates.tolist() == [int(f[1]) for f in faces] and data.medias.tolist() == [int(f[2]) for f in faces]
    marks = [line.split() for line in (meta / "ijbc_name_5pts_score.txt").read_text().splitlines()]
    np.testing.assert_allclose(data.scores, [float(m[-1]) for m in marks])
    pairs = np.loadtxt(meta / "ijbc_template_pair_label.txt", dtype=int)
    np.testing.assert_array_equal(data.pairs, pairs[:, :2])
    np.testing.assert_array_equal(data.labels, pairs[:, 2])
    image, problem = data[0]
    assert problem == "" and image.shape == (3, 112, 112) and image.dtype == torch.float32
    assert -1.0 <= float(image.min()) and float(image.max()) <= 1.0
    same = facecore.create("datasets", "ijb", root=str(ijb_root / "IJBC"), img_size=96)  # the target folder itself
    assert same[0][0].shape == (3, 96, 96)
    checked = ijb.TemplateSet.of(data, "ijb")
    assert checked.labels.dtype == bool and checked.pairs.shape == (153, 2)


def test_a_dataset_that_is_not_a_template_set():
    with pytest.raises(PluginError, match="lacks templates, medias, scores, pairs, labels"):
        ijb.TemplateSet.of([1, 2, 3], "bin-pairs")


def first_template(meta: Path) -> str:
    return (meta / "ijbc_face_tid_mid.txt").read_text().split()[1]


@pytest.mark.parametrize("edit, message", [
    (lambda m, c: (m / "ijbc_face_tid_mid.txt").unlink(), r"lacks ijbc_face_tid_mid\.txt"),
    (lambda m, c: shutil.rmtree(c), r"lacks \.\./loose_crop/"),
    (lambda m, c: (c / "5.jpg").unlink(), r"has landmarks for 1 image\(s\) that are not in .*loose_crop: 5\.jpg \(line 5\)"),
    (lambda m, c: (m / "ijbc_template_pair_label.txt").write_text(f"{first_template(m)} {first_template(m)} 1\n"
                                                                  f"999 {first_template(m)} 0\n1000 999 0\n"),
     r"names 2 template\(s\) that have no images in .*ijbc_face_tid_mid\.txt: 999 \(pair 2\), 1000 \(pair 3\) "
     r"\(2 pair\(s\) affected\)"),
    (lambda m, c: (m / "ijbc_template_pair_label.txt").write_text("1 2 0\n1 x 1\n"),
     r"ijbc_template_pair_label\.txt line 2: expected 'template_1 template_2 label'"),
    (lambda m, c: (m / "ijbc_template_pair_label.txt").write_text("1 1 0\n1 1 3\n"), r"the label of pair 2 is 3"),
    (lambda m, c: (m / "ijbc_name_5pts_score.txt").write_text(
        "\n".join((m / "ijbc_name_5pts_score.txt").read_text().splitlines()[1:]) + "\n"),
     r"1 image\(s\) of .*ijbc_face_tid_mid\.txt have no landmarks in .*: 1\.jpg"),
    (lambda m, c: (m / "ijbc_face_tid_mid.txt").write_text("1.jpg 1\n"), r"line 1: expected 'image_name template_id"),
], ids=["no-face-file", "no-loose-crop", "landmarks-without-image", "template-without-images", "bad-pair-line",
        "bad-label", "image-without-landmarks", "bad-face-line"])
def test_bad_layouts_are_named(ijb_root, tmp_path, edit, message):
    folder = copy_set(ijb_root, tmp_path) / "IJBC"
    edit(folder / "meta", folder / "loose_crop")
    with pytest.raises(DataError, match=message):
        facecore.create("datasets", "ijb", root=str(folder.parent))


def test_missing_root_and_wrong_target(ijb_root, tmp_path):
    with pytest.raises(DataError, match="IJB folder not found"):
        facecore.create("datasets", "ijb", root=str(tmp_path / "nope"))
    with pytest.raises(DataError, match="holds neither IJBB/meta/ nor meta/"):
        facecore.create("datasets", "ijb", root=str(ijb_root), target="IJBB")


# ----------------------------------------------------------------------------- facecore eval --ijb
@pytest.fixture
def run_dir(register_plugin, tmp_path) -> Path:
    register_plugin(TinyBackbonePlugin(BACKBONE), name="tiny-ijb-plugin")
    config = {
        "device": "cpu",
        "model": {"backbone": BACKBONE, "embedding_size": 8},
        "head": {"type": "arcface", "num_classes": 10},
        "data": {"root": str(tmp_path), "num_workers": 0},
        "logging": {"log_dir": str(tmp_path / "logs"), "tensorboard": False},
        "eval": {"test_batch_size": 16},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    torch.manual_seed(0)
    save_checkpoint({"config": facecore.load_config(str(tmp_path / "config.yaml")),
                     "backbone": TinyNet(8).state_dict(), "step": 3}, tmp_path / "best.pth")
    return tmp_path


def invoke(*args: str):
    return CliRunner().invoke(main, ["eval", *args])


def test_eval_ijb_end_to_end(run_dir, ijb_root):
    feats = run_dir / "features"
    result = invoke("--checkpoint", str(run_dir / "best.pth"), "--ijb", str(ijb_root), "--save-features", str(feats),
                    "--ijb-protocol", "1:1", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    numbers = report["results"]["IJBC"]
    assert [k for k in numbers if k.startswith("tar@far=")] == [f"tar@far=1e-0{i}" for i in range(6, 0, -1)]
    assert report["ijb"]["IJBC"]["pairs"] == 153 and report["ijb"]["IJBC"]["templates"] == 18
    logs = run_dir / "logs"
    stem = f"test_result_{BACKBONE}_{report['timestamp']}"
    assert json.loads((logs / f"{stem}.json").read_text()) == report
    text = (logs / f"{stem}.txt").read_text()
    assert "IJBC TAR (%) at FAR" in text and "nearest FPR (published)" in text and "FPR <= target" in text
    with Image.open(report["roc_plots"]["IJBC"]) as png:
        assert png.format == "PNG"

    arrays = {p.name: np.load(p) for p in feats.glob("*.npy")}
    assert sorted(arrays) == [f"ijbc_{k}.npy" for k in
                              ("image_features", "pair_labels", "pair_scores", "template_features", "template_ids")]
    data = facecore.create("datasets", "ijb", root=str(ijb_root))
    image_features = arrays["ijbc_image_features.npy"]
    assert image_features.shape == (len(data), 8)
    net = TinyNet(8)
    net.load_state_dict(torch.load(run_dir / "best.pth", weights_only=True)["backbone"])
    net.eval()
    with torch.no_grad():  # image 3 embedded with its mirror, in the face file's order
        x = data[3][0][None]
        expected = (net(x) + net(torch.flip(x, dims=[3]))).numpy()[0]
    np.testing.assert_allclose(image_features[3], expected, atol=1e-5)
    # the reported numbers follow from the saved features by the plain reference protocol
    _, sims = reference_protocol(image_features, data.templates, data.medias, data.scores, data.pairs)
    saved_scores = arrays["ijbc_pair_scores.npy"]
    np.testing.assert_allclose(saved_scores, sims, atol=2e-6)
    np.testing.assert_array_equal(arrays["ijbc_pair_labels.npy"], data.labels)
    nearest, strict = reference_tar(saved_scores, data.labels)
    assert report["ijb"]["IJBC"]["tar_nearest_fpr"] == nearest
    assert report["ijb"]["IJBC"]["tar_fpr_at_most_target"] == strict


def test_eval_ijb_from_the_config_with_options(run_dir, ijb_root):
    result = invoke("--checkpoint", str(run_dir / "best.pth"), "--set", f"eval.ijb.root={ijb_root}",
                    "--set", "eval.ijb.far_targets=[0.01,0.1]", "--set", "eval.ijb.detector_score=false",
                    "--set", "eval.ijb.flip=false")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split()[-2:] == ["1e-02", "1e-01"]
    assert lines[2].startswith("nearest FPR (published)") and lines[3].startswith("FPR <= target")
    assert "18 templates, 153 pairs (18 genuine)" in lines[4]


def test_eval_ijb_bad_input_is_named_without_traceback(run_dir, ijb_root, tmp_path):
    folder = copy_set(ijb_root, tmp_path)
    (folder / "IJBC" / "loose_crop" / "7.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    result = invoke("--checkpoint", str(run_dir / "best.pth"), "--ijb", str(folder), "--num-workers", "1")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "loose_crop/7.jpg: cannot decode JPEG" in result.output
    (folder / "IJBC" / "meta" / "ijbc_name_5pts_score.txt").unlink()
    result = invoke("--checkpoint", str(run_dir / "best.pth"), "--ijb", str(folder))
    assert result.exit_code == 1 and "lacks ijbc_name_5pts_score.txt" in result.output
    result = invoke("--checkpoint", str(run_dir / "best.pth"), "--ijb", str(ijb_root), "--set", "eval.ijb.dataset=bin-pairs")
    assert result.exit_code == 1 and "dataset 'bin-pairs' does not read template sets" in result.output
    assert "template-set readers: ijb" in result.output
    result = invoke("--checkpoint", str(run_dir / "best.pth"))
    assert result.exit_code == 2 and "nothing to evaluate" in result.output and "eval.ijb.root" in result.output
    result = invoke("--checkpoint", str(run_dir / "best.pth"), "--set", "eval.ijb.target=IJBA")
    assert result.exit_code == 2 and "eval.ijb.target" in result.output


def test_demo_data_ijb(monkeypatch, tmp_path):
    import facecore.data.synthetic_ijb as synthetic_ijb

    real = synthetic_ijb.make_ijb_data
    monkeypatch.setattr(synthetic_ijb, "make_ijb_data",
                        lambda out, **kw: real(out, identities=2, templates_per_identity=2, progress=False, **kw))
    result = CliRunner().invoke(main, ["demo-data", "--ijb", str(tmp_path / "ijb"), "--seed", "3"])
    assert result.exit_code == 0, result.output
    assert "IJB-C layout" in result.output and "4 templates, 6 pairs (2 genuine)" in result.output
    assert len(facecore.create("datasets", "ijb", root=str(tmp_path / "ijb"))) > 4
    again = CliRunner().invoke(main, ["demo-data", "--ijb", str(tmp_path / "ijb")])
    assert again.exit_code == 1 and "--force" in again.output
    neither = CliRunner().invoke(main, ["demo-data"])
    assert neither.exit_code == 2 and "OUT_DIR" in neither.output


def test_ijbb_layout(tmp_path):
    summary = make_ijb_data(tmp_path, target="IJBB", identities=2, templates_per_identity=2, seed=1, progress=False)
    assert sorted(p.name for p in (tmp_path / "IJBB" / "meta").iterdir()) == [
        "ijbb_1N_gallery_S1.csv", "ijbb_1N_gallery_S2.csv", "ijbb_1N_probe_mixed.csv",
        "ijbb_face_tid_mid.txt", "ijbb_name_5pts_score.txt", "ijbb_template_pair_label.txt"]
    data = facecore.create("datasets", "ijb", root=str(tmp_path), target="IJBB")
    assert data.name == "IJBB" and len(data) == summary["images"] and data.labels.tolist().count(1) == 2
    with pytest.raises(DataError, match="holds neither IJBC/meta/ nor meta/"):
        facecore.create("datasets", "ijb", root=str(tmp_path))


class _Uint8Templates(torch.utils.data.Dataset):
    """A template-set reader that leaves normalization to the core: uint8 images (and no problems)."""

    def __init__(self, images: torch.Tensor, floats: bool = False):
        self.images, self.floats = images, floats

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        image = self.images[i]
        return ((image.float() - 127.5) / 127.5 if self.floats else image), ""


def test_embed_images_normalizes_uint8_like_the_pair_sets():
    torch.manual_seed(0)
    net = TinyNet(6)
    images = torch.randint(0, 256, (5, 3, 112, 112), dtype=torch.uint8)
    got = ijb.embed_images(net, _Uint8Templates(images), 2, "cpu")
    want = ijb.embed_images(net, _Uint8Templates(images, floats=True), 2, "cpu")
    np.testing.assert_allclose(got, want, atol=1e-5)
    from facecore.eval.evaluation import embed

    plain, mirrored = embed(net, [x for x in images], 2, "cpu")
    np.testing.assert_allclose(got, plain + mirrored, atol=1e-5)

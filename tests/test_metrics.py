"""The bundled metrics against plain loop-by-loop references of the same definitions."""

from __future__ import annotations

import inspect
import math
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sklearn.metrics import roc_auc_score, roc_curve
from sklearn.model_selection import KFold

import facecore
from facecore.errors import ConfigError, DataError
from facecore.eval.evaluation import l2_normalize, roc_curve_points
from facecore.core.plugins import registry

METRICS = ["verification", "tar_at_far", "auc", "eer"]


# ----------------------------------------------------------------------------- references
def ref_distances(emb):
    return np.array([float(np.sum((emb[2 * i].astype(np.float64) - emb[2 * i + 1]) ** 2)) for i in range(len(emb) // 2)])


def ref_scores(emb):
    return np.array([float(np.dot(emb[2 * i].astype(np.float64), emb[2 * i + 1])) for i in range(len(emb) // 2)])


def ref_accuracy(threshold, dist, same):
    predict = dist < threshold
    tp = np.sum(predict & same)
    tn = np.sum(~predict & ~same)
    return (tp + tn) / dist.size


def ref_verification(emb, issame, folds=10, thresholds=None):
    thresholds = np.arange(0, 4, 0.01) if thresholds is None else thresholds
    dist, same = ref_distances(emb), np.asarray(issame, bool)
    accs, bests = [], []
    for train, test in KFold(n_splits=folds, shuffle=False).split(np.arange(dist.size)):
        train_acc = [ref_accuracy(t, dist[train], same[train]) for t in thresholds]
        best = thresholds[int(np.argmax(train_acc))]
        bests.append(best)
        accs.append(ref_accuracy(best, dist[test], same[test]))
    return {"accuracy": np.mean(accs), "accuracy_std": np.std(accs), "best_threshold": np.mean(bests)}


def ref_roc(emb, issame):
    scores, same = ref_scores(emb), np.asarray(issame, bool)
    fpr, tpr = [0.0], [0.0]
    for t in sorted(set(scores.tolist()), reverse=True):
        predict = scores >= t
        tpr.append(np.sum(predict & same) / np.sum(same))
        fpr.append(np.sum(predict & ~same) / np.sum(~same))
    return np.array(fpr), np.array(tpr)


def ref_tar(emb, issame, target):
    fpr, tpr = ref_roc(emb, issame)
    return max(tp for fp, tp in zip(fpr, tpr) if fp <= target)


def ref_auc(emb, issame):
    scores, same = ref_scores(emb), np.asarray(issame, bool)
    wins = 0.0
    for p in scores[same]:
        for n in scores[~same]:
            wins += 1.0 if p > n else 0.5 if p == n else 0.0
    return wins / (same.sum() * (~same).sum())


def ref_eer(emb, issame):
    fpr, tpr = ref_roc(emb, issame)
    fnr = 1 - tpr
    for i in range(1, len(fpr)):
        before, after = fpr[i - 1] - fnr[i - 1], fpr[i] - fnr[i]
        if before < 0 <= after:
            w = -before / (after - before)
            return fpr[i - 1] + w * (fpr[i] - fpr[i - 1])
    raise AssertionError("no crossing")


# ----------------------------------------------------------------------------- data
def random_set(n, dim=16, noise=0.8, seed=0, p_same=0.5):
    rng = np.random.default_rng(seed)
    emb = l2_normalize(rng.normal(size=(2 * n, dim)))
    same = rng.random(n) < p_same
    emb[1::2][same] = l2_normalize(emb[0::2][same] + noise * rng.normal(size=(int(same.sum()), dim)))
    return emb, same


def tied_set(n, seed=0):
    """Embeddings from a pool of exactly representable unit vectors (basis vectors and (+-1/2, ...)).

    Every dot product is a multiple of 1/4 computed without rounding, so distances and scores tie
    exactly across pairs, and distances 0, 1, 2, 3 and 4 fall exactly on grid thresholds.
    """
    rng = np.random.default_rng(seed)
    halves = np.array([[0.5, 0.5, 0.5, 0.5], [0.5, -0.5, 0.5, -0.5], [-0.5, 0.5, 0.5, 0.5], [0.5, 0.5, -0.5, -0.5]])
    pool = np.vstack([np.eye(4), -np.eye(4)[:1], halves])
    emb = pool[rng.integers(0, len(pool), size=2 * n)]
    same = rng.random(n) < 0.5
    return emb, same


CASES = {
    "random": random_set(613, seed=1),
    "random-easy": random_set(500, noise=0.3, seed=2),
    "ties": tied_set(401, seed=3),
    "unbalanced": random_set(300, seed=4, p_same=0.1),
}


def run(name, emb, issame, **options):
    return facecore.create("metrics", name, **options)(emb, issame)


# ----------------------------------------------------------------------------- verification
@pytest.mark.parametrize("case", CASES)
def test_verification_matches_reference(case):
    emb, same = CASES[case]
    got, want = run("verification", emb, same), ref_verification(emb, same)
    assert got.keys() == {"accuracy", "accuracy_std", "best_threshold"}
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-12), key


@pytest.mark.parametrize("kind", ["all-same", "all-different"])
def test_verification_one_class_sets_match_reference(kind):
    emb, _ = random_set(120, seed=5)
    same = np.full(120, kind == "all-same")
    got, want = run("verification", emb, same), ref_verification(emb, same)
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-12)
    if kind == "all-different":  # threshold 0 calls every pair different: perfect, and first on ties
        assert got == {"accuracy": 1.0, "accuracy_std": 0.0, "best_threshold": 0.0}


def test_verification_same_means_strictly_below_threshold():
    # identical pairs have distance exactly 0: threshold 0 calls them different, 0.01 is the first perfect one
    emb = np.repeat(l2_normalize(np.random.default_rng(0).normal(size=(50, 8))), 2, axis=0)
    got = run("verification", emb, np.ones(50, bool))
    assert got["best_threshold"] == pytest.approx(0.01)
    assert got["accuracy"] == 1.0


def test_verification_folds_are_contiguous_and_unshuffled():
    # fold 0 (pairs 0-9) holds the only "same" pairs: its threshold is chosen on folds that have none,
    # so it scores 0; the other folds score 1. Shuffled folds would give another result.
    emb = np.repeat(l2_normalize(np.random.default_rng(0).normal(size=(100, 8))), 2, axis=0)
    same = np.zeros(100, bool)
    same[:10] = True
    got = run("verification", emb, same)
    assert got["accuracy"] == pytest.approx(0.9)
    assert got["accuracy_std"] == pytest.approx(0.3)


@pytest.mark.parametrize("options", [{"folds": 5}, {"threshold_start": 0.5, "threshold_stop": 2.5, "threshold_step": 0.05}])
def test_verification_options(options):
    emb, same = CASES["random"]
    folds = options.get("folds", 10)
    grid = np.arange(options.get("threshold_start", 0), options.get("threshold_stop", 4), options.get("threshold_step", 0.01))
    got, want = run("verification", emb, same, **options), ref_verification(emb, same, folds, grid)
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-12)


def test_verification_grid_is_the_published_one():
    v = facecore.create("metrics", "verification")
    assert v.thresholds.size == 400 and v.thresholds[0] == 0 and v.thresholds[-1] == pytest.approx(3.99)


def test_verification_errors():
    emb, same = random_set(9)
    with pytest.raises(DataError, match="at least 10 pairs"):
        run("verification", emb, same)
    with pytest.raises(DataError, match="2 embeddings per pair"):
        run("verification", emb[:-1], same)
    with pytest.raises(ConfigError, match="threshold_stop"):
        facecore.create("metrics", "verification", threshold_start=2.0, threshold_stop=1.0)
    with pytest.raises(ConfigError, match="folds"):
        facecore.create("metrics", "verification", folds=1)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(10, 80), dim=st.integers(2, 6), pool=st.integers(2, 12), seed=st.integers(0, 2**31))
def test_verification_matches_reference_on_generated_sets(n, dim, pool, seed):
    rng = np.random.default_rng(seed)
    vectors = l2_normalize(rng.normal(size=(pool, dim)))  # a small pool makes exact distance ties common
    emb = vectors[rng.integers(0, pool, size=2 * n)]
    same = rng.random(n) < rng.random()
    got, want = run("verification", emb, same), ref_verification(emb, same)
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-12)


# ----------------------------------------------------------------------------- ROC metrics
@pytest.mark.parametrize("case", CASES)
def test_roc_points_match_reference_and_sklearn(case):
    emb, same = CASES[case]
    roc = roc_curve_points(emb, same)
    fpr, tpr = ref_roc(emb, same)
    np.testing.assert_allclose(roc.fpr, fpr, atol=1e-12)
    np.testing.assert_allclose(roc.tpr, tpr, atol=1e-12)
    sk_fpr, sk_tpr, _ = roc_curve(same, ref_scores(emb), drop_intermediate=False)
    np.testing.assert_allclose(roc.fpr, sk_fpr, atol=1e-12)
    np.testing.assert_allclose(roc.tpr, sk_tpr, atol=1e-12)


@pytest.mark.parametrize("case", CASES)
def test_tar_auc_eer_match_reference(case):
    emb, same = CASES[case]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # FAR 1e-3 is not measurable on these small sets
        tar = run("tar_at_far", emb, same, far_targets=[0.3, 0.1, 0.05, 0.01])
    for target in (0.3, 0.1, 0.05, 0.01):
        assert tar[facecore_key(target)] == pytest.approx(ref_tar(emb, same, target), abs=1e-12)
    assert run("auc", emb, same)["auc"] == pytest.approx(ref_auc(emb, same), abs=1e-12)
    assert run("auc", emb, same)["auc"] == pytest.approx(roc_auc_score(same, ref_scores(emb)), abs=1e-12)
    assert run("eer", emb, same)["eer"] == pytest.approx(ref_eer(emb, same), abs=1e-12)


def facecore_key(target):
    from facecore_plugins.metrics import far_key

    return far_key(target)


def test_far_keys():
    assert facecore_key(1e-1) == "tar@far=1e-01"
    assert facecore_key(1e-3) == "tar@far=1e-03"
    assert facecore_key(2.5e-3) == "tar@far=2.5e-03"  # not rounded into the key of another target


def test_hand_computed_roc():
    # scores: same .9, different .8, same .7, same .6 -> ROC (0,0) (0,1/3) (1,1/3) (1,2/3) (1,1)
    emb = pair_embeddings([0.9, 0.8, 0.7, 0.6])
    same = np.array([True, False, True, True])
    assert run("auc", emb, same)["auc"] == pytest.approx(1 / 3)
    # FNR = 1 - TPR meets FPR on the segment (0, 1/3)-(1, 1/3), at FPR = 2/3
    assert run("eer", emb, same)["eer"] == pytest.approx(2 / 3)


def pair_embeddings(scores):
    """Unit vectors in 2-D whose pairs have the given cosine similarities."""
    rows = []
    for s in scores:
        rows += [[1.0, 0.0], [s, math.sqrt(1 - s * s)]]
    return np.array(rows)


def test_hand_computed_tar():
    # same .9 and .6, different .8 and .7 -> ROC (0,0) (0,.5) (.5,.5) (1,.5) (1,1)
    emb, same = pair_embeddings([0.9, 0.8, 0.7, 0.6]), np.array([True, False, False, True])
    with pytest.warns(RuntimeWarning, match="FAR 0.4 needs at least 3 different pairs"):
        tar = run("tar_at_far", emb, same, far_targets=[0.5, 1.0, 0.4], extra_far_targets=[])
    assert tar["tar@far=1e+00"] == 1.0 and tar["tar@far=5e-01"] == 0.5
    assert math.isnan(tar["tar@far=4e-01"])  # 2 different pairs cannot measure a FAR below 1/2
    assert list(tar) == ["tar@far=1e+00", "tar@far=5e-01", "tar@far=4e-01"]
    assert run("auc", emb, same)["auc"] == 0.5
    assert run("eer", emb, same)["eer"] == pytest.approx(0.5)


def test_perfect_separation():
    emb, same = random_set(400, noise=0.01, seed=7)
    assert run("auc", emb, same)["auc"] == 1.0
    assert run("eer", emb, same)["eer"] == 0.0
    assert run("verification", emb, same)["accuracy"] == 1.0


def test_unmeasurable_far_target_is_nan_with_a_warning():
    emb, same = random_set(600, seed=8)  # ~300 different pairs: FAR 1e-3 needs 1000
    with pytest.warns(RuntimeWarning, match="1e-03"):
        out = run("tar_at_far", emb, same)
    assert set(out) == {"tar@far=1e-01", "tar@far=1e-02", "tar@far=1e-03"}
    assert math.isnan(out["tar@far=1e-03"]) and not math.isnan(out["tar@far=1e-02"])


@pytest.mark.parametrize("negatives, shown", [(9_999, False), (10_000, True)])
def test_lower_far_targets_appear_when_measurable(negatives, shown):
    rng = np.random.default_rng(9)
    n = negatives + 50
    emb = l2_normalize(rng.normal(size=(2 * n, 4)))
    same = np.r_[np.ones(50, bool), np.zeros(negatives, bool)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the default targets are measurable: no warning at all
        out = run("tar_at_far", emb, same)
    assert ("tar@far=1e-04" in out) is shown
    assert "tar@far=1e-05" not in out
    if shown:
        assert out["tar@far=1e-04"] == pytest.approx(ref_tar(emb, same, 1e-4), abs=1e-12)


@pytest.mark.parametrize("metric, key", [("tar_at_far", "tar@far=1e-01"), ("auc", "auc"), ("eer", "eer")])
@pytest.mark.parametrize("value", [True, False])
def test_roc_metrics_on_one_class_sets_are_nan_with_a_warning(metric, key, value):
    emb, _ = random_set(50)
    with pytest.warns(RuntimeWarning, match="an ROC needs both"):
        out = run(metric, emb, np.full(50, value))
    assert math.isnan(out[key])


# ----------------------------------------------------------------------------- contract
@pytest.mark.parametrize("name", METRICS)
def test_every_metric_has_flip_and_defaults_match_the_factory(name):
    reg = registry("metrics").get(name)
    assert reg.options["flip"]["type"] == "boolean" and reg.options["flip"]["default"] is True
    params = inspect.signature(reg.factory).parameters
    assert set(params) == set(reg.options)
    for key, prop in reg.options.items():
        assert params[key].default == prop["default"], key
    assert facecore.create("metrics", name).flip is True
    assert facecore.create("metrics", name, flip=False).flip is False


def test_metric_options_are_validated():
    with pytest.raises(ConfigError, match="far_targets"):
        facecore.create("metrics", "tar_at_far", far_targets=[0])
    with pytest.raises(ConfigError, match="flip"):
        facecore.create("metrics", "auc", flip="yes")

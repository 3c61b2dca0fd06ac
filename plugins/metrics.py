"""Bundled verification metrics: 10-fold accuracy (the LFW protocol), TAR@FAR, AUC and EER.

Each factory returns a callable ``metric(embeddings, issame) -> dict[str, float]`` that takes
L2-normalized embeddings (2N, D) in pair order and ``issame`` (N,). Its ``flip`` attribute tells
the evaluator to sum each image's embedding with its mirror's before normalizing.

Undefined results are NaN with a warning, never a missing key: a FAR target finer than the set
can measure (fewer than 1/target different pairs), and ROC metrics on a set that lacks same or
different pairs. NaN values are left out of TensorBoard and written as null in JSON.
"""

from __future__ import annotations

import math
import warnings

import numpy as np

from facecore import hookimpl
from facecore.errors import ConfigError, DataError
from facecore.eval.evaluation import (
    RocCurve,
    equal_error_rate,
    pair_cosine,
    pair_squared_distances,
    roc_auc,
    roc_from_scores,
)

FLIP = {
    "type": "boolean",
    "default": True,
    "description": "Sum each image's embedding with its horizontal mirror's before L2-normalizing.",
}

VERIFICATION_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "folds": {"type": "integer", "minimum": 2, "default": 10,
                  "description": "Contiguous, unshuffled folds; the threshold is chosen on the others."},
        "threshold_start": {"type": "number", "minimum": 0, "default": 0.0,
                            "description": "First squared-L2 distance threshold of the grid."},
        "threshold_stop": {"type": "number", "exclusiveMinimum": 0, "default": 4.0,
                           "description": "End of the threshold grid (excluded)."},
        "threshold_step": {"type": "number", "exclusiveMinimum": 0, "default": 0.01,
                           "description": "Spacing of the threshold grid."},
        "flip": FLIP,
    },
}

TARGETS = {"type": "array", "items": {"type": "number", "exclusiveMinimum": 0, "maximum": 1}}

TAR_AT_FAR_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "far_targets": {**TARGETS, "default": [1e-1, 1e-2, 1e-3],
                        "description": "FAR targets always reported (NaN with a warning when the set "
                                       "has fewer than 1/target different pairs)."},
        "extra_far_targets": {**TARGETS, "default": [1e-4, 1e-5, 1e-6],
                              "description": "Lower FAR targets reported only when the set has at "
                                             "least 1/target different pairs."},
        "flip": FLIP,
    },
}

FLIP_ONLY_SCHEMA = {"type": "object", "additionalProperties": False, "properties": {"flip": FLIP}}


def far_key(target: float) -> str:
    """Result key of a FAR target: ``tar@far=1e-03``; more digits only when needed to tell targets apart."""
    for digits in range(0, 16):
        text = f"{target:.{digits}e}"
        if float(text) == target:
            return f"tar@far={text}"
    return f"tar@far={target!r}"


def measurable(target: float, negatives: int) -> bool:
    """Whether a set with ``negatives`` different pairs can resolve a FAR of ``target`` (>= 1/target of them)."""
    return negatives * target >= 1 - 1e-9


def _one_class_warning(metric: str, same: np.ndarray) -> None:
    n_pos = int(same.sum())
    warnings.warn(
        f"{metric}: the set has {n_pos} same and {same.size - n_pos} different pairs; an ROC needs "
        "both, so the result is NaN",
        RuntimeWarning,
        stacklevel=3,
    )


def _roc(metric: str, embeddings: np.ndarray, issame: np.ndarray) -> RocCurve | None:
    scores, same = pair_cosine(embeddings, issame)
    if same.all() or not same.any():
        _one_class_warning(metric, same)
        return None
    return roc_from_scores(scores, same)


class Verification:
    """10-fold verification accuracy on squared L2 distance, as in the published LFW/CFP/AgeDB numbers.

    For each fold the grid threshold with the best accuracy on the other folds (the first on ties;
    "same" when distance < threshold) is applied to the fold.
    """

    def __init__(self, folds: int = 10, threshold_start: float = 0.0, threshold_stop: float = 4.0,
                 threshold_step: float = 0.01, flip: bool = True):
        if threshold_stop <= threshold_start:
            raise ConfigError([f"verification: threshold_stop ({threshold_stop}) must be greater than "
                               f"threshold_start ({threshold_start})"])
        self.folds = folds
        self.flip = flip
        self.thresholds = np.arange(threshold_start, threshold_stop, threshold_step)

    def __call__(self, embeddings: np.ndarray, issame: np.ndarray) -> dict[str, float]:
        dist, same = pair_squared_distances(embeddings, issame)
        n = dist.size
        if n < self.folds:
            raise DataError(f"verification with {self.folds} folds needs at least {self.folds} pairs; the set has {n}")
        sizes = [n // self.folds + (1 if f < n % self.folds else 0) for f in range(self.folds)]
        bounds = np.cumsum([0] + sizes)  # contiguous folds, the first n % folds one pair larger (KFold)
        # correct[f, t]: pairs of fold f that threshold t classifies correctly.
        correct = np.empty((self.folds, self.thresholds.size), dtype=np.int64)
        for f in range(self.folds):
            d, y = dist[bounds[f] : bounds[f + 1]], same[bounds[f] : bounds[f + 1]]
            pos, neg = np.sort(d[y]), np.sort(d[~y])
            true_pos = np.searchsorted(pos, self.thresholds, side="left")  # same pairs with d < t
            true_neg = neg.size - np.searchsorted(neg, self.thresholds, side="left")  # different, d >= t
            correct[f] = true_pos + true_neg
        total = correct.sum(axis=0)
        accuracy = np.empty(self.folds)
        best = np.empty(self.folds)
        for f in range(self.folds):
            k = int(np.argmax(total - correct[f]))  # train folds; one denominator, so counts rank alike
            best[f] = self.thresholds[k]
            accuracy[f] = correct[f, k] / (bounds[f + 1] - bounds[f])
        return {
            "accuracy": float(np.mean(accuracy)),
            "accuracy_std": float(np.std(accuracy)),
            "best_threshold": float(np.mean(best)),
        }


class TarAtFar:
    """True-accept rate at false-accept-rate targets, from the ROC of cosine similarity."""

    def __init__(self, far_targets: list[float] = [1e-1, 1e-2, 1e-3],  # noqa: B006 (copied, never mutated)
                 extra_far_targets: list[float] = [1e-4, 1e-5, 1e-6], flip: bool = True):  # noqa: B006
        self.far_targets = [float(t) for t in far_targets]
        self.extra_far_targets = [float(t) for t in extra_far_targets]
        self.flip = flip

    def __call__(self, embeddings: np.ndarray, issame: np.ndarray) -> dict[str, float]:
        scores, same = pair_cosine(embeddings, issame)
        negatives = int((~same).sum())
        targets = list(self.far_targets)
        targets += [t for t in self.extra_far_targets if t not in targets and measurable(t, negatives)]
        targets.sort(reverse=True)
        if same.all() or not same.any():
            _one_class_warning("tar_at_far", same)
            return {far_key(t): math.nan for t in targets}
        roc = roc_from_scores(scores, same)
        out = {}
        for t in targets:
            if not measurable(t, negatives):
                warnings.warn(
                    f"tar_at_far: FAR {t:g} needs at least {math.ceil(1 / t - 1e-9)} different pairs, the "
                    f"set has {negatives}; {far_key(t)} is NaN",
                    RuntimeWarning,
                    stacklevel=2,
                )
                out[far_key(t)] = math.nan
                continue
            i = int(np.searchsorted(roc.fpr, t, side="right")) - 1  # last point with fpr <= t; tpr rises
            out[far_key(t)] = float(roc.tpr[i])
        return out


class Auc:
    """Area under the ROC of cosine similarity."""

    def __init__(self, flip: bool = True):
        self.flip = flip

    def __call__(self, embeddings: np.ndarray, issame: np.ndarray) -> dict[str, float]:
        roc = _roc("auc", embeddings, issame)
        return {"auc": math.nan if roc is None else roc_auc(roc)}


class Eer:
    """Equal error rate of cosine similarity: where false accepts and false rejects are equally likely."""

    def __init__(self, flip: bool = True):
        self.flip = flip

    def __call__(self, embeddings: np.ndarray, issame: np.ndarray) -> dict[str, float]:
        roc = _roc("eer", embeddings, issame)
        return {"eer": math.nan if roc is None else equal_error_rate(roc)}


def tar_at_far_keys(far_targets: list[float], extra_far_targets: list[float], flip: bool) -> list[str]:
    """The keys TarAtFar can produce with these options (the extra targets only on sets big enough)."""
    return [far_key(t) for t in sorted({*far_targets, *extra_far_targets}, reverse=True)]


@hookimpl
def register_metrics(register):
    register("verification", Verification, schema=VERIFICATION_SCHEMA,
             description="10-fold accuracy on squared L2 distance (LFW protocol): accuracy, accuracy_std, best_threshold",
             keys=["accuracy", "accuracy_std", "best_threshold"],
             threshold={"key": "best_threshold", "kind": "squared_l2"})
    register("tar_at_far", TarAtFar, schema=TAR_AT_FAR_SCHEMA,
             description="TAR at FAR targets from the cosine-similarity ROC: tar@far=1e-01, ...",
             keys=tar_at_far_keys, roc=True)
    register("auc", Auc, schema=FLIP_ONLY_SCHEMA, description="Area under the cosine-similarity ROC: auc",
             keys=["auc"], roc=True)
    register("eer", Eer, schema=FLIP_ONLY_SCHEMA, description="Equal error rate of the cosine-similarity ROC: eer",
             keys=["eer"], roc=True)

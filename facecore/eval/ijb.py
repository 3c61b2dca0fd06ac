"""IJB-B / IJB-C 1:1 template verification: the protocol behind the published TAR@FAR tables.

1. Every face image is embedded with its mirror image and the two embeddings are added.
2. Its feature is optionally L2-normalized (``norm_score=False``) and multiplied by its
   detector score (``detector_score=True``).
3. The images of one media (a photo, or the frames of one video) in a template are averaged,
   the media features of the template summed, and the sum L2-normalized.
4. A template pair's score is the dot product (cosine) of its two template features.
5. TAR at each FAR target is read off the ROC as the point whose FPR is nearest to the
   target (the largest TPR among equally near points), among the points scikit-learn's
   ``roc_curve`` keeps by default: the convention of InsightFace's IJB script and of the
   published tables. The strict reading (largest TPR with FPR <= target) is reported beside it.

Everything after the embedding pass is vectorized and works in bounded memory: pooling is
one sparse product, pair scores come from blocks of template-by-template dot products
(BLAS) or chunked gathers, and the ROC needs two sorts. ``benchmarks/ijb.py`` times it at
IJB-C's sizes.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import DataError, PluginError
from .evaluation import RocCurve, embedding_batches, roc_auc, roc_from_scores

FAR_TARGETS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
TEMPLATE_SET_ATTRIBUTES = ("templates", "medias", "scores", "pairs", "labels")

# Pair scoring: a block of template rows is scored against the columns its pairs use with one
# matrix product when that costs at most GEMM_RATIO dot products per pair (a BLAS dot product is
# roughly that much cheaper than a gathered one); otherwise the pairs are gathered in chunks.
GEMM_RATIO = 64
BLOCK_BYTES = 128 << 20  # the largest product block, float32
GATHER_CHUNK = 1 << 14  # pairs per gathered chunk: 2 x 32 MiB at D=512
LOOKUP_SPAN = 1 << 26  # template ids spanning fewer values map to rows through a table (<= 256 MiB)


@dataclass
class TemplateSet:
    """What the protocol needs from an IJB-style set, checked and as NumPy arrays.

    templates, medias (N,) int64 and scores (N,) float64 per image, in the order the
    dataset yields the images; pairs (P, 2) int64 template ids and labels (P,) bool.
    """

    name: str
    templates: np.ndarray
    medias: np.ndarray
    scores: np.ndarray
    pairs: np.ndarray
    labels: np.ndarray

    @classmethod
    def of(cls, dataset: Any, name: str = "template set") -> "TemplateSet":
        """Read and check the template-set attributes of a dataset plugin's object."""
        missing = [a for a in TEMPLATE_SET_ATTRIBUTES if not hasattr(dataset, a)]
        if missing:
            raise PluginError(f"dataset '{name}' is not a template set: it lacks {', '.join(missing)} "
                              f"(a template set has {', '.join(TEMPLATE_SET_ATTRIBUTES)}; see docs/writing-plugins.md)")
        templates = np.asarray(dataset.templates).reshape(-1).astype(np.int64, copy=False)
        medias = np.asarray(dataset.medias).reshape(-1).astype(np.int64, copy=False)
        scores = np.asarray(dataset.scores, dtype=np.float64).reshape(-1)
        pairs = np.asarray(dataset.pairs).astype(np.int64, copy=False)
        labels = np.asarray(dataset.labels).reshape(-1)
        n = len(dataset)
        if not templates.size == medias.size == scores.size == n:
            raise PluginError(f"dataset '{name}': templates, medias and scores need one entry per image ({n}); "
                              f"got {templates.size}, {medias.size} and {scores.size}")
        if pairs.ndim != 2 or pairs.shape[1] != 2 or labels.size != pairs.shape[0]:
            raise PluginError(f"dataset '{name}': pairs must be (P, 2) template ids with one label each; got pairs "
                              f"of shape {pairs.shape} and {labels.size} labels")
        if not np.isin(labels, (0, 1)).all():
            raise PluginError(f"dataset '{name}': labels must be 0 (different people) or 1 (same person)")
        return cls(getattr(dataset, "name", name), templates, medias, scores, pairs, labels.astype(bool))


def embed_images(
    backbone: Any,
    dataset: Any,
    batch_size: int,
    device: Any,
    *,
    flip: bool = True,
    num_workers: int = 0,
    progress: bool = False,
) -> np.ndarray:
    """Image features (N, D) float32 in dataset order: f(x) + f(mirror of x), or f(x) without ``flip``.

    The embedding pass is :func:`~facecore.eval.evaluation.embedding_batches` (uint8 images are
    normalized as everywhere else; an image that could not be read is a DataError); the output is
    filled in place, one array for IJB-C's 469k images.
    """
    out: np.ndarray | None = None
    done = 0
    for a, b in embedding_batches(backbone, dataset, batch_size, device, flip=flip, num_workers=num_workers,
                                  progress=progress, what="template set"):
        feats = a + b if b is not None else a
        if out is None:
            out = np.empty((len(dataset), feats.shape[1]), dtype=np.float32)
        out[done : done + feats.shape[0]] = feats.cpu().numpy()
        done += feats.shape[0]
    assert out is not None  # embedding_batches raised on an empty set
    return out


def weight_features(
    features: np.ndarray,
    scores: np.ndarray | None = None,
    *,
    norm_score: bool = True,
    detector_score: bool = True,
) -> np.ndarray:
    """Image features as the protocol pools them, computed in place (``features`` is float32 (N, D)).

    ``norm_score=False`` L2-normalizes each feature (dropping the norm, a quality cue);
    ``detector_score`` multiplies it by the detector's face score.
    """
    if not norm_score:
        norms = np.sqrt(np.einsum("ij,ij->i", features, features))
        features /= np.maximum(norms, 1e-12)[:, None]
    if detector_score:
        if scores is None:
            raise ValueError("detector_score needs the detector scores")
        features *= np.asarray(scores, dtype=features.dtype)[:, None]
    return features


def pool_templates(features: np.ndarray, templates: np.ndarray, medias: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(template ids (T,) sorted, L2-normalized template features (T, D) float32)``.

    A template's feature is the sum over its medias of the mean feature of that media's
    images: one sparse (T x N) CSR product, no copy of the image features.
    """
    import torch

    templates = np.asarray(templates).reshape(-1)
    medias = np.asarray(medias).reshape(-1)
    n = features.shape[0]
    if templates.size != n or medias.size != n:
        raise DataError(f"{n} image features but {templates.size} template ids and {medias.size} media ids")
    template_ids, t_index = np.unique(templates, return_inverse=True)
    media_ids, m_index = np.unique(medias, return_inverse=True)
    t_index = t_index.reshape(-1)
    group = t_index.astype(np.int64) * media_ids.size + m_index.reshape(-1)  # one group per (template, media)
    _, g_index, g_count = np.unique(group, return_inverse=True, return_counts=True)
    weights = (1.0 / g_count[g_index.reshape(-1)]).astype(np.float32)
    order = np.argsort(t_index, kind="stable")  # CSR: the images of each template, row by row
    row_starts = np.zeros(template_ids.size + 1, dtype=np.int64)
    np.cumsum(np.bincount(t_index, minlength=template_ids.size), out=row_starts[1:])
    with warnings.catch_warnings():  # torch says sparse CSR is beta; the product is all we use of it
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        pooling = torch.sparse_csr_tensor(torch.from_numpy(row_starts), torch.from_numpy(order.astype(np.int64)),
                                          torch.from_numpy(weights[order]), (template_ids.size, n),
                                          check_invariants=True)
    pooled = (pooling @ torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))).numpy()
    norms = np.sqrt(np.einsum("ij,ij->i", pooled, pooled))
    pooled /= np.maximum(norms, 1e-12)[:, None]
    return template_ids, pooled


def template_rows(template_ids: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """Rows of ``template_ids`` (sorted, unique) for each pair's two templates, int32 for IJB sizes.

    Ids in a moderate range (IJB's are below 200,000) go through a lookup table, one pass over
    the pairs; others through a binary search. Unknown ids are a DataError naming them.
    """
    pairs = np.asarray(pairs)
    if pairs.size == 0:
        return np.zeros(pairs.shape, dtype=np.int32)
    small = template_ids.size < 2**31
    low = min(int(pairs.min()), int(template_ids[0]))
    high = max(int(pairs.max()), int(template_ids[-1]))
    if high - low < LOOKUP_SPAN:
        table = np.full(high - low + 1, -1, dtype=np.int32 if small else np.int64)
        table[template_ids - low] = np.arange(template_ids.size)
        rows = table[pairs if low == 0 else pairs - low]
        unknown = rows < 0
    else:
        rows = np.minimum(np.searchsorted(template_ids, pairs), template_ids.size - 1)
        unknown = template_ids[rows] != pairs
        rows = rows.astype(np.int32) if small else rows
    if unknown.any():
        missing = np.unique(pairs[unknown])
        shown = ", ".join(str(t) for t in missing[:5]) + (f" and {missing.size - 5} more" if missing.size > 5 else "")
        raise DataError(f"{missing.size} template(s) of the pairs have no images: {shown}")
    return rows


def pair_scores(features: np.ndarray, first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Dot products ``features[first[k]] . features[second[k]]`` for every k, float32.

    Pairs are grouped by blocks of rows of their smaller index. Each block is scored with one matrix
    product against the rows its pairs use in ``second`` when that product costs at most
    GEMM_RATIO dot products per pair (dense protocols such as IJB-C: every template meets
    thousands of others), otherwise by gathering rows in chunks (sparse pair lists).
    """
    first, second = np.asarray(first).reshape(-1), np.asarray(second).reshape(-1)
    # The score is symmetric: with the smaller row first, a block of rows r0.. only meets
    # columns >= r0, which halves the products of a dense pair list.
    first, second = np.minimum(first, second), np.maximum(first, second)
    n_rows = features.shape[0]
    out = np.empty(first.size, dtype=np.float32)
    if first.size == 0:
        return out
    key = first.astype(np.uint16) if n_rows <= 1 << 16 else first  # radix sort for up to 65,536 templates
    order = np.argsort(key, kind="stable")
    bounds = np.r_[0, np.cumsum(np.bincount(first, minlength=n_rows))]  # pairs of row r: order[bounds[r]:bounds[r+1]]
    rows_per_block = max(1, min(n_rows, BLOCK_BYTES // (4 * n_rows)))
    used = np.zeros(n_rows, dtype=bool)
    column_of = np.empty(n_rows, dtype=np.int64)
    for r0 in range(0, n_rows, rows_per_block):
        r1 = min(r0 + rows_per_block, n_rows)
        sel = order[bounds[r0] : bounds[r1]]
        if sel.size == 0:
            continue
        a, b = first[sel], second[sel]
        used[:] = False
        used[b] = True
        columns = np.flatnonzero(used)
        if (r1 - r0) * columns.size <= GEMM_RATIO * sel.size:
            column_of[columns] = np.arange(columns.size)
            others = features if columns.size == n_rows else features[columns]
            block = features[r0:r1] @ others.T
            out[sel] = block[a - r0, column_of[b]]
        else:
            for c in range(0, sel.size, GATHER_CHUNK):
                aa, bb = a[c : c + GATHER_CHUNK], b[c : c + GATHER_CHUNK]
                out[sel[c : c + GATHER_CHUNK]] = np.einsum("ij,ij->i", features[aa], features[bb])
    return out


def published_points(roc: RocCurve, negatives: int, positives: int) -> np.ndarray:
    """Indices of the ROC points that scikit-learn's ``roc_curve`` keeps by default (``drop_intermediate``).

    Of the points at each distinct score it keeps the first, the last, and those where the
    step in false or true positives changes (a non-zero second difference of the counts);
    (0, 0) is always kept. The published IJB tables read TAR from this thinned curve.
    """
    fps = np.rint(roc.fpr[1:] * negatives)  # the counts back, exactly (fpr = fps / negatives)
    tps = np.rint(roc.tpr[1:] * positives)
    if fps.size <= 2:
        return np.arange(roc.fpr.size)
    bends = (np.diff(fps, 2) != 0) | (np.diff(tps, 2) != 0)
    return np.r_[0, 1 + np.flatnonzero(np.r_[True, bends, True])]


def tar_at_far(roc: RocCurve, targets: Sequence[float], *, negatives: int, positives: int) -> dict[str, list[float]]:
    """TAR at each FAR target in both readings, and the FPR of the point the published reading used.

    ``tar`` (published convention, InsightFace's IJB script): among the points scikit-learn's
    ``roc_curve`` keeps (:func:`published_points`), the one whose FPR is nearest the target,
    the largest TPR among equally near ones; its FPR, ``fpr``, may lie above the target.
    ``tar_strict``: the largest TPR with FPR <= target on the full curve. ``negatives`` and
    ``positives`` are the pair counts behind the curve.
    """
    kept = published_points(roc, negatives, positives)
    fpr, tpr = roc.fpr[kept], roc.tpr[kept]
    tar, used, strict = [], [], []
    for t in targets:
        # fpr rises: the nearest values are the neighbours of t; the right one wins a tie, and
        # the last point with the chosen FPR has the largest TPR
        right = min(int(np.searchsorted(fpr, t, side="left")), fpr.size - 1)
        left = max(right - 1, 0)
        chosen = fpr[right] if abs(fpr[right] - t) <= abs(fpr[left] - t) else fpr[left]
        i = int(np.searchsorted(fpr, chosen, side="right")) - 1
        tar.append(float(tpr[i]))
        used.append(float(fpr[i]))
        strict.append(float(roc.tpr[int(np.searchsorted(roc.fpr, t, side="right")) - 1]))
    return {"tar": tar, "fpr": used, "tar_strict": strict}


def far_label(target: float) -> str:
    """``1e-04`` for 0.0001: the spelling of FAR targets in result keys and tables."""
    return f"{target:.0e}" if float(f"{target:.0e}") == target else f"{target:g}"


@dataclass
class IJBResult:
    """The numbers of one template-set evaluation, plus the arrays to audit them."""

    name: str
    targets: list[float]
    tar: list[float]
    fpr: list[float]
    tar_strict: list[float]
    auc: float
    images: int
    templates: int
    pairs: int
    genuine: int
    roc: RocCurve
    template_ids: np.ndarray
    template_features: np.ndarray
    scores: np.ndarray
    seconds: dict[str, float] = field(default_factory=dict)

    def results(self) -> dict[str, float]:
        """Flat numbers: ``tar@far=1e-04`` (nearest FPR), ``tar@far<=1e-04`` (strict), ``fpr@far=1e-04``, ``auc``."""
        out: dict[str, float] = {}
        for t, v in zip(self.targets, self.tar):
            out[f"tar@far={far_label(t)}"] = v
        for t, v in zip(self.targets, self.tar_strict):
            out[f"tar@far<={far_label(t)}"] = v
        for t, v in zip(self.targets, self.fpr):
            out[f"fpr@far={far_label(t)}"] = v
        out["auc"] = self.auc
        return out


def evaluate_templates(
    features: np.ndarray,
    data: TemplateSet,
    *,
    targets: Sequence[float] = FAR_TARGETS,
    norm_score: bool = True,
    detector_score: bool = True,
) -> IJBResult:
    """Run steps 2-5 of the protocol on image features (float32 (N, D), modified in place)."""
    seconds = {}
    start = time.perf_counter()
    if features.shape[0] != data.templates.size:
        raise DataError(f"{features.shape[0]} image features for {data.templates.size} images of {data.name}")
    features = weight_features(features, data.scores, norm_score=norm_score, detector_score=detector_score)
    template_ids, template_features = pool_templates(features, data.templates, data.medias)
    seconds["pool"] = time.perf_counter() - start
    start = time.perf_counter()
    rows = template_rows(template_ids, data.pairs)
    scores = pair_scores(template_features, rows[:, 0], rows[:, 1])
    seconds["score"] = time.perf_counter() - start
    start = time.perf_counter()
    roc = roc_from_scores(scores, data.labels, check_finite=True)
    genuine = int(data.labels.sum())
    read = tar_at_far(roc, targets, negatives=data.labels.size - genuine, positives=genuine)
    auc = roc_auc(roc)
    seconds["roc"] = time.perf_counter() - start
    return IJBResult(
        name=data.name, targets=[float(t) for t in targets], tar=read["tar"], fpr=read["fpr"],
        tar_strict=read["tar_strict"], auc=auc if math.isfinite(auc) else math.nan,
        images=int(features.shape[0]), templates=int(template_ids.size), pairs=int(scores.size),
        genuine=genuine, roc=roc, template_ids=template_ids,
        template_features=template_features, scores=scores, seconds=seconds,
    )


def save_arrays(folder: str | os.PathLike, name: str, arrays: dict[str, np.ndarray]) -> list[str]:
    """Write ``{key: array}`` as ``folder/<name>_<key>.npy`` (name lower-cased); returns the paths."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for key, array in arrays.items():
        path = out / f"{name.lower()}_{key}.npy"
        np.save(path, array)
        paths.append(str(path))
    return paths


__all__ = [
    "FAR_TARGETS",
    "IJBResult",
    "TemplateSet",
    "embed_images",
    "evaluate_templates",
    "far_label",
    "pair_scores",
    "pool_templates",
    "published_points",
    "save_arrays",
    "tar_at_far",
    "template_rows",
    "weight_features",
]

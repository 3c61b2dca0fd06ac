"""Verification on pair sets: embed images (and their mirrors), then score them with metric plugins.

Used by ``facecore eval`` and by the trainer's validation, so both report the same numbers.
NumPy only at import time; torch is imported inside the functions that need it.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple, Sequence

import numpy as np

from ..core import runtime
from ..errors import CheckpointError, ConfigError, DataError

Metric = Callable[[np.ndarray, np.ndarray], dict]

# Pairs per chunk when computing distances: bounds the float64 temporaries (~70 MB at D=512).
_CHUNK = 1 << 14

_DEVICE_NAME = re.compile(r"^(auto|cpu|cuda(:[0-9]+)?)$")


def resolve_device(name: str) -> Any:
    """``auto`` -> cuda when available, else cpu; ``cuda`` without CUDA or an unknown name is a clear error."""
    if not isinstance(name, str) or not _DEVICE_NAME.match(name):
        raise ConfigError([f"device '{name}' is not one of auto, cpu, cuda, cuda:N"])
    return runtime.resolve_device(name)


class RocCurve(NamedTuple):
    """ROC points of cosine similarity, from (0, 0) to (1, 1); ``thresholds[i]`` gives point i.

    A pair is predicted "same" when its score is >= the threshold (the first one is +inf).
    """

    fpr: np.ndarray
    tpr: np.ndarray
    thresholds: np.ndarray


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Rows of ``x`` divided by their L2 norm (zero rows stay zero)."""
    x = np.asarray(x)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, eps)


def split_pairs(embeddings: np.ndarray, issame: Sequence[bool] | np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(first images, second images, issame)`` of embeddings (2N, D) in pair order; checks the shapes."""
    emb = np.asarray(embeddings)
    same = np.asarray(issame, dtype=bool).reshape(-1)
    if emb.ndim != 2 or emb.shape[0] != 2 * same.shape[0]:
        raise DataError(
            f"a pair set needs 2 embeddings per pair: got embeddings of shape {emb.shape} for "
            f"{same.shape[0]} issame labels (expected ({2 * same.shape[0]}, D))"
        )
    return emb[0::2], emb[1::2], same


def pair_squared_distances(embeddings: np.ndarray, issame: Sequence[bool] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Squared L2 distance (float64) between the two images of each pair, and issame as bool."""
    a, b, same = split_pairs(embeddings, issame)
    out = np.empty(a.shape[0], dtype=np.float64)
    for i in range(0, a.shape[0], _CHUNK):
        diff = a[i : i + _CHUNK].astype(np.float64) - b[i : i + _CHUNK]
        out[i : i + _CHUNK] = np.einsum("ij,ij->i", diff, diff)
    return out, same


def pair_cosine(embeddings: np.ndarray, issame: Sequence[bool] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cosine similarity (float64 dot product of the normalized embeddings) per pair, and issame."""
    a, b, same = split_pairs(embeddings, issame)
    out = np.empty(a.shape[0], dtype=np.float64)
    for i in range(0, a.shape[0], _CHUNK):
        out[i : i + _CHUNK] = np.einsum("ij,ij->i", a[i : i + _CHUNK].astype(np.float64), b[i : i + _CHUNK])
    return out, same


def roc_from_scores(scores: np.ndarray, issame: np.ndarray, *, check_finite: bool = False) -> RocCurve:
    """ROC of pair scores (higher = more alike) with one point per distinct score; needs both classes.

    Two sorts instead of an argsort, so IJB-C's 15.7M pairs take seconds: all scores and the
    genuine pairs' scores are sorted separately, and the counts at or above each distinct score
    come from positions. Float32 scores stay float32 (no copy); thresholds are float64.
    ``check_finite``: NaN or infinite scores are a DataError (the model's embeddings are not finite).
    """
    scores = np.asarray(scores).reshape(-1)
    if not np.issubdtype(scores.dtype, np.floating):
        scores = scores.astype(np.float64)
    same = np.asarray(issame, dtype=bool).reshape(-1)
    if scores.size != same.size:
        raise DataError(f"{scores.size} scores but {same.size} labels")
    if check_finite and not np.isfinite(scores).all():
        raise DataError("some pair scores are NaN or infinite: the model's embeddings are not finite")
    n_pos = int(same.sum())
    n_neg = same.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise DataError(
            f"an ROC needs both same and different pairs; this set has {n_pos} same and {n_neg} different"
        )
    ordered = np.sort(scores)
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])  # first position of each distinct score
    values = ordered[starts][::-1]  # distinct scores, descending: the ROC's thresholds
    del ordered
    fps = scores.size - starts[::-1]  # pairs scoring >= each threshold (fps once tps are taken off)
    del starts
    tps = n_pos - np.searchsorted(np.sort(scores[same]), values, side="left")
    fps -= tps
    fpr = np.empty(fps.size + 1)
    fpr[0] = 0.0
    np.divide(fps, n_neg, out=fpr[1:])
    del fps
    tpr = np.empty(tps.size + 1)
    tpr[0] = 0.0
    np.divide(tps, n_pos, out=tpr[1:])
    del tps
    return RocCurve(fpr=fpr, tpr=tpr, thresholds=np.r_[np.inf, values.astype(np.float64)])


def roc_curve_points(embeddings: np.ndarray, issame: Sequence[bool] | np.ndarray) -> RocCurve:
    """ROC of cosine similarity over all pairs of L2-normalized embeddings (2N, D) in pair order."""
    scores, same = pair_cosine(embeddings, issame)
    return roc_from_scores(scores, same)


def roc_auc(roc: RocCurve) -> float:
    """Trapezoidal area under the ROC (ties between scores count as half, as in Mann-Whitney U)."""
    return float(np.sum(np.diff(roc.fpr) * (roc.tpr[1:] + roc.tpr[:-1]) / 2))


def equal_error_rate(roc: RocCurve) -> float:
    """FPR where FPR = 1 - TPR, interpolated linearly along the ROC segment that crosses it."""
    gap = roc.fpr + roc.tpr - 1  # strictly increasing from -1 at (0, 0) to 1 at (1, 1)
    i = int(np.searchsorted(gap, 0.0, side="left"))
    if gap[i] == 0:
        return float(roc.fpr[i])
    w = -gap[i - 1] / (gap[i] - gap[i - 1])
    return float(roc.fpr[i - 1] + w * (roc.fpr[i] - roc.fpr[i - 1]))


def embedding_batches(
    backbone: Any,
    dataset: Any,
    batch_size: int,
    device: Any,
    *,
    flip: bool = True,
    num_workers: int = 0,
    progress: bool = False,
    what: str = "pair set",
) -> Iterator[tuple[Any, Any]]:
    """The one embedding pass of evaluation: ``(f(x), f(mirror of x) or None)`` per batch, float32 on ``device``.

    ``backbone`` is a torch module already on ``device``, or any callable from a float batch to
    embeddings, such as an ONNX Runtime model (:class:`~facecore.eval.onnx_runtime.OnnxModel`).

    Items are images, ``(image, label)``, or ``(image, problem)`` where ``problem`` is "" or a message
    about an image that could not be read (a DataLoader worker cannot raise a clean error, so the
    first problem is raised here as a DataError). Images may be uint8 (normalized on ``device`` with
    :func:`~facecore.data.images.model_input`, the trainer's arithmetic) or float in [-1, 1].
    A torch module runs in eval mode under no_grad and gets its previous train/eval mode back
    afterwards (the trainer calls this mid-training).
    """
    import torch
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    from ..data.images import model_input

    device = torch.device(device)
    source = f"the {what} '{getattr(dataset, 'name', None) or type(dataset).__name__}'"
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        pin_memory=device.type == "cuda")
    if num_workers > 0:
        runtime.collect_before_fork()
    module = backbone if isinstance(backbone, torch.nn.Module) else None
    was_training = module is not None and module.training
    if module is not None:
        module.eval()
    bar = tqdm(total=len(dataset), unit="img", desc="embed", leave=False,
               disable=not progress or not sys.stderr.isatty())
    seen = 0
    try:
        with torch.no_grad():
            for batch in loader:
                images, second = (batch[0], batch[1]) if isinstance(batch, (list, tuple)) else (batch, None)
                problems = [p for p in second if p] if isinstance(second, (list, tuple)) else []
                if problems:
                    more = f" (and {len(problems) - 1} more in the same batch)" if len(problems) > 1 else ""
                    raise DataError(f"{problems[0]}{more}")
                images = model_input(images.to(device, non_blocking=True), source)
                n = images.shape[0]
                feats = backbone(torch.cat([images, torch.flip(images, dims=[3])]) if flip else images).float()
                yield (feats[:n], feats[n:]) if flip else (feats, None)
                seen += n
                bar.update(n)
    finally:
        bar.close()
        if module is not None:
            module.train(was_training)
    if not seen:
        name = getattr(dataset, "name", None)
        raise DataError(f"the {what} '{name}' has no images" if name else f"the {what} has no images")


def embed(
    backbone: Any,
    dataset: Any,
    batch_size: int,
    device: Any,
    progress: bool = False,
    num_workers: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings (N, D) float32 of every image of ``dataset`` and of its horizontal mirror, in order."""
    plain, mirrored = [], []
    for a, b in embedding_batches(backbone, dataset, batch_size, device, progress=progress, num_workers=num_workers):
        plain.append(a.cpu().numpy())
        mirrored.append(b.cpu().numpy())
    return np.concatenate(plain), np.concatenate(mirrored)


def evaluate_embeddings(
    embeddings: np.ndarray,
    flipped: np.ndarray | None,
    issame: Sequence[bool] | np.ndarray,
    metrics: Sequence[tuple[str, Metric]],
) -> dict[str, float]:
    """Run each metric on normalize(E + E_flip) when its ``flip`` is true, else on normalize(E)."""
    cache: dict[bool, np.ndarray] = {}
    results: dict[str, float] = {}
    for _name, metric in metrics:
        use_flip = bool(getattr(metric, "flip", True)) and flipped is not None
        if use_flip not in cache:
            cache[use_flip] = l2_normalize(embeddings + flipped if use_flip else embeddings)
        results.update({k: float(v) for k, v in metric(cache[use_flip], issame).items()})
    return results


def evaluate_pair_set(
    backbone: Any,
    dataset: Any,
    metrics: Sequence[tuple[str, Metric]],
    batch_size: int,
    device: Any,
    progress: bool = False,
    num_workers: int = 0,
) -> dict[str, float]:
    """Embed a pair set (with mirrors) and return the merged results of all ``metrics``."""
    plain, mirrored = embed(backbone, dataset, batch_size, device, progress=progress, num_workers=num_workers)
    return evaluate_embeddings(plain, mirrored, dataset.issame, metrics)


def load_trained_backbone(
    checkpoint_path: str | Path,
    config_path: str | Path | None = None,
    overrides: Sequence[str] = (),
    loaded: Any = None,
) -> tuple[Any, dict, Any]:
    """``(backbone, effective config, loaded checkpoint)`` for eval, predict, export and clean.

    The config comes from ``config_path`` when given, else from the checkpoint (facecore
    checkpoints store it); a bare state dict (InsightFace ``backbone.pth``) needs a config file.
    ``loaded``: the file already loaded by the caller (so it is read once), else it is loaded here.
    """
    from ..core.build import build_backbone
    from ..core.checkpoint import is_facecore_checkpoint, load_checkpoint
    from ..core.pretrained import load_backbone
    from ..core.config import apply_overrides, load_config, validate_config

    obj = load_checkpoint(checkpoint_path) if loaded is None else loaded
    if config_path is not None:
        config = load_config(str(config_path), list(overrides))
    elif is_facecore_checkpoint(obj) and isinstance(obj.get("config"), dict):
        config = validate_config(apply_overrides(obj["config"], overrides), f"{checkpoint_path} (stored config)")
    else:
        raise CheckpointError(
            f"{checkpoint_path} holds no facecore config (a bare state dict such as InsightFace's "
            "backbone.pth): pass --config with the model section that matches it"
        )
    backbone = build_backbone(config)
    load_backbone(backbone, obj, checkpoint_path, config["model"]["backbone"])
    backbone.eval()
    return backbone, config, obj


__all__ = [
    "RocCurve",
    "embed",
    "embedding_batches",
    "equal_error_rate",
    "evaluate_embeddings",
    "evaluate_pair_set",
    "l2_normalize",
    "load_trained_backbone",
    "pair_cosine",
    "pair_squared_distances",
    "resolve_device",
    "roc_auc",
    "roc_curve_points",
    "roc_from_scores",
    "split_pairs",
]

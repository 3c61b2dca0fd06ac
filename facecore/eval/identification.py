"""1:N identification: exact top-k search in bounded memory, and the open-set threshold.

Both evaluation (``facecore eval`` on IJB 1:N or on folder galleries) and deployment
(``facecore identify``) search with :func:`search_topk`, so the ranks a user sees in use are the
ranks the evaluation measured. Conventions (docs/identification.md):

- A score is the dot product of L2-normalized rows: the cosine.
- Ranks are by score, highest first; equal scores are ordered by the lower gallery index.
- A search is an alarm at threshold ``t`` when its top score is strictly above ``t`` (``>``).
  FPIR(t) is the share of non-mated searches that alarm; :func:`open_set_threshold` returns
  the lowest observed score ``t`` with FPIR(t) <= the target.
"""

from __future__ import annotations

import math

import numpy as np
import torch

BLOCK_BYTES = 256 << 20  # the largest probe-block x gallery-chunk score matrix, float32


def _sorted_by_score(scores: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row ordered by score descending, ties by index ascending (two stable sorts)."""
    order = torch.argsort(indices, dim=1, stable=True)
    scores, indices = scores.gather(1, order), indices.gather(1, order)
    order = torch.argsort(scores, dim=1, descending=True, stable=True)
    return scores.gather(1, order), indices.gather(1, order)


def _chunk_topk(block: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top k of each row of a score block with the lowest indices among ties at the k-th score.

    ``torch.topk`` picks any of the tied values at the boundary; rows where more than k scores
    reach the k-th value (duplicate gallery rows, exact ties) are redone with a stable sort.
    """
    values, indices = torch.topk(block, k, dim=1, largest=True, sorted=False)
    kth = values.min(dim=1, keepdim=True).values
    tied = (block >= kth).sum(dim=1) > k
    if bool(tied.any()):
        rows = torch.nonzero(tied).reshape(-1)
        order = torch.argsort(block[rows], dim=1, descending=True, stable=True)[:, :k]
        values[rows] = block[rows].gather(1, order)
        indices[rows] = order
    return _sorted_by_score(values, indices)


def search_topk(
    probes: torch.Tensor, gallery: torch.Tensor, k: int, chunk: int = 65536
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact cosine top-k of each probe over the gallery: ``(scores [P, k], indices [P, k] int64)``.

    Rows are expected L2-normalized (the score is their dot product). Rows of the result are
    sorted by score descending, ties broken by the lower gallery index; ``k`` is clipped to the
    gallery size. The gallery is scanned ``chunk`` rows at a time and the probes in blocks, so
    the working memory is one block x chunk score matrix (at most BLOCK_BYTES) beside the inputs,
    whatever the gallery size. Scores come back in the probes' float dtype on their device.
    """
    if probes.ndim != 2 or gallery.ndim != 2:
        raise ValueError(f"probes and gallery must be 2-D; got shapes {tuple(probes.shape)} and {tuple(gallery.shape)}")
    if probes.shape[1] != gallery.shape[1]:
        raise ValueError(f"probes have dimension {probes.shape[1]} but the gallery {gallery.shape[1]}")
    if not probes.is_floating_point():
        raise ValueError(f"probes must be floating point; got {probes.dtype}")
    if chunk < 1:
        raise ValueError(f"chunk must be positive; got {chunk}")
    k = max(0, min(int(k), gallery.shape[0]))
    n_probes, device, dtype = probes.shape[0], probes.device, probes.dtype
    best_scores = torch.empty((n_probes, k), dtype=dtype, device=device)
    best_indices = torch.empty((n_probes, k), dtype=torch.int64, device=device)
    if k == 0 or n_probes == 0:
        return best_scores, best_indices
    chunk = min(chunk, gallery.shape[0])
    block = max(1, min(n_probes, BLOCK_BYTES // (4 * chunk)))
    for p0 in range(0, n_probes, block):
        p = probes[p0 : p0 + block]
        scores = indices = None
        for g0 in range(0, gallery.shape[0], chunk):
            part = gallery[g0 : g0 + chunk].to(device=device, dtype=dtype)
            s, i = _chunk_topk(p @ part.T, min(k, part.shape[0]))
            i += g0
            if scores is None:
                scores, indices = s, i
                continue
            # Both lists are ordered (score desc, index asc) and every index so far is below g0, so a
            # stable sort by score of [kept, new] keeps that order; the first k are the top k.
            scores, indices = torch.cat([scores, s], dim=1), torch.cat([indices, i], dim=1)
            order = torch.argsort(scores, dim=1, descending=True, stable=True)[:, :k]
            scores, indices = scores.gather(1, order), indices.gather(1, order)
        best_scores[p0 : p0 + block] = scores
        best_indices[p0 : p0 + block] = indices
    return best_scores, best_indices


def open_set_threshold(nonmated_top_scores: torch.Tensor | np.ndarray, fpir: float) -> float | None:
    """The lowest threshold ``t`` (an observed score) with FPIR(t) <= ``fpir``, or None when not measurable.

    FPIR(t) is the share of non-mated searches whose top score is strictly above ``t`` (``>``; a
    score equal to ``t`` is not an alarm). With the scores sorted descending, ``t`` is the
    (m+1)-th score, m = floor(fpir * N): no lower threshold keeps FPIR within the target. When
    ``fpir < 1 / N`` (or there are no non-mated searches) the data cannot tell that FPIR from 0,
    and the result is None; ``fpir >= 1`` gives ``-inf`` (everything may alarm).
    """
    if not fpir > 0:
        raise ValueError(f"fpir must be positive; got {fpir}")
    if isinstance(nonmated_top_scores, torch.Tensor):
        values = nonmated_top_scores.detach().to("cpu", torch.float64).numpy().reshape(-1)
    else:
        values = np.asarray(nonmated_top_scores, dtype=np.float64).reshape(-1)
    n = values.size
    if n == 0 or fpir * n < 1 - 1e-9:
        return None
    if not np.isfinite(values).all():
        raise ValueError("non-mated top scores must be finite")
    m = int(math.floor(fpir * n + 1e-9))  # 1e-9: 1e-3 * 1000 must give 1, not 0.999...
    if m >= n:
        return -math.inf
    return float(np.partition(-values, m)[m] * -1)


__all__ = ["open_set_threshold", "search_topk"]

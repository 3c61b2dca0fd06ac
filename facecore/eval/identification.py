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
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

BLOCK_BYTES = 256 << 20  # the largest probe-block x gallery-chunk score matrix, float32
NO_IDENTITY = -1  # the identity of gallery rows that belong to nobody in the probe set (distractors)


def _sorted_by_score(scores: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row ordered by score descending, ties by index ascending (two stable sorts)."""
    order = torch.argsort(indices, dim=1, stable=True)
    scores, indices = scores.gather(1, order), indices.gather(1, order)
    order = torch.argsort(scores, dim=1, descending=True, stable=True)
    return scores.gather(1, order), indices.gather(1, order)


def _chunk_topk(block: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top k of each row of a score block with the lowest indices among ties at the k-th score.

    ``torch.topk`` picks any of the tied values at the boundary. One more value than needed
    tells where that can happen (the (k+1)-th equals the k-th); only those rows are redone
    with a stable sort, so the common case costs one topk.
    """
    extra = 1 if block.shape[1] > k else 0
    values, indices = torch.topk(block, k + extra, dim=1, largest=True, sorted=True)
    if extra:
        tied = values[:, k - 1] == values[:, k]
        values, indices = values[:, :k].clone(), indices[:, :k].clone()
        if bool(tied.any()):
            rows = torch.nonzero(tied).reshape(-1)
            order = torch.argsort(block[rows], dim=1, descending=True, stable=True)[:, :k]
            values[rows] = block[rows].gather(1, order)
            indices[rows] = order
    return _sorted_by_score(values, indices)


def _top_values(kept: torch.Tensor, block: torch.Tensor, count: int, per_row: int = 16) -> torch.Tensor:
    """The ``count`` largest finite values of ``kept`` (descending) and of every entry of ``block``.

    A flat topk over a 1024 x 65536 block is slow (single-threaded), so each row gives its
    top ``per_row`` first; those lift a lower bound ``tau`` of the final count-th value, and only
    rows whose ``per_row``-th value is still above ``tau`` can hold more: those rows give every
    value above ``tau``. Exact, whatever the data.
    """
    c = min(per_row, block.shape[1])
    tops = torch.topk(block, c, dim=1, sorted=True).values
    trial = torch.cat([kept, tops.reshape(-1)])
    trial = trial[torch.isfinite(trial)]
    tau = torch.topk(trial, count).values[-1] if trial.numel() >= count else None
    if tau is None:
        more = torch.ones(block.shape[0], dtype=torch.bool, device=block.device)
        pool = block[torch.isfinite(block)]
    else:
        more = tops[:, c - 1] > tau
        pool = tops[~more].reshape(-1)
        pool = torch.cat([pool[pool >= tau], block[more][block[more] > tau]])
    merged = torch.cat([kept, pool])
    merged = merged[torch.isfinite(merged)]
    return torch.topk(merged, min(count, merged.numel())).values


@dataclass
class Search:
    """One probe set searched against one gallery (see :func:`scan`); tensors on the probes' device.

    ``scores``/``indices`` (P, k): the top k, as :func:`search_topk`; ``mate_scores`` (P,): each
    probe's best score over the gallery rows of its own identity (-inf without one) when ids
    were given; ``nonmated_pair_top`` (K,): the K largest scores over all (probe, row of another
    identity) pairs of the probes ``pair_rows`` selects, descending, when asked for.
    """

    scores: torch.Tensor
    indices: torch.Tensor
    mate_scores: torch.Tensor | None = None
    nonmated_pair_top: torch.Tensor | None = None


def _merge(kept: tuple[torch.Tensor, torch.Tensor], new: tuple[torch.Tensor, torch.Tensor],
           k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The top k of two lists ordered (score desc, index asc) whose new indices all exceed the kept ones.

    A stable sort by score of ``[kept, new]`` keeps that order, so its first k are the top k.
    """
    scores, indices = torch.cat([kept[0], new[0]], dim=1), torch.cat([kept[1], new[1]], dim=1)
    order = torch.argsort(scores, dim=1, descending=True, stable=True)[:, :k]
    return scores.gather(1, order), indices.gather(1, order)


def _mate_pairs(probe_ids: np.ndarray, gallery_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every (probe, gallery row) pair of the same identity (rows of NO_IDENTITY belong to nobody)."""
    order = np.argsort(gallery_ids, kind="stable")
    sorted_ids = gallery_ids[order]
    lo = np.searchsorted(sorted_ids, probe_ids, side="left")
    hi = np.searchsorted(sorted_ids, probe_ids, side="right")
    counts = np.where(probe_ids == NO_IDENTITY, 0, hi - lo)
    probes = np.repeat(np.arange(probe_ids.size), counts)
    starts = np.repeat(lo - np.r_[0, np.cumsum(counts)[:-1]], counts)
    return probes, order[np.arange(probes.size) + starts]


def scan(
    probes: torch.Tensor,
    gallery: torch.Tensor,
    k: int,
    *,
    probe_ids: torch.Tensor | np.ndarray | None = None,
    gallery_ids: torch.Tensor | np.ndarray | None = None,
    pair_top: int = 0,
    pair_rows: torch.Tensor | np.ndarray | None = None,
    chunk: int = 65536,
) -> Search:
    """One bounded-memory pass over the gallery: the top k of every probe, and what 1:N metrics need besides.

    With ``probe_ids``/``gallery_ids`` (integer identities; gallery rows without one, such as
    distractors, carry NO_IDENTITY) each probe's best mate score comes along, and with
    ``pair_top`` the largest non-mated pair scores of the probes in ``pair_rows`` (all by
    default). Scores are computed once per (probe block, gallery chunk), so the extra numbers
    cost no second matrix product: mate scores are read from the block, then overwritten with
    -inf for the non-mated pair scores.
    """
    if probes.ndim != 2 or gallery.ndim != 2:
        raise ValueError(f"probes and gallery must be 2-D; got shapes {tuple(probes.shape)} and {tuple(gallery.shape)}")
    if probes.shape[1] != gallery.shape[1]:
        raise ValueError(f"probes have dimension {probes.shape[1]} but the gallery {gallery.shape[1]}")
    if not probes.is_floating_point():
        raise ValueError(f"probes must be floating point; got {probes.dtype}")
    if chunk < 1:
        raise ValueError(f"chunk must be positive; got {chunk}")
    with_ids = probe_ids is not None and gallery_ids is not None
    if pair_top > 0 and not with_ids:
        raise ValueError("pair_top needs probe_ids and gallery_ids")
    n_probes, n_gallery = probes.shape[0], gallery.shape[0]
    device, dtype = probes.device, probes.dtype
    k = max(0, min(int(k), n_gallery))
    best_scores = torch.empty((n_probes, k), dtype=dtype, device=device)
    best_indices = torch.empty((n_probes, k), dtype=torch.int64, device=device)
    mates = torch.full((n_probes,), -math.inf, dtype=dtype, device=device) if with_ids else None
    pairs = torch.empty(0, dtype=dtype, device=device) if pair_top > 0 else None
    skip_rows = None
    if with_ids:
        probe_ids = np.asarray(probe_ids.cpu() if isinstance(probe_ids, torch.Tensor) else probe_ids).reshape(-1)
        gallery_ids = np.asarray(gallery_ids.cpu() if isinstance(gallery_ids, torch.Tensor) else gallery_ids).reshape(-1)
        if probe_ids.size != n_probes or gallery_ids.size != n_gallery:
            raise ValueError(f"{probe_ids.size} probe ids for {n_probes} probes, "
                             f"{gallery_ids.size} gallery ids for {n_gallery} rows")
        mate_p, mate_g = _mate_pairs(probe_ids.astype(np.int64), gallery_ids.astype(np.int64))
        if pair_top > 0 and pair_rows is not None:
            skip_rows = torch.as_tensor(~np.asarray(pair_rows, dtype=bool).reshape(-1), device=device)
    if n_probes == 0 or n_gallery == 0:
        return Search(best_scores, best_indices, mates, pairs)
    chunk = min(chunk, n_gallery)
    block = max(1, min(n_probes, BLOCK_BYTES // (4 * chunk)))
    for p0 in range(0, n_probes, block):
        p1 = min(p0 + block, n_probes)
        p = probes[p0:p1]
        if with_ids:
            in_block = (mate_p >= p0) & (mate_p < p1)
            block_p, block_g = mate_p[in_block], mate_g[in_block]
        kept = None
        for g0 in range(0, n_gallery, chunk):
            part = gallery[g0 : g0 + chunk].to(device=device, dtype=dtype)
            scores = p @ part.T
            if k:
                s, i = _chunk_topk(scores, min(k, part.shape[0]))
                i += g0
                kept = (s, i) if kept is None else _merge(kept, (s, i), k)
            if not with_ids:
                continue
            here = (block_g >= g0) & (block_g < g0 + part.shape[0])
            rows = torch.as_tensor(block_p[here] - p0, device=device)
            cols = torch.as_tensor(block_g[here] - g0, device=device)
            if rows.numel():
                mates[p0:p1] = mates[p0:p1].scatter_reduce(0, rows, scores[rows, cols], reduce="amax")
            if pairs is not None:
                scores[rows, cols] = -math.inf  # the block is done for ranks: keep only non-mated pairs
                if skip_rows is not None:
                    scores[skip_rows[p0:p1]] = -math.inf
                pairs = _top_values(pairs, scores, pair_top)
        if k:
            best_scores[p0:p1], best_indices[p0:p1] = kept
    return Search(best_scores, best_indices, mates, pairs)


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
    found = scan(probes, gallery, k, chunk=chunk)
    return found.scores, found.indices


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




# --- metrics ---------------------------------------------------------------------------------

RANKS = (1, 5, 10, 20)
FPIR_TARGETS = (1e-4, 1e-3, 1e-2, 1e-1)


def first_mate_ranks(indices: torch.Tensor | np.ndarray, probe_ids: np.ndarray, gallery_ids: np.ndarray) -> np.ndarray:
    """Per probe, the 1-based position of the first row of its own identity in its top k; 0 when none is there."""
    indices = np.asarray(indices.cpu() if isinstance(indices, torch.Tensor) else indices)
    if indices.shape[1] == 0:
        return np.zeros(indices.shape[0], dtype=np.int64)
    hit = np.asarray(gallery_ids)[indices] == np.asarray(probe_ids)[:, None]
    return np.where(hit.any(axis=1), hit.argmax(axis=1) + 1, 0)


def cmc(ranks: np.ndarray, depth: int) -> np.ndarray:
    """Cumulative match characteristic: share of probes whose first mate is within rank r, r = 1..depth."""
    if ranks.size == 0:
        return np.full(depth, math.nan)
    counts = np.bincount(ranks[ranks > 0], minlength=depth + 1)[1 : depth + 1]
    return np.cumsum(counts) / ranks.size


def _at_ranks(curve: np.ndarray, ranks: Sequence[int]) -> dict[int, float]:
    """CMC values at the given ranks; a rank past the curve (a gallery smaller than it) reads its end."""
    return {r: float(curve[min(r, curve.size) - 1]) if curve.size else math.nan for r in ranks}


@dataclass
class OpenSet:
    """Open-set identification against one gallery (mated probes: identity in the gallery; the others non-mated).

    ``tpir[i]``: share of mated probes whose rank-1 row is a mate scoring above ``thresholds[i]``,
    the threshold of ``fpir_targets[i]`` from the non-mated probes' top scores (None: not
    measurable with this many non-mated probes). ``curve_fpir``/``curve_tpir``: the whole
    trade-off, one point per distinct non-mated top score used as threshold.
    """

    gallery: int
    mated: int
    nonmated: int
    cmc: np.ndarray
    ranks: dict[int, float]
    fpir_targets: list[float]
    tpir: list[float | None]
    thresholds: list[float | None]
    curve_fpir: np.ndarray
    curve_tpir: np.ndarray
    first_mate_rank: np.ndarray  # per mated probe, 0: not in the top k


def open_set(search: Search, probe_ids: np.ndarray, gallery_ids: np.ndarray, *,
             ranks: Sequence[int] = RANKS, fpir_targets: Sequence[float] = FPIR_TARGETS) -> OpenSet:
    """Open-set numbers of one search (the docstring of :class:`OpenSet` and docs/identification.md)."""
    probe_ids, gallery_ids = np.asarray(probe_ids), np.asarray(gallery_ids)
    mated = np.isin(probe_ids, gallery_ids[gallery_ids != NO_IDENTITY])
    top = search.scores[:, 0].double().cpu().numpy() if search.scores.shape[1] else np.full(probe_ids.size, -np.inf)
    first = first_mate_ranks(search.indices.cpu()[torch.from_numpy(mated)], probe_ids[mated], gallery_ids)
    curve = cmc(first, max(ranks))
    hit_scores = np.sort(top[mated][first == 1])  # mated probes whose rank-1 row is a mate
    nonmated = np.sort(top[~mated])[::-1]
    n_mated, n_non = int(mated.sum()), int((~mated).sum())
    tpir, thresholds = [], []
    for target in fpir_targets:
        t = open_set_threshold(nonmated, target)
        thresholds.append(t)
        tpir.append(None if t is None or n_mated == 0 else
                    float((hit_scores.size - np.searchsorted(hit_scores, t, side="right")) / n_mated))
    if n_non and n_mated:
        levels = np.unique(nonmated)[::-1]  # every distinct non-mated top score as a threshold, highest first
        curve_fpir = (n_non - np.searchsorted(nonmated[::-1], levels, side="right")) / n_non
        curve_tpir = (hit_scores.size - np.searchsorted(hit_scores, levels, side="right")) / n_mated
        # and below every non-mated score: everything alarms, TPIR is the rank-1 rate
        curve_fpir, curve_tpir = np.r_[curve_fpir, 1.0], np.r_[curve_tpir, hit_scores.size / n_mated]
    else:
        curve_fpir = curve_tpir = np.zeros(0)
    return OpenSet(gallery=int(gallery_ids.size), mated=n_mated, nonmated=n_non, cmc=curve,
                   ranks=_at_ranks(curve, ranks), fpir_targets=[float(f) for f in fpir_targets], tpir=tpir,
                   thresholds=thresholds, curve_fpir=curve_fpir, curve_tpir=curve_tpir, first_mate_rank=first)


@dataclass
class ClosedSet:
    """The closed-set numbers of the older published tables, on the probes that have a mate in the gallery.

    ``tpir[i]``: share of those probes whose best mate score is above ``thresholds[i]``, the
    ``pair_ranks[i]``-th largest score over all non-mated (probe, gallery row) pairs, with
    ``pair_ranks[i] = ceil(probes x far_targets[i])`` (InsightFace's ijb_1n.py: the "FAR" counts
    per probe, not per non-mated pair, and the mate need not be at rank 1).
    """

    gallery: int
    probes: int
    excluded: int  # probes without a mate in the gallery, left out
    cmc: np.ndarray
    ranks: dict[int, float]
    far_targets: list[float]
    pair_ranks: list[int]
    tpir: list[float | None]
    thresholds: list[float | None]


def closed_set_pair_top(n_mated: int, far_targets: Sequence[float]) -> int:
    """How many of the largest non-mated pair scores :func:`closed_set` reads: ceil(probes x the largest target)."""
    return max((math.ceil(n_mated * f - 1e-9) for f in far_targets), default=0) if n_mated else 0


def closed_set(search: Search, probe_ids: np.ndarray, gallery_ids: np.ndarray, *,
               ranks: Sequence[int] = RANKS, far_targets: Sequence[float] = FPIR_TARGETS) -> ClosedSet:
    """Closed-set numbers of a search made with ids and ``pair_top`` over the mated probes (see :class:`ClosedSet`)."""
    if search.mate_scores is None or search.nonmated_pair_top is None:
        raise ValueError("closed_set needs a scan with probe_ids, gallery_ids and pair_top")
    probe_ids, gallery_ids = np.asarray(probe_ids), np.asarray(gallery_ids)
    mate = search.mate_scores.double().cpu().numpy()
    mated = np.isfinite(mate)
    n = int(mated.sum())
    first = first_mate_ranks(search.indices.cpu()[torch.from_numpy(mated)], probe_ids[mated], gallery_ids)
    curve = cmc(first, max(ranks))
    pairs = search.nonmated_pair_top.double().cpu().numpy()
    tpir, thresholds, pair_ranks = [], [], []
    for far in far_targets:
        kth = math.ceil(n * far - 1e-9)
        pair_ranks.append(kth)
        if n == 0 or kth < 1 or kth > pairs.size:
            tpir.append(None)
            thresholds.append(None)
            continue
        t = float(pairs[kth - 1])
        thresholds.append(t)
        tpir.append(float((mate[mated] > t).mean()))
    return ClosedSet(gallery=int(gallery_ids.size), probes=n, excluded=int((~mated).sum()), cmc=curve,
                     ranks=_at_ranks(curve, ranks), far_targets=[float(f) for f in far_targets],
                     pair_ranks=pair_ranks, tpir=tpir, thresholds=thresholds)


def identify(
    probes: torch.Tensor,
    probe_ids: np.ndarray,
    gallery: torch.Tensor,
    gallery_ids: np.ndarray,
    *,
    open_set_numbers: bool = True,
    closed_set_numbers: bool = True,
    ranks: Sequence[int] = RANKS,
    fpir_targets: Sequence[float] = FPIR_TARGETS,
    chunk: int = 65536,
) -> tuple[Search, OpenSet | None, ClosedSet | None]:
    """Search ``probes`` in ``gallery`` once and compute the open-set and/or closed-set numbers from it."""
    probe_ids, gallery_ids = np.asarray(probe_ids, dtype=np.int64), np.asarray(gallery_ids, dtype=np.int64)
    mated = np.isin(probe_ids, gallery_ids[gallery_ids != NO_IDENTITY])
    pair_top = closed_set_pair_top(int(mated.sum()), fpir_targets) if closed_set_numbers else 0
    found = scan(probes, gallery, max(ranks), probe_ids=probe_ids, gallery_ids=gallery_ids, pair_top=pair_top,
                 pair_rows=mated, chunk=chunk)
    if closed_set_numbers and found.nonmated_pair_top is None:
        found.nonmated_pair_top = torch.empty(0)
    opened = open_set(found, probe_ids, gallery_ids, ranks=ranks, fpir_targets=fpir_targets) if open_set_numbers else None
    closed = closed_set(found, probe_ids, gallery_ids, ranks=ranks, far_targets=fpir_targets) if closed_set_numbers else None
    return found, opened, closed


__all__ = [
    "FPIR_TARGETS",
    "NO_IDENTITY",
    "RANKS",
    "ClosedSet",
    "OpenSet",
    "Search",
    "closed_set",
    "cmc",
    "first_mate_ranks",
    "identify",
    "open_set",
    "open_set_threshold",
    "scan",
    "search_topk",
]

"""1:N search and thresholds: search_topk against a full sort, ties, chunking; open_set_threshold by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from facecore.eval import identification
from facecore.eval.identification import open_set_threshold, search_topk


def unit_rows(n: int, d: int, seed: int) -> torch.Tensor:
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed))
    return x / x.norm(dim=1, keepdim=True)


def reference_topk(probes: torch.Tensor, gallery: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every score, then one stable descending sort per row: ties keep the lower index first."""
    scores = probes @ gallery.T
    order = torch.argsort(scores, dim=1, descending=True, stable=True)[:, :k]
    return scores.gather(1, order), order


# ----------------------------------------------------------------------------- search_topk
@pytest.mark.parametrize("chunk", [4, 64, 65536])
def test_search_topk_matches_a_full_sort_for_any_chunk_and_probe_block(chunk, monkeypatch):
    probes, gallery = unit_rows(37, 16, 0), unit_rows(150, 16, 1)
    monkeypatch.setattr(identification, "BLOCK_BYTES", 4 * 5 * min(chunk, 150))  # probe blocks of 5 rows
    scores, indices = search_topk(probes, gallery, 10, chunk=chunk)
    ref_scores, ref_indices = reference_topk(probes, gallery, 10)
    assert scores.shape == (37, 10) and indices.dtype == torch.int64
    assert torch.equal(indices, ref_indices)
    torch.testing.assert_close(scores, ref_scores, rtol=0, atol=1e-6)


def test_ties_go_to_the_lower_gallery_index_across_chunks():
    base = unit_rows(4, 8, 2)
    # rows 1, 4, 6 and 9 are the same vector: every chunk of 3 holds some of them, and k=3 cuts the tie
    gallery = torch.stack([base[0], base[1], base[2], base[3], base[1], base[2], base[1], base[3], base[0], base[1]])
    probes = base[1:2].clone()
    for chunk in (1, 2, 3, 10):
        scores, indices = search_topk(probes, gallery, 3, chunk=chunk)
        assert indices.tolist() == [[1, 4, 6]], chunk
        assert scores[0, 0] == scores[0, 2]
    # a tie inside one chunk, larger than k, that torch.topk alone may resolve either way
    gallery = torch.cat([unit_rows(5, 8, 3), base[1:2].expand(40, 8), unit_rows(5, 8, 4)])
    _, indices = search_topk(probes, gallery, 4, chunk=64)
    assert indices.tolist() == [[5, 6, 7, 8]]


def test_k_is_clipped_to_the_gallery_and_empty_inputs_give_empty_results():
    probes, gallery = unit_rows(3, 4, 5), unit_rows(2, 4, 6)
    scores, indices = search_topk(probes, gallery, 5)
    assert scores.shape == indices.shape == (3, 2)
    assert search_topk(probes, gallery[:0], 5)[1].shape == (3, 0)
    assert search_topk(probes[:0], gallery, 5)[0].shape == (0, 2)
    with pytest.raises(ValueError, match="dimension"):
        search_topk(probes, unit_rows(2, 5, 0), 1)


# ----------------------------------------------------------------------------- open_set_threshold
def test_open_set_threshold_by_hand():
    # ten non-mated top scores; FPIR(t) counts the scores strictly above t
    top = np.array([0.9, 0.1, 0.5, 0.7, 0.3, 0.8, 0.2, 0.6, 0.4, 0.75])
    assert open_set_threshold(top, 0.1) == 0.8  # only 0.9 is above: FPIR 1/10
    assert open_set_threshold(top, 0.3) == 0.7  # 0.9, 0.8, 0.75 above: 3/10
    assert open_set_threshold(top, 0.25) == 0.75  # floor(2.5) = 2 alarms allowed
    assert open_set_threshold(torch.tensor(top), 0.5) == pytest.approx(0.5)
    assert open_set_threshold(top, 0.09) is None  # below 1/10: not measurable
    assert open_set_threshold(top, 1.0) == -math.inf
    assert open_set_threshold(np.array([]), 0.5) is None
    for fpir in (0.1, 0.2, 0.3, 0.5, 0.9):  # the definition: within the target, and no lower score would be
        t = open_set_threshold(top, fpir)
        assert (top > t).mean() <= fpir
        assert (top >= t).mean() > fpir


def test_open_set_threshold_with_tied_scores_stays_within_the_target():
    top = np.array([0.5, 0.5, 0.5, 0.2])
    t = open_set_threshold(top, 0.5)  # m = 2: the third score, 0.5; nothing is strictly above it
    assert t == 0.5 and (top > t).mean() == 0.0
    assert open_set_threshold(np.full(1000, 0.3), 1e-3) == 0.3


# ----------------------------------------------------------------------------- open and closed set by hand
# Gallery rows are the unit vectors e0, e1, e2 of identities 10, 20, 30, so a probe's scores are its own
# coordinates: the table below is the score matrix.
GALLERY_IDS = np.array([10, 20, 30])
HAND = [  # identity, scores against (10, 20, 30)
    (10, [0.90, 0.40, 0.10]),  # mated, rank 1
    (20, [0.35, 0.88, 0.20]),  # mated, rank 1
    (10, [0.55, 0.60, 0.30]),  # mated, rank 2
    (30, [0.20, 0.10, 0.70]),  # mated, rank 1, top score 0.70
    (99, [0.50, 0.45, 0.10]),  # non-mated, top 0.50
    (98, [0.30, 0.25, 0.70]),  # non-mated, top 0.70: ties with the mated probe above
    (97, [0.20, 0.10, 0.15]),  # non-mated, top 0.20
    (96, [0.80, 0.10, 0.10]),  # non-mated, top 0.80
]


def hand_search(**kw):
    probe_ids = np.array([i for i, _ in HAND])
    probes = torch.tensor([s for _, s in HAND], dtype=torch.float32)
    return probe_ids, identification.identify(probes, probe_ids, torch.eye(3), GALLERY_IDS, ranks=(1, 2, 5), **kw)


def test_open_set_by_hand():
    _, (found, opened, _) = hand_search(fpir_targets=(0.1, 0.25, 0.5, 1.0))
    assert (opened.mated, opened.nonmated, opened.gallery) == (4, 4, 3)
    assert opened.ranks == {1: 0.75, 2: 1.0, 5: 1.0}  # rank 5 > gallery size reads the end of the CMC
    assert opened.first_mate_rank.tolist() == [1, 1, 2, 1]
    # non-mated top scores 0.8, 0.7, 0.5, 0.2. FPIR 0.1 < 1/4: not measurable. FPIR 0.25: one alarm allowed,
    # threshold 0.7, and the mated probe at exactly 0.7 is not above it; FPIR 0.5: threshold 0.5.
    assert opened.thresholds == [None, pytest.approx(0.7), pytest.approx(0.5), -math.inf]
    assert opened.tpir == [None, 0.5, 0.75, 0.75]
    # the curve: every non-mated top score as threshold, then below all of them
    np.testing.assert_allclose(opened.curve_fpir, [0.0, 0.25, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(opened.curve_tpir, [0.5, 0.5, 0.75, 0.75, 0.75])
    assert found.indices[2].tolist()[:2] == [1, 0]


def test_closed_set_by_hand():
    _, (found, _, closed) = hand_search(fpir_targets=(0.1, 0.25, 0.5, 1.0))
    assert (closed.probes, closed.excluded) == (4, 4)  # the non-mated probes are left out
    assert closed.ranks == {1: 0.75, 2: 1.0, 5: 1.0}
    # non-mated pairs of the mated probes: 0.60 0.40 0.35 0.30 0.20 0.20 0.10 0.10; mate scores 0.90 0.88 0.55 0.70
    assert closed.pair_ranks == [1, 1, 2, 4]  # ceil(4 probes x FAR)
    assert closed.thresholds == [pytest.approx(0.6), pytest.approx(0.6), pytest.approx(0.4), pytest.approx(0.3)]
    assert closed.tpir == [0.75, 0.75, 1.0, 1.0]
    assert found.mate_scores.tolist() == pytest.approx([0.9, 0.88, 0.55, 0.7, -math.inf, -math.inf, -math.inf,
                                                        -math.inf])


def brute_force(scores, probe_ids, gallery_ids, fpir, far, depth):
    """The definitions again, probe by probe with Python loops, from a full score matrix."""
    mated_rows = [i for i, p in enumerate(probe_ids) if p in set(gallery_ids[gallery_ids >= 0].tolist())]
    order = [sorted(range(len(gallery_ids)), key=lambda j: (-scores[i, j], j)) for i in range(len(probe_ids))]
    ranks = []
    for i in mated_rows:
        where = [r for r, j in enumerate(order[i][:depth]) if gallery_ids[j] == probe_ids[i]]
        ranks.append(where[0] + 1 if where else 0)
    non = sorted((scores[i, order[i][0]] for i in range(len(probe_ids)) if i not in mated_rows), reverse=True)
    open_tpir = []
    for f in fpir:
        candidates = [t for t in non if sum(s > t for s in non) <= f * len(non)]
        if f * len(non) < 1:
            open_tpir.append(None)
            continue
        t = min(candidates)
        open_tpir.append(sum(1 for i, r in zip(mated_rows, ranks) if r == 1 and scores[i, order[i][0]] > t)
                         / len(mated_rows))
    pair = sorted((scores[i, j] for i in mated_rows for j in range(len(gallery_ids))
                   if gallery_ids[j] != probe_ids[i]), reverse=True)
    mate = [max(scores[i, j] for j in range(len(gallery_ids)) if gallery_ids[j] == probe_ids[i]) for i in mated_rows]
    closed_tpir = [sum(m > pair[math.ceil(len(mated_rows) * f) - 1] for m in mate) / len(mate) for f in far]
    return ranks, open_tpir, closed_tpir


@pytest.mark.parametrize("chunk", [16, 64])
def test_open_and_closed_set_equal_a_brute_force_on_random_data_with_distractors(chunk, monkeypatch):
    monkeypatch.setattr(identification, "BLOCK_BYTES", 4 * 7 * chunk)  # probe blocks of 7 rows
    rng = np.random.default_rng(0)
    gallery_ids = np.r_[rng.integers(0, 12, 40), np.full(25, identification.NO_IDENTITY)]  # several rows per id
    probe_ids = rng.integers(0, 18, 60)  # ids 12..17 are in no gallery row
    gallery = unit_rows(65, 6, 7)
    probes = unit_rows(60, 6, 8)
    fpir = (0.05, 0.1, 0.3)
    _, opened, closed = identification.identify(probes, probe_ids, gallery, gallery_ids, ranks=(1, 3, 10),
                                                fpir_targets=fpir, chunk=chunk)
    ranks, open_tpir, closed_tpir = brute_force((probes @ gallery.T).numpy(), probe_ids, gallery_ids, fpir, fpir, 10)
    assert opened.first_mate_rank.tolist() == ranks
    assert opened.ranks[3] == pytest.approx(np.mean([0 < r <= 3 for r in ranks]))
    assert opened.tpir == [pytest.approx(v) if v is not None else None for v in open_tpir]
    assert closed.tpir == pytest.approx(closed_tpir)
    assert opened.nonmated == int((probe_ids >= 12).sum()) and opened.nonmated > 0


@pytest.mark.parametrize("rows, cols, count, per_row", [(9, 40, 5, 4), (9, 40, 60, 2), (3, 5, 200, 16), (50, 30, 7, 1)])
def test_top_values_of_a_block_equal_a_full_sort(rows, cols, count, per_row):
    rng = np.random.default_rng(rows + count)
    block = torch.tensor(rng.integers(0, 12, (rows, cols)), dtype=torch.float32)  # many ties
    block[rng.random((rows, cols)) < 0.2] = -math.inf  # masked pairs
    kept = torch.tensor(np.sort(rng.integers(0, 12, 6))[::-1].copy(), dtype=torch.float32)
    got = identification._top_values(kept, block.clone(), count, per_row=per_row)
    every = torch.cat([kept, block[torch.isfinite(block)]])
    assert got.tolist() == torch.sort(every, descending=True).values[:count].tolist()

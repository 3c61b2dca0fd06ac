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

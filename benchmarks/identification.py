"""Speed and memory of 1:N search after embedding: IJB-C 1:N at its real sizes, and 10,000 probes in 1,000,000.

    .venv/bin/python benchmarks/identification.py [--probes 10000] [--gallery 1000000] [--dim 512]
                                                  [--chunk 65536] [--eval] [--skip-large]

1. IJB-C 1:N (19,593 probe templates; galleries G1 1,772 and G2 1,759 templates; random unit
   template features, every probe's subject in one gallery): the whole protocol of
   ``facecore.eval.ijb_1n.identification`` (open set per gallery, closed set on G1+G2), seconds.
2. ``search_topk`` (k=20) of 10,000 random unit probes in 1,000,000 random unit gallery rows
   (dim 512, float32: the gallery alone is 1.91 GiB): wall and CPU seconds, peak RSS. Before it,
   on the first 1,024 probes and interleaved, the bare matrix products of the same blocks vs the
   search: the search's overhead as a ratio, which the machine's load cancels out of.
3. With ``--eval``, the evaluation pass on the same arrays (``identify``: ranks, mate scores and the
   closed set's non-mated pair scores, 5,000 gallery identities, half the probes mated).

Target (issue 22): 10,000 x 1,000,000 under 2 minutes on the idle machine, peak memory under 4 GiB.
The load average is printed beside every timing: the machine is shared.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import time

import numpy as np
import torch

from facecore.eval import identification
from facecore.eval.identification import NO_IDENTITY, identify, search_topk
from facecore.eval.ijb_1n import identification as ijb_identification


def peak_rss_gib() -> float:
    """Peak resident set size of this process so far, GiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def load() -> str:
    return "load average " + " ".join(f"{v:.2f}" for v in os.getloadavg())


def unit_rows(n: int, dim: int, seed: int, rows: int = 65536) -> torch.Tensor:
    """n random unit rows, filled block by block (no second copy of the whole array)."""
    out = torch.empty(n, dim)
    gen = torch.Generator().manual_seed(seed)
    for r0 in range(0, n, rows):
        block = torch.randn(min(rows, n - r0), dim, generator=gen)
        out[r0 : r0 + rows] = block / block.norm(dim=1, keepdim=True)
    return out


def timed(fn, *args, **kw):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn(*args, **kw)
    return out, time.perf_counter() - wall, time.process_time() - cpu


def bare_products(probes: torch.Tensor, gallery: torch.Tensor, chunk: int) -> None:
    """The matrix products search_topk computes, and nothing else: its floor."""
    block = max(1, min(probes.shape[0], identification.BLOCK_BYTES // (4 * chunk)))
    for p0 in range(0, probes.shape[0], block):
        for g0 in range(0, gallery.shape[0], chunk):
            probes[p0 : p0 + block] @ gallery[g0 : g0 + chunk].T


def ijbc_sizes(dim: int) -> None:
    rng = np.random.default_rng(0)
    g1, g2, n_probes = 1772, 1759, 19593
    ids = np.arange(1, g1 + g2 + n_probes + 1) * 3  # sparse template ids, sorted
    features = unit_rows(ids.size, dim, 1).numpy()
    subjects = np.arange(g1 + g2)
    galleries = {"G1": np.c_[ids[:g1], subjects[:g1]], "G2": np.c_[ids[g1 : g1 + g2], subjects[g1:]]}
    probes = np.c_[ids[g1 + g2 :], rng.integers(0, g1 + g2, n_probes)]
    print(f"IJB-C 1:N sizes: {n_probes:,} probes, G1 {g1:,} + G2 {g2:,} templates, dim {dim} ({load()})")
    found, wall, cpu = timed(ijb_identification, ids, features, galleries, probes, "IJBC 1:N")
    c = found.closed
    print(f"  open set G1, G2 + closed set G1+G2: {wall:.2f} s wall, {cpu:.2f} s CPU "
          f"(mated G1 {found.open_sets['G1'].mated:,}, non-mated {found.open_sets['G1'].nonmated:,}; "
          f"closed set over {c.probes:,} probes, {c.pair_ranks[-1]:,} largest non-mated pair scores kept)")
    print(f"  peak RSS so far {peak_rss_gib():.2f} GiB ({load()})")


def large(n_probes: int, n_gallery: int, dim: int, chunk: int, with_eval: bool) -> None:
    print(f"\n{n_probes:,} probes in {n_gallery:,} gallery rows, dim {dim}, chunk {chunk:,} ({load()})")
    gallery = unit_rows(n_gallery, dim, 2)
    probes = unit_rows(n_probes, dim, 3)
    print(f"  arrays: gallery {gallery.numel() * 4 / 2**30:.2f} GiB, probes {probes.numel() * 4 / 2**30:.3f} GiB; "
          f"peak RSS after building them {peak_rss_gib():.2f} GiB")
    head = probes[:1024]
    bare, search = [], []
    for _ in range(2):  # interleaved, so the load falls on both alike
        bare.append(timed(bare_products, head, gallery, chunk)[1])
        search.append(timed(search_topk, head, gallery, 20, chunk)[1])
    print(f"  1,024 probes, interleaved x2: bare products {min(bare):.1f} s, search_topk {min(search):.1f} s: "
          f"search = {min(search) / min(bare):.2f}x the products ({load()})")
    (scores, indices), wall, cpu = timed(search_topk, probes, gallery, 20, chunk)
    print(f"  search_topk k=20, all {n_probes:,} probes: {wall:.1f} s wall, {cpu:.1f} s CPU, "
          f"{n_probes * n_gallery / wall / 1e9:.2f} G scores/s; peak RSS {peak_rss_gib():.2f} GiB ({load()})")
    assert scores.shape == (n_probes, 20) and bool((scores[:, :-1] >= scores[:, 1:]).all())
    if with_eval:
        gallery_ids = np.full(n_gallery, NO_IDENTITY, dtype=np.int64)
        gallery_ids[: n_gallery // 200] = np.arange(n_gallery // 200)
        probe_ids = np.arange(n_probes) % (2 * max(1, n_gallery // 200))  # about half mated
        (found, opened, closed), wall, cpu = timed(identify, probes, probe_ids, gallery, gallery_ids, chunk=chunk)
        print(f"  evaluation pass (ranks, mate scores, {closed.pair_ranks[-1]:,} largest non-mated pair scores): "
              f"{wall:.1f} s wall, {cpu:.1f} s CPU; mated {opened.mated:,}, non-mated {opened.nonmated:,}; "
              f"peak RSS {peak_rss_gib():.2f} GiB ({load()})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--probes", type=int, default=10_000)
    parser.add_argument("--gallery", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--chunk", type=int, default=65536)
    parser.add_argument("--eval", action="store_true", help="also time the evaluation pass on the large arrays")
    parser.add_argument("--skip-large", action="store_true", help="only the IJB-C sizes")
    args = parser.parse_args()
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
          f"with {torch.get_num_threads()} threads")
    ijbc_sizes(args.dim)
    if not args.skip_large:
        large(args.probes, args.gallery, args.dim, args.chunk, args.eval)


if __name__ == "__main__":
    main()

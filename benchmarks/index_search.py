"""Gallery search for deployment: exact top-k (torch, chunked) against faiss, at growing gallery sizes.

For each gallery size (random unit vectors, dim 512) it times 1000 probes searched with

- ``exact``: facecore's search (eval/identification.search_topk, torch, in chunks), the default;
- ``faiss-flat``: faiss IndexFlatIP, also exact;
- ``faiss-ivf``: IndexIVFFlat (nlist = ``--nlist-factor`` sqrt(N), k-means of 10 iterations on
  min(N, 64 nlist) rows), at each ``--nprobe``;
- ``faiss-hnsw``: IndexHNSWFlat (M = ``--hnsw-m``), at each ``--ef-search``;

and prints each one's build time, query time (median of ``--rounds``, interleaved so that load
changes hit all alike), time per probe, speed against exact, and how often its top-1 is exact's
(recall@1: over mated probes, a noisy copy of a gallery row at cosine 0.4-0.8 like a real face
and its mate, and over all probes, half of them non-mated random vectors), plus the mean shortfall
of the non-mated probes' top scores (what an open-set threshold sees). The load average is printed
beside every size: on a shared machine compare ratios, not seconds.

    python benchmarks/index_search.py                       # 1e4, 1e5, 1e6
    python benchmarks/index_search.py --sizes 10000 --rounds 5
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time

import numpy as np
import torch

from facecore.eval.identification import search_topk


def unit_rows(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def draw(rng: np.random.Generator, n: int, dim: int, basis: np.ndarray | None) -> np.ndarray:
    """n random unit vectors: uniform on the sphere, or (``basis``: d x dim) near its d-dimensional subspace."""
    if basis is None:
        return unit_rows(rng.standard_normal((n, dim), dtype=np.float32))
    inside = rng.standard_normal((n, basis.shape[0]), dtype=np.float32) @ basis
    inside /= np.linalg.norm(inside, axis=1, keepdims=True)
    return unit_rows(inside + 0.1 * unit_rows(rng.standard_normal((n, dim), dtype=np.float32)))


def make_data(n: int, dim: int, probes: int, seed: int,
              intrinsic: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gallery (n, dim), probes (half mated: cosine 0.4-0.8 to their mate; half not), mates (-1: none).

    ``intrinsic`` > 0: every vector lies near one random ``intrinsic``-dimensional subspace (plus 10% noise in
    all dimensions), a stand-in for embeddings of lower intrinsic dimension than their length.
    """
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.standard_normal((dim, intrinsic)))[0].T.astype(np.float32) if intrinsic else None
    gallery = np.empty((n, dim), dtype=np.float32)
    for s in range(0, n, 1 << 17):  # in slices: no float64 copy of a 2 GB gallery
        gallery[s:s + (1 << 17)] = draw(rng, min(1 << 17, n - s), dim, basis)
    mated = probes // 2
    mates = np.full(probes, -1, dtype=np.int64)
    mates[:mated] = rng.choice(n, mated, replace=False)
    cos = rng.uniform(0.4, 0.8, size=(mated, 1)).astype(np.float32)
    noise = draw(rng, probes, dim, basis)
    p = noise.copy()
    mate = gallery[mates[:mated]]
    other = unit_rows(noise[:mated] - np.sum(noise[:mated] * mate, axis=1, keepdims=True) * mate)  # orthogonal to it
    p[:mated] = cos * mate + np.sqrt(1 - cos**2) * other
    return gallery, unit_rows(p), mates


def load() -> str:
    return "load %.1f %.1f %.1f" % os.getloadavg()


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10000,100000,1000000", help="gallery sizes, comma-separated")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--intrinsic-dim", type=int, default=0,
                    help="0: uniform random unit vectors; d: vectors near a random d-dimensional subspace")
    ap.add_argument("--probes", type=int, default=1000)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--nprobe", default="8,32", help="IVF lists searched per probe, comma-separated")
    ap.add_argument("--nlist-factor", type=float, default=4.0, help="IVF lists = this x sqrt(gallery size)")
    ap.add_argument("--hnsw-m", type=int, default=32)
    ap.add_argument("--ef-search", default="64,128", help="HNSW efSearch values, comma-separated")
    ap.add_argument("--ef-construction", type=int, default=80)
    ap.add_argument("--skip", default="", help="methods to leave out: flat, ivf, hnsw (comma-separated)")
    ap.add_argument("--max-hnsw", type=int, default=10**6, help="build HNSW only up to this gallery size")
    args = ap.parse_args()
    import faiss

    skip = set(filter(None, args.skip.split(",")))
    print(f"torch {torch.__version__} ({torch.get_num_threads()} threads), faiss {faiss.__version__} "
          f"({faiss.omp_get_max_threads()} threads), {os.cpu_count()} CPUs; dim {args.dim}"
          f"{f' (intrinsic {args.intrinsic_dim})' if args.intrinsic_dim else ''}, {args.probes} probes, k {args.k}; "
          f"{load()}")
    for n in [int(float(s)) for s in args.sizes.split(",")]:
        gallery, probes, mates = make_data(n, args.dim, args.probes, seed=n, intrinsic=args.intrinsic_dim)
        mated = mates >= 0
        print(f"\n== gallery {n:,} x {args.dim} ({gallery.nbytes / 2**30:.2f} GiB); {load()}")
        methods: dict[str, tuple[float, object]] = {}  # name -> (build seconds, search callable)
        g_t, p_t = torch.from_numpy(gallery), torch.from_numpy(probes)
        methods["exact (torch)"] = (0.0, lambda: search_topk(p_t, g_t, args.k))
        if "flat" not in skip:
            t, flat = timed(lambda: _flat(faiss, gallery))
            methods["faiss-flat"] = (t, lambda: flat.search(probes, args.k))
        if "ivf" not in skip:
            t, ivf = timed(lambda: _ivf(faiss, gallery, args.nlist_factor))
            for nprobe in [int(x) for x in args.nprobe.split(",")]:
                methods[f"faiss-ivf{ivf.nlist} nprobe={nprobe}"] = (t, _with(ivf, "nprobe", nprobe, args.k, probes))
        if "hnsw" not in skip and n <= args.max_hnsw:
            t, hnsw = timed(lambda: _hnsw(faiss, gallery, args.hnsw_m, args.ef_construction))
            for ef in [int(x) for x in args.ef_search.split(",")]:
                methods[f"faiss-hnsw{args.hnsw_m} ef={ef}"] = (t, _with(hnsw, "efSearch", ef, args.k, probes))
        times: dict[str, list[float]] = {m: [] for m in methods}
        tops: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for _ in range(args.rounds):  # interleaved: a load change hits every method alike
            for name, (_, fn) in methods.items():
                t, (s, i) = timed(fn)
                times[name].append(t)
                tops[name] = (np.asarray(s)[:, 0], np.asarray(i)[:, 0])
        exact_s, exact_i = tops["exact (torch)"]
        base = statistics.median(times["exact (torch)"])
        print(f"{'method':<28}{'build s':>9}{'query s':>9}{'ms/probe':>10}{'x exact':>9}{'R@1 mated':>11}"
              f"{'R@1 all':>9}{'non-mated top shortfall':>25}")
        for name, (build, _) in methods.items():
            q = statistics.median(times[name])
            s, i = tops[name]
            r_mated = float(np.mean(i[mated] == exact_i[mated]))
            r_all = float(np.mean(i == exact_i))
            short = float(np.mean(exact_s[~mated] - s[~mated])) if (~mated).any() else math.nan
            print(f"{name:<28}{build:>9.2f}{q:>9.3f}{1000 * q / args.probes:>10.3f}{base / q:>9.2f}{r_mated:>11.4f}"
                  f"{r_all:>9.4f}{short:>25.5f}")
        # Probes after which a one-off build pays for itself against exact search, per approximate method.
        for name, (build, _) in methods.items():
            gain = (base - statistics.median(times[name])) / args.probes
            if build > 0 and gain > 0:
                print(f"  {name}: build repaid after {build / gain:,.0f} probes")
        print(f"  ({load()})")
        del methods, tops, g_t, gallery


def _flat(faiss, gallery):
    index = faiss.IndexFlatIP(gallery.shape[1])
    index.add(gallery)
    return index


def _ivf(faiss, gallery, factor):
    n, dim = gallery.shape
    nlist = max(1, int(factor * math.sqrt(n)))
    quantizer = faiss.IndexFlatIP(dim)
    index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.niter = 10
    rng = np.random.default_rng(0)
    train = gallery[np.sort(rng.choice(n, min(n, 64 * nlist), replace=False))]
    index.train(train)
    index.add(gallery)
    return index


def _hnsw(faiss, gallery, m, ef_construction):
    index = faiss.IndexHNSWFlat(gallery.shape[1], m, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = ef_construction
    index.add(gallery)
    return index


def _with(index, attr, value, k, probes):
    def run():
        target = index.hnsw if attr == "efSearch" else index
        setattr(target, attr, value)
        return index.search(probes, k)

    return run


if __name__ == "__main__":
    main()

"""Speed of the verification metrics and of .bin pair-set loading; prints numbers and ratios.

    .venv/bin/python benchmarks/metrics.py [--skip-reference-1m] [--cache /tmp/facecore-bench]

1. 6,000 pairs, D=512 (LFW-sized): the vectorized ``verification`` metric against a plain
   loop over folds and thresholds (one NumPy accuracy per threshold, as InsightFace's
   ``calculate_roc`` does), in the same run. Target: >= 20x.
2. 1,000,000 pairs, D=128 random unit embeddings (2M x 128 float32, 1 GB; the distances are
   computed, not generated): every bundled metric, one thread. Target: verification < 10 s.
3. A .bin set of 6,000 pairs (12,000 112x112 JPEGs, cached) read by the bin-pairs plugin:
   load (unpickle + check every image) and a full pass of decoded items, images/s.

Runs on one core: thread pools are limited to 1 before NumPy/torch load.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import io  # noqa: E402
import pickle  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

import facecore  # noqa: E402
from facecore.eval.evaluation import pair_squared_distances  # noqa: E402


def reference_verification(emb: np.ndarray, issame: np.ndarray, folds: int = 10) -> dict:
    """Plain loops over folds and thresholds: the way the protocol is usually written."""
    from sklearn.model_selection import KFold

    thresholds = np.arange(0, 4, 0.01)
    dist, _ = pair_squared_distances(emb, issame)

    def accuracy(t: float, d: np.ndarray, y: np.ndarray) -> float:
        predict = d < t
        return (np.sum(predict & y) + np.sum(~predict & ~y)) / d.size

    accs, bests = [], []
    for train, test in KFold(n_splits=folds, shuffle=False).split(dist):
        train_acc = np.array([accuracy(t, dist[train], issame[train]) for t in thresholds])
        best = thresholds[int(np.argmax(train_acc))]
        bests.append(best)
        accs.append(accuracy(best, dist[test], issame[test]))
    return {"accuracy": float(np.mean(accs)), "accuracy_std": float(np.std(accs)), "best_threshold": float(np.mean(bests))}


def make_set(pairs: int, dim: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random unit embeddings; "same" pairs share a direction plus noise, so that their cosine is
    about 2.5 standard deviations of the different pairs' cosine (accuracy ~0.9, like a weak model)."""
    rng = np.random.default_rng(seed)
    emb = rng.standard_normal((2 * pairs, dim), dtype=np.float32)
    issame = rng.random(pairs) < 0.5
    idx = np.flatnonzero(issame)
    cos = 2.5 / np.sqrt(dim)
    emb[2 * idx + 1] = emb[2 * idx] + np.sqrt(1 / cos**2 - 1) * emb[2 * idx + 1]
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    return emb, issame


def best_of(fn, repeat: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def bench_6k() -> None:
    emb, issame = make_set(6000, 512)
    metric = facecore.create("metrics", "verification")
    t_vec, got = best_of(lambda: metric(emb, issame), 5)
    t_ref, want = best_of(lambda: reference_verification(emb, issame), 1)
    same = all(abs(got[k] - want[k]) < 1e-12 for k in want)
    print(f"6,000 pairs, D=512: vectorized {t_vec * 1e3:.1f} ms, loop reference {t_ref * 1e3:.0f} ms, "
          f"{t_ref / t_vec:.0f}x faster (target >= 20x); same numbers: {same}; accuracy {got['accuracy']:.4f}")


def bench_1m(skip_reference: bool) -> None:
    t = time.perf_counter()
    emb, issame = make_set(1_000_000, 128)
    print(f"1,000,000 pairs, D=128: generated 2M x 128 float32 embeddings in {time.perf_counter() - t:.1f} s")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in ("verification", "tar_at_far", "auc", "eer"):
            metric = facecore.create("metrics", name)
            took, out = best_of(lambda: metric(emb, issame), 1)
            target = " (target < 10 s)" if name == "verification" else ""
            print(f"  {name:<12} {took:6.2f} s{target}  {out}")
        t_dist, _ = best_of(lambda: pair_squared_distances(emb, issame), 1)
        print(f"  of which pair distances: {t_dist:.2f} s")
    if not skip_reference:
        t_ref, want = best_of(lambda: reference_verification(emb, issame), 1)
        print(f"  loop reference verification: {t_ref:.1f} s  {want}")


def jpeg_pair_set(path: Path, pairs: int) -> None:
    """6,000 pairs of 112x112 JPEGs (smooth colour fields plus noise, ~LFW-sized files)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    bins = []
    for _ in range(2 * pairs):
        small = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
        img = np.asarray(Image.fromarray(small).resize((112, 112), Image.BICUBIC), dtype=np.int16)
        img = np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=90)
        bins.append(buf.getvalue())
    issame = [bool(i % 2) for i in range(pairs)]
    path.write_bytes(pickle.dumps((bins, issame), protocol=4))


def bench_bin(cache: Path) -> None:
    import torch
    from PIL import Image

    torch.set_num_threads(1)
    if "bin-pairs" not in facecore.available("datasets"):
        print(".bin load: skipped, the bin-pairs plugin is not installed")
        return
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / "pairs_6000.bin"
    if not path.is_file():
        jpeg_pair_set(path, 6000)
    size_mb = path.stat().st_size / 2**20
    t_load, dataset = best_of(lambda: facecore.create("datasets", "bin-pairs", path=str(path)), 1)
    n = len(dataset)

    def full_pass() -> None:
        for i in range(n):
            dataset[i]

    t_pass, _ = best_of(full_pass, 1)
    bins, _ = pickle.loads(path.read_bytes())
    t_pil, _ = best_of(lambda: [np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in bins], 1)
    print(f".bin: bare Pillow decode of the same {n:,} JPEGs (ceiling): {n / t_pil:,.0f} images/s")
    print(f".bin of {n:,} images ({size_mb:.0f} MB): load + check {t_load:.2f} s ({n / t_load:,.0f} images/s); "
          f"decoded pass {t_pass:.2f} s ({n / t_pass:,.0f} images/s); load + pass {n / (t_load + t_pass):,.0f} images/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-reference-1m", action="store_true", help="Do not time the loop reference at 1M pairs.")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/facecore-bench"), help="Where the .bin set is cached.")
    args = parser.parse_args()
    print(f"facecore {facecore.__version__}, numpy {np.__version__}, Python {platform.python_version()}, "
          f"{platform.processor() or platform.machine()}, 1 thread")
    bench_6k()
    bench_1m(args.skip_reference_1m)
    bench_bin(args.cache)


if __name__ == "__main__":
    main()

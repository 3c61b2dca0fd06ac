"""Speed and memory of the IJB protocol after the embedding pass, at IJB-C's real sizes.

    .venv/bin/python benchmarks/ijb.py [--images 469375] [--templates 23124] [--pairs 15658489]
                                       [--dim 512] [--parse] [--cache /tmp/facecore-bench]

Synthetic features stand in for a model's: 469,375 x 512 float32 image features (0.96 GB),
23,124 templates of 1-6 medias, 15,658,489 template pairs of which 19,557 are genuine (the
IJB-C 1:1 counts). Timed stages (those of ``evaluate_templates``, wall and CPU seconds):
weighting (detector score, in place), template pooling, pair -> template rows, pair scores,
ROC, TAR at 1e-6..1e-1, AUC, the ROC plot; then the peak resident memory of the process.
Target: under 30 s for the whole protocol on the project's 2-core CPU, memory bounded (the
features are the only array of their size).

``--parse`` also times reading a 15.7M-line ``ijbc_template_pair_label.txt`` with the ``ijb``
plugin's parser (the file is written once into --cache; writing it takes minutes).
``--items ROOT`` times the plugin's items (read, decode, align) on an IJB set, per process.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import time
from pathlib import Path

import numpy as np

from facecore.eval.evaluation import roc_auc, roc_from_scores
from facecore.eval.roc_plot import plot_roc
from facecore.eval.ijb import (
    FAR_TARGETS,
    TemplateSet,
    far_label,
    pair_scores,
    pool_templates,
    tar_at_far,
    template_rows,
    weight_features,
)


def rss_mib() -> float:
    """Peak resident set size of this process so far, MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize() / 2**20


def make_inputs(images: int, templates: int, pairs: int, dim: int, seed: int = 0) -> tuple[np.ndarray, TemplateSet]:
    """Random unit-ish features; templates of consecutive images split into 1-6 medias; random pairs."""
    rng = np.random.default_rng(seed)
    features = rng.standard_normal((images, dim), dtype=np.float32)
    template_of = np.sort(rng.integers(0, templates, images))
    template_of[:templates] = np.arange(templates)  # every template has an image
    template_of.sort()
    media_of = template_of * 8 + rng.integers(0, 6, images)  # media ids unique to their template
    scores = rng.uniform(0.5, 1.0, images)
    t1 = rng.integers(0, templates, pairs)
    t2 = rng.integers(0, templates, pairs)
    labels = np.zeros(pairs, dtype=bool)
    labels[rng.choice(pairs, size=min(19_557, pairs // 2), replace=False)] = True
    ids = np.arange(templates) * 3 + 1  # template ids need not be contiguous
    data = TemplateSet("IJBC", ids[template_of], media_of, scores, np.stack([ids[t1], ids[t2]], 1), labels)
    return features, data


def write_pair_file(path: Path, pairs: int, templates: int, seed: int = 1) -> None:
    rng = np.random.default_rng(seed)
    chunk = 1_000_000
    with open(path, "w") as fh:
        for start in range(0, pairs, chunk):
            n = min(chunk, pairs - start)
            rows = np.stack([rng.integers(1, templates, n), rng.integers(1, templates, n),
                             (rng.random(n) < 0.00125).astype(np.int64)], 1)
            fh.write("\n".join(f"{a} {b} {c}" for a, b, c in rows.tolist()) + "\n")


def time_items(root: str, limit: int = 400) -> None:
    """Images/s of the ijb plugin's items (read JPEG, decode, align, normalize) in this process."""
    import torch

    import facecore

    torch.set_num_threads(1)
    data = facecore.create("datasets", "ijb", root=root)
    n = min(limit, len(data))
    data[0]  # warm up the decoder
    wall, cpu = time.perf_counter(), time.process_time()
    for i in range(n):
        data[i]
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    print(f"items of {root}: {n / wall:,.0f} img/s wall, {n / cpu:,.0f} img/s per CPU second "
          f"({1000 * cpu / n:.2f} ms CPU per image: read, decode, align, normalize)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=469_375)
    parser.add_argument("--templates", type=int, default=23_124)
    parser.add_argument("--pairs", type=int, default=15_658_489)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--parse", action="store_true", help="also time parsing a pair-label file of --pairs lines")
    parser.add_argument("--cache", default="/tmp/facecore-bench", help="where --parse keeps its pair file")
    parser.add_argument("--items", metavar="IJB_ROOT",
                        help="also time reading + aligning the images of this IJB set (e.g. from `facecore demo-data "
                             "--ijb`), one process: the per-worker rate of the embedding pass's data side")
    args = parser.parse_args()

    print(f"machine: {platform.machine()}, {platform.processor() or platform.platform()}, numpy {np.__version__}")
    if args.items:
        time_items(args.items)
    start = time.perf_counter()
    features, data = make_inputs(args.images, args.templates, args.pairs, args.dim)
    inputs_mib = current_rss_mib()
    print(f"inputs: {args.images:,} x {args.dim} features ({features.nbytes / 2**30:.2f} GiB), {args.templates:,} "
          f"templates, {args.pairs:,} pairs ({int(data.labels.sum()):,} genuine); made in "
          f"{time.perf_counter() - start:.1f} s; process RSS {inputs_mib:,.0f} MiB")

    # The stages of evaluate_templates, one by one, with wall and CPU time (all threads): on a
    # loaded machine the CPU time is the better guide to the idle wall time (BLAS uses 2 threads).
    stages: dict[str, tuple[float, float]] = {}

    def timed(name, func, *a, **kw):
        wall, cpu = time.perf_counter(), time.process_time()
        out = func(*a, **kw)
        stages[name] = (time.perf_counter() - wall, time.process_time() - cpu)
        return out

    genuine = int(data.labels.sum())
    feats = timed("weight", weight_features, features, data.scores, norm_score=True, detector_score=True)
    ids, pooled = timed("pool", pool_templates, feats, data.templates, data.medias)
    rows = timed("rows", template_rows, ids, data.pairs)
    scores = timed("score", pair_scores, pooled, rows[:, 0], rows[:, 1])
    roc = timed("roc", roc_from_scores, scores, data.labels)
    read = timed("tar", tar_at_far, roc, FAR_TARGETS, negatives=data.labels.size - genuine, positives=genuine)
    timed("auc", roc_auc, roc)
    timed("plot", plot_roc, {"IJBC": roc}, None)  # the ROC PNG, drawn but not saved
    peak = rss_mib()
    total_wall = sum(w for w, _ in stages.values())
    total_cpu = sum(c for _, c in stages.values())
    print("stage     wall s   cpu s")
    for stage, (wall, cpu) in stages.items():
        print(f"  {stage:<6} {wall:7.2f} {cpu:7.2f}")
    print(f"protocol total: {total_wall:.2f} s wall, {total_cpu:.2f} s CPU (target < 30 s wall on an idle 2-core "
          f"machine); wall / target = {total_wall / 30:.2f}, load average now {os.getloadavg()[0]:.1f}")
    print(f"peak RSS {peak:,.0f} MiB = inputs {inputs_mib:,.0f} MiB + {peak - inputs_mib:,.0f} MiB "
          f"({(peak - inputs_mib) / (features.nbytes / 2**20):.2f}x the image features)")
    row = "  ".join(f"{far_label(t)}: {100 * v:.2f}" for t, v in zip(FAR_TARGETS, read["tar"]))
    print(f"TAR (%) on random features (sanity, ~FAR): {row}")

    if args.parse:
        from facecore_plugins.ijb import read_pair_file

        cache = Path(args.cache)
        cache.mkdir(parents=True, exist_ok=True)
        path = cache / f"pairs_{args.pairs}.txt"
        if not path.exists():
            print(f"writing {path} (once)...")
            write_pair_file(path, args.pairs, args.templates)
        start = time.perf_counter()
        pairs, labels = read_pair_file(path)
        print(f"parse {path.name}: {time.perf_counter() - start:.2f} s for {len(labels):,} lines")


if __name__ == "__main__":
    main()

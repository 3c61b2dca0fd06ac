"""Label cleaning on synthetic data with known noise: how well `facecore clean` finds it, and what it buys.

1. `demo-data` with --label-noise (default 0.2): that share of the training images carry another
   identity's label; train/label_noise.tsv says which.
2. Train subcenter_arcface (k 3) on the noisy set with the quick-start recipe (configs/quickstart.yaml,
   its head swapped), then run `facecore clean` with the last checkpoint.
3. Precision and recall of the dropped images against the injected noise at several thresholds
   (one embedding pass: the angles do not depend on the threshold).
4. Retrain the quick-start recipe (cosface) on the noisy set and on the cleaned set (and, with
   --oracle, on the set minus exactly the noisy images), same seed and epochs, and compare the
   held-out verification accuracy (test.bin: identities never trained on).

    python benchmarks/clean.py                          # 200 identities x 20 images, 2 epochs
    python benchmarks/clean.py --epochs 3 --oracle      # longer, with the upper bound
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "configs" / "quickstart.yaml"


def load() -> str:
    return "load average " + " ".join(f"{x:.1f}" for x in os.getloadavg())


def recipe(data_root: Path, test_bin: Path, out: Path, epochs: int, seed: int, head: list[str] = ()) -> dict:
    from facecore.core.config import load_config

    return load_config(RECIPE, [
        f"data.root={data_root}", f"eval.bin_file={test_bin}", "eval.at_start=false", f"eval.eval_freq={epochs}",
        f"training.epochs={epochs}", f"seed={seed}", f"checkpoint.save_dir={out}", f"logging.log_dir={out / 'logs'}",
        "logging.tensorboard=false", *head,
    ])


def trained(config: dict, what: str) -> tuple[Path, float, float]:
    """Train; (last checkpoint, held-out accuracy, minutes)."""
    from facecore.train.trainer import train

    start = time.perf_counter()
    summary = train(config, verbose=False)
    minutes = (time.perf_counter() - start) / 60
    accuracy = summary["val_metrics"]["test"]["accuracy"]
    print(f"  {what:44s} held-out accuracy {100 * accuracy:5.1f}%  ({minutes:.1f} min, {load()})", flush=True)
    return Path(summary["run_dir"]) / "last.pth", accuracy, minutes


def subset(source: Path, keep_keys: np.ndarray, folder: Path) -> Path:
    """The oracle set: ``source``'s images whose keys are in ``keep_keys``, as a RecordIO set like clean writes."""
    from facecore import create
    from facecore.eval.cleaning import write_kept_set

    dataset = create("datasets", "recordio", root=str(source), train=False)
    keep = np.isin(dataset.keys, keep_keys)
    if not (folder / "train.rec").is_file():
        write_kept_set(dataset.reader, dataset.keys[keep], dataset.labels[keep], dataset.num_classes, 112, folder)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "clean_bench")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_clean")
    parser.add_argument("--identities", type=int, default=200)
    parser.add_argument("--images", type=int, default=20, help="training images per identity")
    parser.add_argument("--noise", type=float, default=0.2)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--scale", type=float, default=16.0, help="subcenter_arcface's s at this scale")
    parser.add_argument("--margin", type=float, default=0.2, help="subcenter_arcface's m at this scale")
    parser.add_argument("--threshold", type=float, default=75.0, help="the threshold whose cleaned set is retrained on")
    parser.add_argument("--thresholds", default="50,55,60,65,70,75,80,85,90")
    parser.add_argument("--oracle", action="store_true", help="also retrain on the set minus exactly the noisy images")
    parser.add_argument("--skip-retrain", action="store_true")
    args = parser.parse_args()

    import torch

    from facecore.data.synthetic import make_demo_data, read_label_noise
    from facecore.eval.cleaning import clean

    print(f"torch threads {torch.get_num_threads()}, {load()}", flush=True)
    start = time.perf_counter()
    demo = make_demo_data(args.data, train_identities=args.identities, images_per_identity=args.images,
                          test_identities=100, test_images_per_identity=10, pairs=2000, seed=args.seed,
                          label_noise=args.noise, progress=False)
    train_root, test_bin = Path(demo["train_rec"]), Path(demo["test_bin"])
    noisy_keys = np.array(sorted(read_label_noise(demo["label_noise_file"])), dtype=np.int64)
    print(f"data: {demo['train_images']} training images of {demo['train_identities']} identities, "
          f"{len(noisy_keys)} relabelled ({100 * len(noisy_keys) / demo['train_images']:.1f}%); "
          f"{demo['pairs']} held-out pairs ({'reused' if demo['reused'] else f'{time.perf_counter() - start:.0f} s'})",
          flush=True)

    print(f"\n1. subcenter_arcface k {args.k}, s {args.scale:g}, m {args.margin:g} on the noisy set, "
          f"{args.epochs} epochs:", flush=True)
    head = ["head.type=subcenter_arcface", f"head.k={args.k}", f"head.scale={args.scale}", f"head.margin={args.margin}"]
    ckpt, sub_acc, _ = trained(recipe(train_root, test_bin, args.out / "subcenter", args.epochs, args.seed, head),
                               "subcenter_arcface, noisy set")

    print(f"\n2. facecore clean --threshold {args.threshold:g}:", flush=True)
    start = time.perf_counter()
    cleaned = args.out / "cleaned"
    result = clean(ckpt, cleaned, threshold=args.threshold, force=True)
    print("\n".join(result.lines()))
    print(f"  ({time.perf_counter() - start:.1f} s for {result.angles.labels.size} images, {load()})")
    angles, keys = result.angles.degrees, result.angles.keys
    noisy = np.isin(keys, noisy_keys)
    on_dominant = result.angles.on_dominant()
    print(f"  median angle: clean images {np.median(angles[~noisy]):.1f} deg, noisy images "
          f"{np.median(angles[noisy]):.1f} deg; noisy images nearest a non-dominant sub-center: "
          f"{100 * (~on_dominant[noisy]).mean():.1f}% (clean images: {100 * (~on_dominant[~noisy]).mean():.1f}%)")

    print("\n3. dropped images against the injected noise:")
    print(f"  {'threshold':>9}  {'dropped':>8}  {'precision':>9}  {'recall':>7}  {'F1':>5}")
    table = []
    for t in [float(x) for x in args.thresholds.split(",")]:
        dropped = angles > t
        hits = int((dropped & noisy).sum())
        precision = hits / max(int(dropped.sum()), 1)
        recall = hits / max(int(noisy.sum()), 1)
        f1 = 2 * precision * recall / max(precision + recall, 1e-12)
        table.append({"threshold": t, "dropped": int(dropped.sum()), "precision": precision, "recall": recall, "f1": f1})
        print(f"  {t:>9g}  {int(dropped.sum()):>8}  {100 * precision:>8.1f}%  {100 * recall:>6.1f}%  {f1:>5.3f}")

    report = {"args": {k: str(v) for k, v in vars(args).items()}, "subcenter_accuracy": sub_acc, "table": table,
              "summary": result.summary()}
    if not args.skip_retrain:
        print(f"\n4. the quick-start recipe (cosface), {args.epochs} epochs, seed {args.seed}:", flush=True)
        arms = [("noisy set", train_root), (f"cleaned set (threshold {args.threshold:g})", cleaned / "kept")]
        if args.oracle:
            arms.append(("noise removed exactly (oracle)",
                         subset(train_root, np.setdiff1d(keys, noisy_keys), args.out / "oracle_set")))
        report["retrain"] = {}
        for i, (name, root) in enumerate(arms):
            _, acc, minutes = trained(recipe(root, test_bin, args.out / f"retrain{i}", args.epochs, args.seed), name)
            report["retrain"][name] = {"accuracy": acc, "minutes": minutes}
        base = report["retrain"]["noisy set"]["accuracy"]
        for name, r in report["retrain"].items():
            if name != "noisy set":
                print(f"  {name}: {100 * (r['accuracy'] - base):+.1f} points over the noisy set")
    print(f"\n{load()}")
    (args.out / "report.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()

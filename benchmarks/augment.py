"""Training augmentations: what they buy on degraded faces, and what they cost per step.

Quality: trains the quick start with flip only (configs/quickstart.yaml), with the AdaFace-style
list (configs/quickstart-adaface-aug.yaml) and, with --arms adaface-own, with AdaFace's own
recipe (crop kept in place on black, every augmentation at p 0.2), and validates each at the end
on the clean held-out pairs (test.bin) and on the same pairs with degraded images
(test_degraded.bin, from `facecore demo-data --degraded`). Targets: a clear gain on the degraded
set, at most 1 point lost on the clean one.

Cost: the AdaFace-style list applied to a batch of 64 against one CPU training step of the
quick-start model at batch 64 (forward, backward, AdamW), interleaved, after 200 warm-up calls
(low_resolution caches its resampling matrices, as in training after the first ~100 batches);
target under 5%.

    facecore demo-data data/quickstart --pairs 2000 --degraded
    python benchmarks/augment.py                    # both parts (two quick-start trainings)
    python benchmarks/augment.py --part cost        # only the timing
    python benchmarks/augment.py --epochs 4         # longer training for both arms
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from facecore.core.build import build_backbone, build_head
from facecore.core.config import load_config
from facecore.core.runtime import DistInfo
from facecore.train.augment import Augmenter
from facecore.train.classifier import MarginClassifier

ROOT = Path(__file__).resolve().parent.parent
ARMS = {"flip only": ROOT / "configs" / "quickstart.yaml",
        "AdaFace-style list": ROOT / "configs" / "quickstart-adaface-aug.yaml",
        "AdaFace's own recipe": ROOT / "configs" / "quickstart.yaml"}
ARM_KEYS = {"flip only": "flip", "AdaFace-style list": "adaface-style", "AdaFace's own recipe": "adaface-own"}
# AdaFace's training transform (its repo): crop kept in place with the rest black, from 20% of the
# area; low resolution; ColorJitter(0.5, 0.5, 0.5); each with p 0.2, after the flip
ADAFACE_OWN = ["flip", {"name": "random_crop", "p": 0.2, "mode": "pad"}, {"name": "low_resolution", "p": 0.2},
               {"name": "photometric", "p": 0.2}]


def arm_config(path: Path, data: Path, out: Path, epochs: int | None, p: float | None = None) -> dict:
    overrides = [
        f"data.root={data / 'train'}",
        "eval.bin_file=[../test.bin, ../test_degraded.bin]",
        "eval.at_start=false",
        f"checkpoint.save_dir={out}",
        f"logging.log_dir={out / 'logs'}",
        "logging.tensorboard=false",
    ]
    if epochs:
        overrides += [f"training.epochs={epochs}", f"eval.eval_freq={epochs}"]
    config = load_config(path, overrides)
    if p is not None:  # every entry but the flip gets this probability
        config["data"]["augment"] = [spec if spec == "flip" else {**spec, "p": p} for spec in config["data"]["augment"]]
    return config


def quality(data: Path, out: Path, epochs: int | None, p: float | None, arms: list[str]) -> dict:
    from facecore.train.trainer import train

    results = {}
    for arm, path in ARMS.items():
        if ARM_KEYS[arm] not in arms:
            continue
        cfg = arm_config(path, data, out / ARM_KEYS[arm], epochs, p)
        if arm == "AdaFace's own recipe":
            cfg["data"]["augment"] = ADAFACE_OWN
        start = time.perf_counter()
        summary = train(cfg, verbose=False)
        metrics = summary["val_metrics"]
        results[arm] = {
            "clean": (metrics["test"]["accuracy"], metrics["test"]["accuracy_std"]),
            "degraded": (metrics["test_degraded"]["accuracy"], metrics["test_degraded"]["accuracy_std"]),
            "epochs": cfg["training"]["epochs"],
            "minutes": (time.perf_counter() - start) / 60,
        }
        r = results[arm]
        print(f"  {arm:22s} clean {100 * r['clean'][0]:5.1f}% ± {100 * r['clean'][1]:.1f}   degraded "
              f"{100 * r['degraded'][0]:5.1f}% ± {100 * r['degraded'][1]:.1f}   ({r['epochs']} epochs, "
              f"{r['minutes']:.1f} min)", flush=True)
    if "flip only" not in results or "AdaFace-style list" not in results:
        return {"arms": results}
    base, aug = results["flip only"], results["AdaFace-style list"]
    gain = 100 * (aug["degraded"][0] - base["degraded"][0])
    change = 100 * (aug["clean"][0] - base["clean"][0])
    print(f"  degraded set: {gain:+.1f} points with the AdaFace-style list (target: a clear gain)")
    print(f"  clean set:    {change:+.1f} points (target: >= -1.0)")
    return {"arms": results, "degraded_gain_points": gain, "clean_change_points": change}


def cost(steps: int) -> dict:
    """Median seconds of the augmentation list and of a training step on the same batch, interleaved."""
    cfg = load_config(ARMS["AdaFace-style list"], ["data.root=unused"])
    cfg["head"]["num_classes"] = 500
    backbone = build_backbone(cfg)
    classifier = MarginClassifier(cfg["model"]["embedding_size"], 500, build_head(cfg))
    params = list(backbone.parameters()) + list(classifier.parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg["training"]["lr"], weight_decay=cfg["training"]["weight_decay"])
    augment = Augmenter.from_config(cfg)
    batch = cfg["data"]["batch_size"]
    g = torch.Generator().manual_seed(0)
    images = torch.rand(batch, 3, 112, 112, generator=g) * 2 - 1
    labels = torch.randint(0, 500, (batch,), generator=g)

    def step() -> None:
        loss = classifier(backbone(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def timed(fn, *args) -> tuple[float, float]:
        wall, cpu = time.perf_counter(), time.process_time()
        fn(*args)
        return time.perf_counter() - wall, time.process_time() - cpu

    step()
    for i in range(200):  # as after the first epoch's batches: low_resolution's matrices are cached by then
        augment(images, 1, 0, i, DistInfo())
    step_times, aug_times = [], []
    for i in range(steps):  # interleaved, so both see the same machine load
        step_times.append(timed(step))
        batch_images = images.clone()  # the trainer lets the augmentations write into its batch
        aug_times.append(timed(augment, batch_images, 0, 0, i + 1, DistInfo(), True))  # new index: new choices
    per_aug = {}
    for s in augment.steps:
        single = Augmenter([s])
        per_aug[f"{s.name} (p {s.p:g})"] = [timed(single, images.clone(), 0, 0, i + 1, DistInfo(), True)
                                            for i in range(steps)]
    median = lambda pairs, k: statistics.median(p[k] for p in pairs)  # noqa: E731
    out = {"threads": torch.get_num_threads(), "batch": batch}
    for k, clock in enumerate(("wall", "cpu")):
        t_step, t_aug = median(step_times, k), median(aug_times, k)
        out[clock] = {"step_s": t_step, "augment_s": t_aug, "ratio": t_aug / t_step,
                      "per_augmentation_s": {n: median(v, k) for n, v in per_aug.items()}}
        print(f"  {clock:4s} time: training step, batch {batch}: {1000 * t_step:.0f} ms; augmentations "
              f"{1000 * t_aug:.1f} ms = {100 * t_aug / t_step:.1f}% of a step (target < 5%)")
    print(f"  per augmentation ({out['threads']} threads), wall / cpu ms:")
    for name in per_aug:
        print(f"    {name:26s} {1000 * out['wall']['per_augmentation_s'][name]:7.2f} / "
              f"{1000 * out['cpu']['per_augmentation_s'][name]:7.2f}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "quickstart",
                        help="output folder of `facecore demo-data --degraded`")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-augment")
    parser.add_argument("--epochs", type=int, help="epochs for both arms (default: the configs', 2)")
    parser.add_argument("--steps", type=int, default=10, help="timed training steps for the cost part")
    parser.add_argument("--part", choices=["both", "quality", "cost"], default="both")
    parser.add_argument("--threads", type=int, help="torch threads for the cost part (default: torch's)")
    parser.add_argument("--p", type=float, help="probability for every augmentation of the AdaFace-style list but the flip "
                        "(default: the config's; AdaFace's own recipe keeps its 0.2)")
    parser.add_argument("--arms", nargs="+", choices=list(ARM_KEYS.values()), default=["flip", "adaface-style"],
                        help="which trainings to run")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    results = {}
    if args.part in ("both", "cost"):
        if args.threads:
            torch.set_num_threads(args.threads)
        print("cost of the AdaFace-style list (CPU; cpu time is less disturbed by a loaded machine):", flush=True)
        results["cost"] = cost(args.steps)
    if args.part in ("both", "quality"):
        if not (args.data / "test_degraded.bin").exists():
            raise SystemExit(f"{args.data / 'test_degraded.bin'} is missing: run "
                             f"`facecore demo-data {args.data} --pairs 2000 --degraded` first")
        print("quality (10-fold verification accuracy at the end of training):", flush=True)
        results["quality"] = quality(args.data, args.out, args.epochs, args.p, args.arms)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()

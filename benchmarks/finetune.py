"""Fine-tuning a pretrained model on a small set of new identities, against two baselines.

1. Pretrain: the quick start (configs/quickstart.yaml) on `facecore demo-data`'s 500 identities
   (or reuse a checkpoint with --pretrained).
2. A small set of *other* identities of another kind (--kind): "occluded" (40% of the images
   with a hat that hides the hair, 60% with an object in front of part of the face; the quick
   start has 3% and 4%) or "night" (every image greyscale, darker, noisier, more often
   blurred). 2, 3 or 4 images per identity.
3. Held-out identities of that kind, as a .bin of pairs. On them, print the 10-fold verification
   accuracy of: training from scratch on the small set (the quick start's recipe, 20 epochs);
   the pretrained model as it is; the pretrained model fine-tuned on the small set (10 epochs:
   2 head-only, then the backbone at a tenth of the classifier's LR).

    python benchmarks/finetune.py                    # everything (pretraining is most of it)
    python benchmarks/finetune.py --pretrained runs/quickstart/fastcontextface/<time>/last.pth
    python benchmarks/finetune.py --kind night

The fine-tuning recipe (epochs, freeze, LR multiplier) was chosen on a separate validation set
of identities of the "occluded" kind (identity stream 4), not on the held-out pairs printed here.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from facecore.core.config import load_config, validate_config
from facecore.data.packing import pack_bin, pack_rec
from facecore.data.synthetic import Nuisance, generate_identity_folder, make_demo_data, write_pairs
from facecore.train.trainer import train

ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = ROOT / "configs" / "quickstart.yaml"
# Kinds of the small set: the quick start's nuisance with one thing changed.
KINDS = {
    "occluded": Nuisance(hat=0.4, occluder=0.6),
    "night": Nuisance(grey=1.0, gain=(0.35, 0.9), noise=14.0, blur=0.6),
}
SMALL_STREAM, HELD_OUT_STREAM = 2, 3  # identity streams the demo data (0: train, 1: test) never uses


def small_sets(work: Path, kind: Nuisance, identities: int, held_out: int, pairs: int, seed: int) -> tuple[Path, Path]:
    """The small training set (a third of the identities each with 2, 3 and 4 images) and the held-out pairs."""
    done = work / "done"
    if not done.exists():
        images, third = work / "small_images", identities // 3
        for i, count in enumerate((2, 3, 4)):
            n = third if i < 2 else identities - 2 * third
            generate_identity_folder(images, n, count, seed=seed, first_identity=i * third, stream=SMALL_STREAM,
                                     nuisance=kind, progress=False)
        pack_rec(images, work / "small", progress=False)
        generate_identity_folder(work / "held_out_images", held_out, 10, seed=seed, stream=HELD_OUT_STREAM,
                                 nuisance=kind, progress=False)
        write_pairs(work / "held_out_images", work / "held_out_pairs.txt", pairs, seed=seed)
        pack_bin(work / "held_out_pairs.txt", work / "held_out.bin", progress=False)
        done.write_text("ok\n")
    return work / "small", work / "held_out.bin"


def pretrain(work: Path, seed: int) -> tuple[Path, dict]:
    """The quick start, unchanged except for its folders; returns its last checkpoint and summary."""
    data = make_demo_data(work / "source", pairs=2000, seed=seed, progress=False)
    overrides = [f"data.root={data['train_rec']}", f"checkpoint.save_dir={work / 'runs' / 'pretrain'}",
                 f"logging.log_dir={work / 'logs'}", "logging.tensorboard=false", "eval.at_start=false",
                 f"eval.bin_file={data['test_bin']}"]
    summary = train(load_config(QUICKSTART, overrides), verbose=False)
    return Path(summary["run_dir"]) / "last.pth", summary


def small_set_config(base: dict, small: Path, held_out: Path, out: Path, epochs: int, batch: int) -> dict:
    """The quick start's model, head and optimizer on the small set: ``epochs`` epochs, validated at the end."""
    cfg = {key: dict(value) if isinstance(value, dict) else value for key, value in base.items()}
    cfg["head"]["num_classes"] = None
    cfg["data"].update(root=str(small), batch_size=batch)
    cfg["training"].update(epochs=epochs, warmup_epochs=1, log_every=10**6)
    cfg["checkpoint"]["save_dir"] = str(out)
    cfg["logging"].update(log_dir=str(out / "logs"), tensorboard=False)
    cfg["eval"].update(bin_file=str(held_out), eval_freq=epochs, at_start=False, metrics=["verification"])
    return cfg


def accuracy(metrics: dict) -> tuple[float, float]:
    (values,) = metrics.values()
    return values["accuracy"], values["accuracy_std"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "facecore-bench-finetune",
                        help="folder for data and runs (data is reused between calls)")
    parser.add_argument("--pretrained", type=Path, help="a checkpoint to start from instead of pretraining here")
    parser.add_argument("--kind", choices=sorted(KINDS), default="occluded", help="what the small set's images are like")
    parser.add_argument("--identities", type=int, default=200, help="identities in the small set")
    parser.add_argument("--held-out", type=int, default=100, help="held-out identities (10 images each)")
    parser.add_argument("--pairs", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=10, help="fine-tuning epochs on the small set")
    parser.add_argument("--scratch-epochs", type=int, default=20, help="epochs of training from scratch on the small set")
    parser.add_argument("--freeze-epochs", type=int, default=2, help="head-only epochs at the start of fine-tuning")
    parser.add_argument("--backbone-lr-mult", type=float, default=0.1)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    start, load = time.perf_counter(), os.getloadavg()[0]

    small, held_out = small_sets(args.work / args.kind, KINDS[args.kind], args.identities, args.held_out, args.pairs,
                                 args.seed)
    print(f"small set: {args.identities} {args.kind} identities with 2-4 images each ({small}); "
          f"held out: {args.held_out} identities, {args.pairs} pairs ({held_out})", flush=True)
    if args.pretrained:
        checkpoint, source_accuracy = args.pretrained, None
    else:
        t = time.perf_counter()
        checkpoint, summary = pretrain(args.work, args.seed)
        source_accuracy = accuracy(summary["val_metrics"])
        print(f"pretrained with configs/quickstart.yaml in {time.perf_counter() - t:.0f} s: {checkpoint}", flush=True)
    base = load_config(QUICKSTART)
    cfg = small_set_config(base, small, held_out, args.work / "runs" / f"scratch-{args.kind}", args.scratch_epochs, args.batch)
    t = time.perf_counter()
    scratch = train(validate_config(cfg), verbose=False)
    scratch_s = time.perf_counter() - t

    cfg = small_set_config(base, small, held_out, args.work / "runs" / f"finetune-{args.kind}", args.epochs, args.batch)
    cfg["model"]["pretrained"] = str(checkpoint)
    cfg["training"].update(freeze_backbone_epochs=args.freeze_epochs, backbone_lr_mult=args.backbone_lr_mult)
    cfg["eval"]["at_start"] = True  # the pretrained model before any step: the "no fine-tuning" baseline
    t = time.perf_counter()
    tuned = train(validate_config(cfg), verbose=False)
    tuned_s = time.perf_counter() - t

    rows = [("trained from scratch on the small set", accuracy(scratch["val_metrics"]), f"{scratch['step']} steps, {scratch_s:.0f} s"),
            ("pretrained, not fine-tuned", accuracy(tuned["initial_metrics"]), "-"),
            ("pretrained, fine-tuned on the small set", accuracy(tuned["val_metrics"]),
             f"{tuned['step']} steps ({args.freeze_epochs} epochs head only, backbone LR x {args.backbone_lr_mult}), "
             f"{tuned_s:.0f} s")]
    print(f"\nheld-out {args.kind} identities, {args.pairs} pairs, 10-fold verification accuracy:")
    for name, (acc, std), note in rows:
        print(f"  {name:<42} {100 * acc:5.1f}% +- {100 * std:.1f}   {note}")
    if source_accuracy:
        print(f"  (the pretrained model on its own kind of data, demo-data test.bin: {100 * source_accuracy[0]:.1f}%)")
    best_baseline = max(rows[0][1][0], rows[1][1][0])
    print(f"fine-tuned minus the better baseline: {100 * (rows[2][1][0] - best_baseline):+.1f} points")
    print(f"total {time.perf_counter() - start:.0f} s; load average {load:.1f} at the start, {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()

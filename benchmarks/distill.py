"""Distillation: a small `mobilefacenet` student trained alone and distilled from a larger teacher.

1. Teacher: a wide fastcontextface (4x the quick start's parameters, embedding 256) trained with the
   quick start's recipe (configs/quickstart.yaml) on `facecore demo-data`'s 500 identities (or
   --teacher FILE, its config from the checkpoint).
2. Student: a `mobilefacenet` (embedding 128; --student-options, by default the paper's widths and
   fewer blocks, so it trains in minutes on a CPU) with the same recipe, the same seed and the same
   epochs, once alone and once with `training.distill` (the teacher above; embedding + relational
   terms, a projection 128 -> 256). The same seed gives both the same initial weights and batches.
3. Held-out accuracy of the teacher and both students on the clean and the degraded pairs
   (test.bin, test_degraded.bin from `facecore demo-data --degraded`): 10-fold verification (the
   LFW protocol: each fold's threshold is the best of the other nine folds'), which gives every pair
   a correct/wrong verdict at that model's own thresholds. The gain is the paired difference of
   those verdicts on the same pairs, distilled minus alone, with its standard error
   (std of the per-pair differences / sqrt(pairs)); McNemar's discordant counts are printed too.
4. Cost: one training step of the student (forward, backward, AdamW) with and without the teacher
   and the distillation terms, interleaved on the same batch so machine load hits both alike; the
   load average is printed beside the times.

    facecore demo-data data/quickstart --degraded
    python benchmarks/distill.py                       # everything (the three trainings are most of it)
    python benchmarks/distill.py --part cost           # only the step timing
    python benchmarks/distill.py --teacher runs/bench-distill/teacher/fastcontextface/<time>/last.pth

Trainings already done under --out are reused (delete the folder to train again).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from facecore.core.config import load_config, validate_config

ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = ROOT / "configs" / "quickstart.yaml"
TEACHER = {"backbone": "fastcontextface", "embedding_size": 256, "depths": [1, 1, 2, 1], "dims": [32, 64, 128, 256],
           "dropout": 0.0}
STUDENT = {"backbone": "mobilefacenet", "embedding_size": 128, "scale": 1, "blocks": [1, 2, 3, 1]}
# Not tuned on the held-out pairs: weight 10 puts the terms' gradient on the normalized embeddings in the
# range of CosFace's (scale 16) early in training.
DISTILL = {"loss": ["embedding", "relational"], "weight": 10.0, "warmup_steps": 0}


def loadavg() -> str:
    return "load average " + " ".join(f"{v:.1f}" for v in os.getloadavg())


def base_config(data: Path, out: Path, model: dict, epochs: int | None) -> dict:
    overrides = [f"data.root={data / 'train'}", "eval.bin_file=null", "eval.at_start=false",
                 f"checkpoint.save_dir={out}", f"logging.log_dir={out / 'logs'}", "logging.tensorboard=false"]
    if epochs:
        overrides.append(f"training.epochs={epochs}")
    config = load_config(QUICKSTART, overrides)
    config["model"] = dict(model)
    return validate_config(config)


def trained(out: Path) -> Path | None:
    done = sorted(out.rglob("last.pth"))
    if not done:
        return None
    ckpt = torch.load(done[-1], map_location="cpu", weights_only=True)
    return done[-1] if ckpt["epoch"] >= ckpt["config"]["training"]["epochs"] else None


def train_once(name: str, config: dict, out: Path) -> Path:
    from facecore.train.trainer import train

    found = trained(out)
    if found:
        print(f"  {name}: reusing {found}", flush=True)
        return found
    start = time.perf_counter()
    print(f"  {name}: training {config['model']['backbone']} for {config['training']['epochs']} epoch(s) "
          f"({loadavg()})", flush=True)
    summary = train(config, verbose=False)
    minutes = (time.perf_counter() - start) / 60
    print(f"  {name}: {minutes:.1f} min ({loadavg()})", flush=True)
    return Path(summary["run_dir"]) / "last.pth"


def teacher_section(teacher: Path) -> dict:
    """training.distill.backbone for a facecore checkpoint: its model section, as a teacher section."""
    model = torch.load(teacher, map_location="cpu", weights_only=True)["config"]["model"]
    section = {k: v for k, v in model.items() if k not in ("backbone", "pretrained", "pretrained_skip")}
    return {"type": model["backbone"], **section}


def distilled_config(config: dict, teacher: Path) -> dict:
    config = copy.deepcopy(config)
    config["training"]["distill"] = {"teacher": str(teacher), "backbone": teacher_section(teacher), **DISTILL}
    return validate_config(config)


# -- held-out accuracy, per pair ---------------------------------------------------------------

def pair_embeddings(checkpoint: Path, bin_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Normalized (embedding + mirror's embedding) of every image of the pairs, in pair order, and issame.

    The same embeddings facecore's verification metric scores; each distinct image is embedded once."""
    from facecore.data.binfile import load_bin
    from facecore.data.images import decode_chw, model_input
    from facecore.eval.evaluation import load_trained_backbone

    backbone, _, _ = load_trained_backbone(checkpoint)
    backbone.eval()
    images, issame = load_bin(bin_path)
    keys = [hashlib.sha1(bytes(b)).hexdigest() for b in images]
    unique = dict(zip(keys, images))
    order = list(unique)
    feats = []
    with torch.no_grad():
        for i in range(0, len(order), 128):
            x = model_input(torch.stack([decode_chw(unique[k]) for k in order[i:i + 128]]), str(bin_path))
            feats.append((backbone(x) + backbone(x.flip(3))).float())
    emb = torch.nn.functional.normalize(torch.cat(feats), dim=1).numpy()
    index = {k: i for i, k in enumerate(order)}
    return emb[[index[k] for k in keys]], np.asarray(issame, dtype=bool)


def fold_verdicts(dist: np.ndarray, same: np.ndarray, folds: int = 10) -> np.ndarray:
    """Per pair: correct (1) or not (0) at the threshold chosen on the other folds (the verification metric's grid)."""
    thresholds = np.arange(0.0, 4.0, 0.01)
    n = dist.size
    sizes = [n // folds + (1 if f < n % folds else 0) for f in range(folds)]
    bounds = np.cumsum([0] + sizes)
    predicted = dist[:, None] < thresholds[None, :]
    correct = predicted == same[:, None]  # (pairs, thresholds)
    per_fold = np.stack([correct[bounds[f]:bounds[f + 1]].sum(axis=0) for f in range(folds)])
    out = np.empty(n)
    for f in range(folds):
        k = int(np.argmax(per_fold.sum(axis=0) - per_fold[f]))
        out[bounds[f]:bounds[f + 1]] = correct[bounds[f]:bounds[f + 1], k]
    return out


def accuracy_table(models: dict[str, Path], data: Path) -> dict:
    from facecore_plugins.metrics import Verification

    results: dict = {}
    for set_name in ("test", "test_degraded"):
        verdicts = {}
        for name, checkpoint in models.items():
            emb, same = pair_embeddings(checkpoint, data / f"{set_name}.bin")
            verdicts[name] = fold_verdicts(((emb[0::2] - emb[1::2]) ** 2).sum(axis=1), same)
            reported = Verification()(emb, same)["accuracy"]  # what `facecore eval` prints for this model
            assert abs(verdicts[name].mean() - reported) < 1e-9, (name, set_name, verdicts[name].mean(), reported)
            results.setdefault(set_name, {})[name] = {"accuracy": float(reported)}
        d = verdicts["distilled"] - verdicts["alone"]
        results[set_name]["gain"] = {"mean": float(d.mean()), "se": float(d.std(ddof=1) / np.sqrt(d.size)),
                                     "pairs": int(d.size), "distilled_only": int((d > 0).sum()),
                                     "alone_only": int((d < 0).sum())}
    return results


# -- cost per step -------------------------------------------------------------------------------

def cost(config: dict, steps: int) -> dict:
    """Median seconds of a student step without and with the teacher + distillation terms, interleaved."""
    from facecore.core.build import build_backbone, build_head
    from facecore.core.runtime import DistInfo
    from facecore.train.checkpointing import TrainState
    from facecore.train.classifier import MarginClassifier
    from facecore.train.distill import build_distiller

    torch.manual_seed(0)
    classes = 500
    backbone = build_backbone(config)
    classifier = MarginClassifier(config["model"]["embedding_size"], classes, build_head(config))
    distiller = build_distiller(config, torch.device("cpu"), DistInfo(), TrainState())
    t = config["training"]
    optimizer = torch.optim.AdamW([*backbone.parameters(), *classifier.parameters(), *distiller.parameters()],
                                  lr=t["lr"], weight_decay=t["weight_decay"])
    batch = config["data"]["batch_size"]
    g = torch.Generator().manual_seed(0)
    images = torch.rand(batch, 3, 112, 112, generator=g) * 2 - 1
    labels = torch.randint(0, classes, (batch,), generator=g)

    def step(teach: bool) -> float:
        start = time.perf_counter()
        embeddings = backbone(images)
        terms = classifier.loss_terms(embeddings, labels)
        if teach:
            terms.update(distiller.terms(embeddings, distiller.teacher(images)))
        optimizer.zero_grad(set_to_none=True)
        sum(terms.values()).backward()
        optimizer.step()
        return time.perf_counter() - start

    step(False), step(True)  # warm-up
    before = os.getloadavg()
    alone, taught, teacher_only = [], [], []
    for _ in range(steps):
        alone.append(step(False))
        taught.append(step(True))
        start = time.perf_counter()
        distiller.teacher(images)
        teacher_only.append(time.perf_counter() - start)
    after = os.getloadavg()
    out = {"batch": batch, "threads": torch.get_num_threads(), "alone_s": statistics.median(alone),
           "distilled_s": statistics.median(taught), "teacher_forward_s": statistics.median(teacher_only),
           "load_before": before, "load_after": after}
    out["ratio"] = out["distilled_s"] / out["alone_s"]
    print(f"  student step, batch {batch}: alone {out['alone_s']:.2f} s, with the teacher {out['distilled_s']:.2f} s "
          f"(x{out['ratio']:.2f}); the teacher's forward alone {out['teacher_forward_s']:.2f} s; "
          f"{steps} interleaved steps each, {torch.get_num_threads()} threads, load average "
          f"{' '.join(f'{v:.1f}' for v in before)} -> {' '.join(f'{v:.1f}' for v in after)}", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "quickstart",
                        help="output folder of `facecore demo-data --degraded`")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-distill")
    parser.add_argument("--teacher", type=Path, help="a trained teacher (facecore checkpoint) instead of training one")
    parser.add_argument("--teacher-epochs", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=2, help="epochs of both students")
    parser.add_argument("--student-options", type=json.loads, default={},
                        help='JSON merged into the student\'s model section, e.g. \'{"scale": 2, "blocks": [1, 4, 6, 2]}\'')
    parser.add_argument("--cost-steps", type=int, default=5)
    parser.add_argument("--threads", type=int, help="torch threads for everything (default: torch's)")
    parser.add_argument("--part", choices=["all", "quality", "cost"], default="all")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if not (args.data / "test_degraded.bin").exists():
        raise SystemExit(f"{args.data / 'test_degraded.bin'} is missing: run `facecore demo-data {args.data} --degraded`")
    if args.threads:
        torch.set_num_threads(args.threads)
    results: dict = {"start": loadavg(), "args": vars(args)}
    print(f"distillation benchmark ({loadavg()}, {torch.get_num_threads()} threads)", flush=True)
    teacher = args.teacher or train_once("teacher", base_config(args.data, args.out / "teacher", TEACHER,
                                                                args.teacher_epochs), args.out / "teacher")
    student = base_config(args.data, args.out / "alone", {**STUDENT, **args.student_options}, args.epochs)
    distilled = distilled_config(base_config(args.data, args.out / "distilled", {**STUDENT, **args.student_options},
                                             args.epochs), teacher)
    if args.part in ("all", "cost"):
        print("cost per training step (CPU):", flush=True)
        results["cost"] = cost(distilled, args.cost_steps)
    if args.part in ("all", "quality"):
        models = {"teacher": teacher, "alone": train_once("student alone", student, args.out / "alone"),
                  "distilled": train_once("student distilled", distilled, args.out / "distilled")}
        print("held-out accuracy (10-fold verification, per-pair verdicts at each model's own fold thresholds):",
              flush=True)
        table = accuracy_table(models, args.data)
        results["quality"] = table
        for set_name, label in (("test", "clean"), ("test_degraded", "degraded")):
            row = table[set_name]
            gain = row["gain"]
            print(f"  {label:8s} teacher {100 * row['teacher']['accuracy']:5.1f}%  alone {100 * row['alone']['accuracy']:5.1f}%"
                  f"  distilled {100 * row['distilled']['accuracy']:5.1f}%  gain {100 * gain['mean']:+.1f} ± "
                  f"{100 * gain['se']:.1f} points over {gain['pairs']} pairs (right only when distilled "
                  f"{gain['distilled_only']}, only alone {gain['alone_only']})", flush=True)
    results["end"] = loadavg()
    print(f"done ({loadavg()})", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()

"""Training throughput of facecore's trainer against a bare PyTorch loop on the same parts.

Both use the same backbone, margin classifier, RecordIO data and DataLoader settings in the
same process. The trainer's time per step is taken as (T(warmup + steps) - T(warmup)) / steps
over two complete runs, so model building and the final checkpoint cancel out.

    python benchmarks/train.py                      # both bundled backbones, CPU or CUDA
    python benchmarks/train.py --backbone resnet50 --steps 10
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

import facecore
from facecore.train.classifier import MarginClassifier
from facecore.core.config import validate_config
from facecore.data.packing import pack_rec
from facecore.core.runtime import resolve_device
from facecore.data.synthetic import generate_identity_folder
from facecore.train.trainer import train

CACHE = Path(tempfile.gettempdir()) / "facecore-bench-train"


def dataset(identities: int = 40, per_identity: int = 16) -> Path:
    root = CACHE / f"rec-{identities}x{per_identity}"
    if not (root / "train.rec").exists():
        generate_identity_folder(CACHE / "images", identities, per_identity, seed=0, progress=False)
        pack_rec(CACHE / "images", root, progress=False)
    return root


def config(backbone: str, data: Path, out: Path, batch: int, steps: int, device: str, workers: int) -> dict:
    return validate_config({
        "seed": 0,
        "device": device,
        "model": {"backbone": backbone, "embedding_size": 512},
        "head": {"type": "arcface"},
        "data": {"root": str(data), "batch_size": batch, "num_workers": workers},
        "training": {"epochs": 1000, "max_steps": steps, "lr": 0.01, "scheduler": "constant",
                     "amp": device != "cpu", "log_every": 10**6},
        "checkpoint": {"save_dir": str(out)},
        "logging": {"log_dir": str(out / "logs"), "tensorboard": False},
        "eval": {"bin_file": None},
    })


def framework_seconds_per_step(cfg: dict, warmup: int, steps: int) -> float:
    times = []
    for n in (warmup, warmup + steps):
        cfg["training"]["max_steps"] = n
        start = time.perf_counter()
        train(cfg, verbose=False)
        times.append(time.perf_counter() - start)
    return (times[1] - times[0]) / steps


def bare_seconds_per_step(cfg: dict, warmup: int, steps: int) -> float:
    """The loop anyone would write by hand: no logging, checks, checkpoints or schedules."""
    torch.manual_seed(0)
    device = resolve_device(cfg["device"])
    data = facecore.create("datasets", "recordio", root=cfg["data"]["root"], train=True)
    loader = torch.utils.data.DataLoader(data, batch_size=cfg["data"]["batch_size"], shuffle=True, drop_last=True,
                                         num_workers=cfg["data"]["num_workers"])
    backbone = facecore.create("backbones", cfg["model"]["backbone"], embedding_size=512).to(device)
    classifier = MarginClassifier(512, data.num_classes, facecore.create("heads", "arcface")).to(device)
    amp = device.type == "cuda"
    if amp:
        backbone = backbone.to(memory_format=torch.channels_last)
    params = [p for m in (backbone, classifier) for p in m.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=5e-4)
    done, start = 0, None
    while done < warmup + steps:
        for images, labels in loader:
            if done == warmup:
                if amp:
                    torch.cuda.synchronize()
                start = time.perf_counter()
            images, labels = images.to(device), labels.to(device)
            images = images.float().sub_(127.5).div_(127.5)  # the dataset yields uint8
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                emb = backbone(images)
            loss = classifier(emb.float(), labels)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 5.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            float(loss.detach())  # a hand-written loop prints the loss too
            done += 1
            if done == warmup + steps:
                break
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", action="append", help="default: resnet50 and fastcontextface")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    device = str(resolve_device(args.device))
    data = dataset()
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, "
          f"{args.steps} timed steps after {args.warmup} warmup")
    print(f"{'backbone':16} {'bare img/s':>11} {'facecore img/s':>15} {'overhead':>9}")
    for name in args.backbone or ["resnet50", "fastcontextface"]:
        with tempfile.TemporaryDirectory() as out:
            cfg = config(name, data, Path(out), args.batch, args.steps, device, args.workers)
            bare = bare_seconds_per_step(cfg, args.warmup, args.steps)
            ours = framework_seconds_per_step(cfg, args.warmup, args.steps)
        print(f"{name:16} {args.batch / bare:11.1f} {args.batch / ours:15.1f} {100 * (ours / bare - 1):8.1f}%")


if __name__ == "__main__":
    main()

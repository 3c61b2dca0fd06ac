"""Size, compute and CPU speed of the installed backbones at 112x112 (prints a Markdown table).

GFLOPs are reported the way face-recognition papers do (IR-50: 6.3): multiply-adds x 1e-9,
counted by ``torch.utils.flop_counter.FlopCounterMode`` (which counts 2 FLOPs per
multiply-add, so its total is halved) over one eval-mode forward at batch 1. Speed is the
fastest of the timed steps after warmup (like ``timeit``: other processes only ever slow a
step down), in eval mode under ``torch.no_grad`` and in train mode with forward + backward.

Backbones with a required option are measured only when named with it: ``timm:<model_name>``
measures the ``timm`` bridge around that timm model (timm must be installed).

    python benchmarks/models.py [--backbones resnet50 timm:convnext_atto ...] [--batch-size 32] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import facecore
from facecore.core.plugins import registry


def count_gmacs(model: torch.nn.Module, img_size: int) -> float:
    """Multiply-adds (x 1e-9) of one forward at batch 1, in eval mode.

    Attention runs as its plain matmul formulation here: the counter has no formula for the
    fused CPU attention kernel and would leave attention out of a ViT's count.
    """
    model.eval()
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, img_size, img_size))
    return counter.get_total_flops() / 2 / 1e9


def images_per_second(model: torch.nn.Module, batch: torch.Tensor, train: bool, warmup: int, iters: int) -> float:
    """Throughput of the fastest of ``iters`` timed steps (forward only in eval, forward + backward in train)."""
    model.train(train)
    times = []
    for i in range(warmup + iters):
        start = time.perf_counter()
        if train:
            out = model(batch)
            (out * out).mean().backward()
            model.zero_grad(set_to_none=True)
        else:
            with torch.no_grad():
                model(batch)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return batch.shape[0] / min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", nargs="*", help="names to measure, timm:<model_name> for the timm bridge "
                        "(default: every installed backbone without required options)")
    parser.add_argument("--embedding-size", type=int, default=512)
    parser.add_argument("--img-size", type=int, default=112)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    names = args.backbones or [n for n in facecore.available("backbones")
                                if not (registry("backbones").get(n).schema or {}).get("required")]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {args.threads} torch threads, "
          f"torch {torch.__version__}, batch {args.batch_size}, {args.img_size}x{args.img_size}, "
          f"embedding {args.embedding_size}, load average at start {load:.1f}")
    print("| backbone | params (M) | GFLOPs (GMACs) | eval img/s | train img/s |")
    print("|---|---:|---:|---:|---:|")
    batch = torch.rand(args.batch_size, 3, args.img_size, args.img_size) * 2 - 1
    for name in names:
        backbone, _, model_name = name.partition(":")
        options = {"model_name": model_name} if model_name else {}
        model = facecore.create("backbones", backbone, embedding_size=args.embedding_size, **options)
        params = sum(p.numel() for p in model.parameters()) / 1e6
        gmacs = count_gmacs(model, args.img_size)
        eval_speed = images_per_second(model, batch, False, args.warmup, args.iters)
        train_speed = images_per_second(model, batch, True, args.warmup, args.iters)
        print(f"| {name} | {params:.2f} | {gmacs:.2f} | {eval_speed:.1f} | {train_speed:.1f} |", flush=True)
    if hasattr(os, "getloadavg"):
        print(f"# load average at the end {os.getloadavg()[0]:.1f} (other processes slow the speed columns down)")


if __name__ == "__main__":
    main()

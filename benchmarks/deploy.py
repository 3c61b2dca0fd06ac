"""CPU deployment: PyTorch eager float32, ONNX Runtime float32 and ONNX Runtime int8 (``export --quantize int8``).

Speed needs no training: each backbone (random weights) is exported and quantised with facecore's
own functions, and the three paths are timed at batch 1 and batch 32, interleaved round by round in
one process (the order rotating each round), so the load of a shared machine falls on all three
alike; ratios are taken within a round, then the median over rounds. The load average and the
threads are printed beside the numbers. Also printed: per backbone, which nodes the int8 model
keeps in float, which is where the int8 speed-up stops.

Accuracy needs a trained model (default: the newest quick-start ``best.pth`` and its held-out
``data/quickstart/test.bin``; calibration on the training images, never on the evaluated pairs):
the 10-fold accuracy of each path (each picks its thresholds on the other folds, as ``facecore
eval`` does) and its paired difference to PyTorch float32 on the same pairs with the standard
error, plus the cosine between the int8 and float32 embeddings.

    python benchmarks/deploy.py                                  # speed of the three backbones, quick-start accuracy
    python benchmarks/deploy.py --backbones resnet18 --rounds 5 --threads 1
    python benchmarks/deploy.py --skip-speed --checkpoint runs/quickstart/<...>/best.pth \\
        --bin data/quickstart/test.bin --calibrate data/quickstart/train_images
"""

from __future__ import annotations

import argparse
import glob
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import facecore
from facecore.eval.export import export_onnx
from facecore.eval.onnx_runtime import OnnxModel, metadata
from facecore.eval.quantize import calibration_images, op_counts, quantize_int8

ROOT = Path(__file__).resolve().parent.parent
PATHS = ("torch fp32", "ORT fp32", "ORT int8")


def load() -> str:
    return "load average " + " / ".join(f"{v:.1f}" for v in os.getloadavg())


def build_paths(backbone: torch.nn.Module, work: Path, calibration: np.ndarray, threads: int) -> tuple[dict, str]:
    """The three ways to run ``backbone`` (callables on a float32 NCHW NumPy batch) and what int8 left float."""
    backbone = backbone.cpu().eval()
    fp32, int8 = work / "fp32.onnx", work / "int8.onnx"
    export_onnx(backbone, fp32, check=False)
    quantize_int8(fp32, int8, calibration, work_dir=work)
    counts, left = op_counts(int8)

    def torch_run(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return backbone(torch.from_numpy(x)).numpy()

    paths = {"torch fp32": torch_run, "ORT fp32": _session(fp32, threads), "ORT int8": _session(int8, threads)}
    done = ", ".join(f"{op} {d}/{t}" for op, (d, t) in counts.items() if t)
    float_ops = ", ".join(f"{op} x{n}" for op, n in sorted(left.items(), key=lambda kv: -kv[1]))
    return paths, f"int8: {done}; left in float: {float_ops or 'nothing'}"


def _session(path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda x: session.run(None, {"images": x})[0]


def time_paths(paths: dict, rounds: int, singles: int, seed: int = 0) -> dict:
    """Images/s per path and batch size per round (interleaved), and the int8 ratios per round."""
    rng = np.random.default_rng(seed)
    big = rng.uniform(-1, 1, (32, 3, 112, 112)).astype(np.float32)
    ones = [rng.uniform(-1, 1, (1, 3, 112, 112)).astype(np.float32) for _ in range(singles)]
    for run in paths.values():  # warm-up: first-call allocations and kernel choices
        run(big[:2])
        run(ones[0])
    speed: dict = {(p, b): [] for p in paths for b in (1, 32)}
    order = list(paths)
    for r in range(rounds):
        for name in order[r % len(order):] + order[: r % len(order)]:
            run = paths[name]
            start = time.perf_counter()
            for x in ones:
                run(x)
            speed[(name, 1)].append(singles / (time.perf_counter() - start))
            start = time.perf_counter()
            run(big)
            speed[(name, 32)].append(32 / (time.perf_counter() - start))
        print(f"    round {r + 1}/{rounds}: " + ", ".join(f"{n} b32 {speed[(n, 32)][-1]:.1f}" for n in order)
              + f" img/s ({load()})", flush=True)
    return speed


def speed_table(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    print(f"speed: {args.threads} thread(s) for torch (intra-op) and ONNX Runtime (intra-op, 1 inter-op), "
          f"torch {torch.__version__}, onnxruntime {__import__('onnxruntime').__version__}; {load()}")
    rng = np.random.default_rng(1)
    calibration = rng.uniform(-1, 1, (16, 3, 112, 112)).astype(np.float32)  # ranges do not change the speed
    rows = []
    for name in args.backbones:
        torch.manual_seed(0)
        backbone = facecore.create("backbones", name, embedding_size=512)
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            paths, kept = build_paths(backbone, Path(tmp), calibration, args.threads)
            print(f"  {name}: exported and quantised in {time.perf_counter() - start:.0f} s; {kept}", flush=True)
            speed = time_paths(paths, args.rounds, args.singles)
        rows.append((name, speed, kept))
    print(f"\n| backbone | batch | {' | '.join(PATHS)} (images/s) | int8 / torch | int8 / ORT fp32 |")
    print("|---|---|---|---|---|---|---|")
    for name, speed, _ in rows:
        for batch in (1, 32):
            med = [statistics.median(speed[(p, batch)]) for p in PATHS]
            vs_torch = statistics.median(a / b for a, b in zip(speed[("ORT int8", batch)], speed[("torch fp32", batch)]))
            vs_ort = statistics.median(a / b for a, b in zip(speed[("ORT int8", batch)], speed[("ORT fp32", batch)]))
            print(f"| {name} | {batch} | {' | '.join(f'{v:.1f}' for v in med)} | {vs_torch:.2f}x | {vs_ort:.2f}x |")
    print(f"({args.rounds} interleaved rounds, median; batch 1: {args.singles} single images per round; {load()})")


def fold_correct(embeddings: np.ndarray, issame: np.ndarray, folds: int = 10) -> np.ndarray:
    """Per pair, whether the 10-fold protocol of the ``verification`` metric classifies it correctly (1/0).

    The same folds (contiguous), thresholds (0..4 step 0.01 on squared L2 of the flip-summed, normalized
    embeddings) and choice (best on the other folds, first on ties); its mean is the reported accuracy
    when the folds are equal in size.
    """
    a, b = embeddings[0::2].astype(np.float64), embeddings[1::2].astype(np.float64)
    dist = np.sum((a - b) ** 2, axis=1)
    n = dist.size
    thresholds = np.arange(0.0, 4.0, 0.01)
    bounds = np.cumsum([0] + [n // folds + (1 if f < n % folds else 0) for f in range(folds)])
    hits = (dist[:, None] < thresholds[None, :]) == issame[:, None]  # (pairs, thresholds)
    per_fold = np.stack([hits[bounds[f] : bounds[f + 1]].sum(axis=0) for f in range(folds)])
    out = np.empty(n)
    for f in range(folds):
        k = int(np.argmax(per_fold.sum(axis=0) - per_fold[f]))
        out[bounds[f] : bounds[f + 1]] = hits[bounds[f] : bounds[f + 1], k]
    return out


def newest(pattern: str) -> str | None:
    found = sorted(glob.glob(str(ROOT / pattern)), key=os.path.getmtime)
    return found[-1] if found else None


def accuracy_table(args: argparse.Namespace) -> None:
    from facecore.core.build import build_metrics, build_pair_set
    from facecore.eval.evaluation import embed, evaluate_embeddings, l2_normalize, load_trained_backbone
    from facecore.eval.quantize import export_int8

    checkpoint = args.checkpoint or newest("runs/quickstart/*/*/best.pth")
    if not checkpoint or not Path(args.bin).is_file() or not Path(args.calibrate).exists():
        print(f"\naccuracy: skipped (needs --checkpoint, --bin and --calibrate; found checkpoint {checkpoint}, "
              f"bin {args.bin}, calibration {args.calibrate}): run `make quickstart` first")
        return
    torch.set_num_threads(args.threads)
    backbone, config, _ = load_trained_backbone(checkpoint, None, ())
    dataset = build_pair_set(config, args.bin)
    issame = np.asarray(dataset.issame, dtype=bool)
    images, label = calibration_images(args.calibrate, config["data"]["img_size"], args.calibration_images)
    print(f"\naccuracy: {checkpoint} ({config['model']['backbone']}) on {args.bin} ({issame.size} pairs); "
          f"int8 calibrated on {label}; {load()}")
    embeddings, seconds = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        export_onnx(backbone, Path(tmp) / "fp32.onnx", metadata=metadata(config))
        _, report = export_int8(backbone, Path(tmp) / "int8.onnx", images, label,
                                img_size=config["data"]["img_size"], metadata=metadata(config, quantized="int8"))
        print("  " + "\n  ".join(report.lines()[1:]))
        models = {"torch fp32": backbone, "ORT fp32": OnnxModel(Path(tmp) / "fp32.onnx", threads=args.threads),
                  "ORT int8": OnnxModel(Path(tmp) / "int8.onnx", threads=args.threads)}
        for name, model in models.items():  # the embedding pass of `facecore eval`, one model after another
            start = time.perf_counter()
            plain, mirrored = embed(model, dataset, 64, torch.device("cpu"))
            seconds[name] = time.perf_counter() - start
            embeddings[name] = l2_normalize(plain + mirrored)
    metrics = build_metrics(config)
    correct = {name: fold_correct(e, issame) for name, e in embeddings.items()}
    print("\n| path | accuracy (10-fold) | paired difference to torch fp32 (± SE) | pairs that differ | "
          "embedding pass (s) |")
    print("|---|---|---|---|---|")
    for name, e in embeddings.items():
        reported = evaluate_embeddings(e, None, issame, metrics)["accuracy"]
        assert abs(reported - correct[name].mean()) < 1e-9 or issame.size % 10, (reported, correct[name].mean())
        diff = correct[name] - correct["torch fp32"]
        se = diff.std(ddof=1) / np.sqrt(diff.size)
        print(f"| {name} | {100 * reported:.2f}% | {100 * diff.mean():+.2f} ± {100 * se:.2f} points | "
              f"{int(np.count_nonzero(diff))} | {seconds[name]:.0f} |")
    cos = np.sum(embeddings["ORT int8"] * embeddings["ORT fp32"], axis=1)
    print(f"cosine of int8 and float32 embeddings (flip-summed, normalized) over {cos.size} images: mean {cos.mean():.4f}, "
          f"min {cos.min():.4f}; {load()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", type=lambda s: s.split(","), default=["mobilefacenet", "resnet18", "resnet50"])
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (median reported)")
    parser.add_argument("--singles", type=int, default=8, help="single-image calls per round for batch 1")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--skip-accuracy", action="store_true")
    parser.add_argument("--checkpoint", help="trained checkpoint (default: newest runs/quickstart/*/*/best.pth)")
    parser.add_argument("--bin", default=str(ROOT / "data/quickstart/test.bin"), help="held-out pairs")
    parser.add_argument("--calibrate", default=str(ROOT / "data/quickstart/train_images"),
                        help="calibration images (.bin or folder): the training images, not the evaluated pairs")
    parser.add_argument("--calibration-images", type=int, default=200)
    args = parser.parse_args()
    if not args.skip_speed:
        speed_table(args)
    if not args.skip_accuracy:
        accuracy_table(args)


if __name__ == "__main__":
    main()

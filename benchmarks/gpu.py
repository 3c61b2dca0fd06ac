"""GPU benchmark: facecore's trainer against a bare PyTorch loop on the same IR-50, head and data, in one table.

Rows (each a separate measurement; a failing one prints its error and the others go on):

- IR-50 (``resnet50``) training images/s with bf16 autocast and channels_last at batch 128 and
  256: facecore's trainer vs a hand-written loop over the same backbone, ArcFace classifier,
  RecordIO data and DataLoader settings (overhead %), peak memory, and the host syncs per step
  inside facecore's loop (``torch.cuda.set_sync_debug_mode``); then the same with
  ``torch.compile`` (``training.compile: true``), run last because compiling takes the longest;
- fp16 autocast with a GradScaler (its inf check reads one flag per step: a sync by design);
- embedding images/s of the validation pass (each image and its mirror, float32);
- the classifier alone with 2,000,000 classes on one rank, Partial FC sample_rate 0.1 (and 1.0):
  step time (forward, backward, SGD step) and peak memory.

facecore is timed from its own log windows (``training.log_every`` steps between two reads of
the loss, the first window -- warm-up, cuDNN autotuning, compiling -- left out); the bare loop
with ``torch.cuda.synchronize`` around the same number of steps after the same warm-up. Both
read the loss every ``log_every`` steps. Peak memory is ``torch.cuda.max_memory_allocated``.

    bash benchmarks/gpu.sh                           # on the GPU machine: wheels, CUDA tests, this
    python3 benchmarks/gpu.py --json results.json    # this alone (jsonschema must be importable)
    python3 benchmarks/gpu.py --device cpu --quick   # tiny sizes on the CPU: the script end to end

Runs from a plain checkout: ``checkout.py`` makes facecore and its plugins importable when the
package is not installed. The whole run is meant to stay under 8 minutes on one H200; rows
that would start after ``--budget`` seconds are reported as skipped.
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from checkout import ensure_importable  # noqa: E402

ensure_importable()

import numpy as np  # noqa: E402
import torch  # noqa: E402

import facecore  # noqa: E402
from facecore.core.config import validate_config  # noqa: E402
from facecore.data.binfile import write_bin  # noqa: E402
from facecore.data.recordio import RecordWriter, pack  # noqa: E402
from facecore.train import trainer as trainer_module  # noqa: E402
from facecore.train.classifier import MarginClassifier, ShardedMarginClassifier  # noqa: E402

EMBEDDING = 512
GIB = 2**30


@dataclass
class Settings:
    """Sizes of one benchmark run (``--quick`` shrinks them for the CPU)."""

    device: str
    backbone: str = "resnet50"
    backbone_options: dict = field(default_factory=dict)
    batches: tuple[int, ...] = (128, 256)
    log_every: int = 10
    warm_windows: int = 1
    timed_windows: int = 3
    workers: int = 12
    identities: int = 1000
    classes: int = 2_000_000
    sample_rates: tuple[float, ...] = (0.1, 1.0)
    classifier_steps: int = 20
    eval_pairs: int = 6000
    eval_batch: int = 256
    compile: bool = True
    budget: float = 420.0

    @property
    def steps(self) -> int:
        return (self.warm_windows + self.timed_windows) * self.log_every

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")


def quick_settings(device: str) -> Settings:
    return Settings(device=device, backbone="fastcontextface",
                    backbone_options={"depths": [1, 1, 1, 1], "dims": [8, 16, 16, 32]},
                    batches=(4, 8), log_every=1, warm_windows=1, timed_windows=2, workers=2, identities=8,
                    classes=2_000, classifier_steps=2, eval_pairs=16, eval_batch=8, budget=600.0)


# -- data ----------------------------------------------------------------------------------------
def make_data(folder: Path, images: int, identities: int, pairs: int, size: int = 112) -> tuple[Path, Path]:
    """A plain-layout RecordIO set of ``images`` face-sized JPEGs (smooth blobs, ~5 KB) and a .bin of ``pairs``."""
    from PIL import Image

    rec = folder / f"rec-{images}x{identities}"
    bin_path = folder / f"pairs-{pairs}.bin"
    if (rec / "property").exists() and bin_path.exists():
        return rec, bin_path
    rec.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    low = rng.uniform(30, 225, size=(identities, 8, 8, 3)).astype(np.uint8)
    bases = np.stack([np.asarray(Image.fromarray(x).resize((size, size), Image.BICUBIC), dtype=np.int16) for x in low])
    noise = rng.normal(0, 6, size=(16, size, size, 3)).astype(np.int16)
    payloads = []
    with RecordWriter(rec / "train.rec", rec / "train.idx") as writer:
        for key in range(images):
            cls = key % identities
            shift = rng.integers(-20, 21, size=3).astype(np.int16)
            img = np.clip(bases[cls] + noise[key % 16] + shift, 0, 255).astype(np.uint8)
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="JPEG", quality=90)
            if len(payloads) < 2 * pairs:
                payloads.append(buf.getvalue())
            writer.write(key, pack(float(cls), buf.getvalue(), id=key))
    (rec / "property").write_text(f"{identities},{size},{size}\n")
    while len(payloads) < 2 * pairs:  # a set smaller than the pair set: reuse images
        payloads.extend(payloads[: 2 * pairs - len(payloads)])
    write_bin(bin_path, payloads, [bool(i % 2) for i in range(pairs)])
    return rec, bin_path


# -- measuring -----------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None


class SyncCounter:
    """Counts host syncs inside facecore's training loop (``Trainer._train_epoch``) on CUDA.

    ``torch.cuda.set_sync_debug_mode('warn')`` makes every synchronizing call (``.item()``, a
    device-to-host copy, ``nonzero`` ...) raise a warning, counted here. CPU: counts nothing.
    """

    def __init__(self, device: torch.device):
        self.device, self.count = device, 0

    def __enter__(self) -> SyncCounter:
        self.original = trainer_module.Trainer._train_epoch
        if self.device.type != "cuda":
            return self
        counter, original = self, self.original

        def counted(trainer: Any, *args: Any, **kwargs: Any) -> bool:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    return original(trainer, *args, **kwargs)
                finally:
                    torch.cuda.set_sync_debug_mode("default")
                    counter.count += sum("synchroniz" in str(w.message) for w in caught)

        trainer_module.Trainer._train_epoch = counted
        return self

    def __exit__(self, *exc: object) -> None:
        trainer_module.Trainer._train_epoch = self.original


def facecore_run(s: Settings, data: Path, batch: int, amp: str, compile: bool) -> dict:
    """Images/s of facecore's trainer from its log windows after the first; peak memory; syncs per step."""
    device = torch.device(s.device)
    out = Path(tempfile.mkdtemp(prefix="facecore-gpu-bench-"))
    try:
        cfg = validate_config({
            "seed": 0,
            "device": s.device,
            "model": {"backbone": s.backbone, "embedding_size": EMBEDDING, **s.backbone_options},
            "head": {"type": "arcface"},
            "data": {"root": str(data), "batch_size": batch, "num_workers": s.workers},
            "training": {"epochs": 1000, "max_steps": s.steps, "lr": 0.1, "scheduler": "cosine", "amp": amp,
                         "log_every": s.log_every, "compile": compile},
            "checkpoint": {"save_dir": str(out / "runs")},
            "logging": {"log_dir": str(out / "logs"), "tensorboard": False},
            "eval": {"bin_file": None},
        })
        reset_memory(device)
        with SyncCounter(device) as syncs:
            summary = trainer_module.train(cfg, verbose=False)
        peak = peak_gib(device)
        lines = (Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()
        windows = [r for r in map(json.loads, lines) if r["event"] == "train" and r["step"] > s.warm_windows * s.log_every]
        if not windows:
            raise RuntimeError("the run logged no window after the warm-up")
        images = s.log_every * batch
        seconds = sum(images / w["images_per_s"] for w in windows)
        return {"images_per_s": len(windows) * images / seconds, "peak_gib": peak,
                "syncs_per_step": syncs.count / s.steps if device.type == "cuda" else None,
                "final_loss": windows[-1]["loss"]}
    finally:
        shutil.rmtree(out, ignore_errors=True)
        if compile:
            torch._dynamo.reset()


def bare_run(s: Settings, data: Path, batch: int, amp: str, compile: bool) -> dict:
    """The loop anyone would write by hand over the same parts: no checks, checkpoints or schedules."""
    from torch.utils.data import DataLoader

    device = torch.device(s.device)
    reset_memory(device)
    torch.manual_seed(0)
    torch.backends.cudnn.benchmark = device.type == "cuda"
    dataset = facecore.create("datasets", "recordio", root=str(data))
    loader = DataLoader(dataset, batch_size=batch, shuffle=True, drop_last=True, num_workers=s.workers,
                        pin_memory=device.type == "cuda", persistent_workers=s.workers > 0)
    backbone = facecore.create("backbones", s.backbone, embedding_size=EMBEDDING, **s.backbone_options).to(device)
    classifier = MarginClassifier(EMBEDDING, dataset.num_classes, facecore.create("heads", "arcface")).to(device)
    classifier.checks_labels = False  # a hand-written loop does not read its labels back
    if device.type == "cuda":
        backbone = backbone.to(memory_format=torch.channels_last)
    net = torch.compile(backbone) if compile else backbone
    params = [p for m in (backbone, classifier) for p in m.parameters()]
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=5e-4)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    use_amp = dtype is not None and (device.type == "cuda" or amp == "bf16")
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and dtype == torch.float16)
    batches = iter(loader)
    start, loss_value = 0.0, None
    try:
        for step in range(s.steps):
            if step == s.warm_windows * s.log_every:
                sync(device)
                start = time.perf_counter()
            images, labels = next(batches)
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            images = images.float().sub_(127.5).div_(127.5)
            flip = torch.rand(images.shape[0], device=device) < 0.5
            images = torch.where(flip[:, None, None, None], images.flip(3), images)
            if device.type == "cuda":
                images = images.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=use_amp):
                embeddings = net(images)
            loss = classifier(embeddings.float(), labels)
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(params, 5.0)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            if (step + 1) % s.log_every == 0:
                loss_value = loss.item()  # a hand-written loop prints its loss now and then
        sync(device)
        seconds = time.perf_counter() - start
    finally:
        del batches, loader
        if compile:
            torch._dynamo.reset()
    timed = s.timed_windows * s.log_every
    return {"images_per_s": timed * batch / seconds, "peak_gib": peak_gib(device), "final_loss": loss_value}


def eval_run(s: Settings, bin_path: Path) -> dict:
    """Images/s of the validation embedding pass (each image and its mirror) over a .bin pair set."""
    from facecore.eval.evaluation import embed

    device = torch.device(s.device)
    reset_memory(device)
    pairs = facecore.create("datasets", "bin-pairs", path=str(bin_path))
    backbone = facecore.create("backbones", s.backbone, embedding_size=EMBEDDING, **s.backbone_options).to(device)
    if device.type == "cuda":
        backbone = backbone.to(memory_format=torch.channels_last)
    embed(backbone, torch.utils.data.Subset(pairs, range(min(len(pairs), 4 * s.eval_batch))), s.eval_batch, device,
          num_workers=s.workers)  # warm-up: cuDNN autotuning, worker start
    sync(device)
    start = time.perf_counter()
    plain, _ = embed(backbone, pairs, s.eval_batch, device, num_workers=s.workers)
    seconds = time.perf_counter() - start
    return {"images_per_s": len(plain) / seconds, "images": len(plain), "peak_gib": peak_gib(device)}


def classifier_run(s: Settings, sample_rates: tuple[float, ...], batch: int) -> list[dict]:
    """Step time (forward, backward, SGD step) and peak memory of the classifier with ``s.classes`` centers,
    for each sample rate (the centers are drawn once: 2M x 512 normal numbers take a while on the CPU)."""
    device = torch.device(s.device)
    reset_memory(device)
    built = time.perf_counter()
    classifier = ShardedMarginClassifier(EMBEDDING, s.classes, facecore.create("heads", "arcface")).to(device)
    classifier.checks_labels = False  # as in the trainer, which checks labels on the host
    build_seconds = time.perf_counter() - built
    gen = torch.Generator(device=device).manual_seed(0)
    embeddings = torch.randn(batch, EMBEDDING, device=device, generator=gen).requires_grad_(True)
    labels = torch.randint(0, s.classes, (batch,), device=device, generator=gen)
    warm = max(2, s.classifier_steps // 4)
    results = []
    for rate in sample_rates:
        classifier.sample_rate = rate
        opt = torch.optim.SGD(classifier.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        for step in range(warm + s.classifier_steps):
            if step == warm:
                sync(device)
                start = time.perf_counter()
            loss = classifier(embeddings, labels)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        sync(device)
        ms = 1000 * (time.perf_counter() - start) / s.classifier_steps
        results.append({"sample_rate": rate, "ms_per_step": ms, "peak_gib": peak_gib(device), "build_s": build_seconds})
        del opt
    return results


# -- the table -----------------------------------------------------------------------------------
@dataclass
class Row:
    what: str
    batch: int | None = None
    facecore: str = ""
    bare: str = ""
    overhead: str = ""
    peak: str = ""
    syncs: str = ""
    note: str = ""
    numbers: dict = field(default_factory=dict)


def fmt_rate(result: dict) -> str:
    return f"{result['images_per_s']:,.0f} img/s"


def fmt_gib(value: float | None) -> str:
    return f"{value:.1f}" if value is not None else "-"


def guarded(rows: list[Row], row: Row, started: float, s: Settings, need: float, fn: Callable[[Row], None]) -> None:
    """Run one measurement into ``row``; skipped past the budget, an error noted instead of raised."""
    rows.append(row)
    left = s.budget - (time.perf_counter() - started)
    if left < need:
        row.note = f"skipped: {left:.0f} s of the {s.budget:.0f} s budget left"
        return
    t0 = time.perf_counter()
    try:
        fn(row)
    except Exception as exc:  # one broken measurement must not hide the others
        row.note = f"error: {type(exc).__name__}: {str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ''}"
        traceback.print_exc()
    row.numbers["seconds"] = round(time.perf_counter() - t0, 1)
    print(f"[{time.perf_counter() - started:6.0f} s] {row.what} b{row.batch}: {row.facecore} {row.bare} {row.note}",
          flush=True)


def training_row(s: Settings, data: Path, amp: str, compile: bool, batch: int) -> Callable[[Row], None]:
    """A measurement filling a row with facecore's and the bare loop's training rates."""
    def measure(row: Row) -> None:
        ours = facecore_run(s, data, batch, amp, compile)
        row.facecore, row.numbers["facecore"] = fmt_rate(ours), ours
        row.syncs = f"{ours['syncs_per_step']:.2f}" if ours["syncs_per_step"] is not None else "-"
        bare = bare_run(s, data, batch, amp, compile)
        row.bare, row.numbers["bare"] = fmt_rate(bare), bare
        row.overhead = f"{100 * (bare['images_per_s'] / ours['images_per_s'] - 1):+.1f}%"
        row.peak = f"{fmt_gib(ours['peak_gib'])} / {fmt_gib(bare['peak_gib'])}"

    return measure


def print_table(rows: list[Row]) -> None:
    header = ["measurement", "batch", "facecore", "bare loop", "overhead", "peak GiB fc / bare", "syncs/step", "note"]
    table = [header] + [[r.what, str(r.batch or ""), r.facecore, r.bare, r.overhead, r.peak, r.syncs, r.note] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    for n, line in enumerate(table):
        print(" | ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip())
        if n == 0:
            print("-|-".join("-" * w for w in widths))


def environment(s: Settings) -> dict:
    env = {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
           "facecore": facecore.__version__, "date": time.strftime("%Y-%m-%d %H:%M")}
    if s.cuda:
        props = torch.cuda.get_device_properties(torch.device(s.device))
        env.update(gpu=torch.cuda.get_device_name(torch.device(s.device)), gpu_memory_gib=round(props.total_memory / GIB, 1),
                   capability=f"{props.major}.{props.minor}", cuda=torch.version.cuda,
                   cudnn=torch.backends.cudnn.version())
    return env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a small backbone, few steps) to check the script")
    parser.add_argument("--no-compile", action="store_true", help="leave out the torch.compile rows")
    parser.add_argument("--workers", type=int, help="DataLoader workers (default: min(12, CPUs - 2))")
    parser.add_argument("--budget", type=float, help="seconds after which remaining rows are skipped (default 420)")
    parser.add_argument("--data", default=str(Path(tempfile.gettempdir()) / "facecore-gpu-bench"), help="cache folder")
    parser.add_argument("--json", default=str(Path(tempfile.gettempdir()) / "facecore-gpu-bench.json"),
                        help="where to write every number as JSON")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("no CUDA device here: run with --device cpu --quick to check the script on the CPU")
    s = quick_settings(args.device) if args.quick else Settings(device=args.device)
    s.workers = args.workers if args.workers is not None else min(s.workers, max(1, (os.cpu_count() or 2) - 2))
    s.compile = s.compile and not args.no_compile
    s.budget = args.budget or s.budget
    started = time.perf_counter()
    images = max(s.batches) * s.steps + max(s.batches)
    data, bin_path = make_data(Path(args.data), images, s.identities, s.eval_pairs)
    env = environment(s)
    print(f"{env.get('gpu', 'CPU')}: torch {env['torch']}, CUDA {env.get('cuda', '-')}, {env['cpus']} CPUs, "
          f"{s.workers} loader workers; data ready in {time.perf_counter() - started:.0f} s ({images} images)", flush=True)

    big = max(s.batches)
    amp = "bf16"
    rows: list[Row] = []
    for batch in s.batches:
        guarded(rows, Row(f"{s.backbone} train, {amp}, channels_last", batch), started, s, 30,
                training_row(s, data, amp, False, batch))
    fp16 = Row(f"{s.backbone} train, fp16 + GradScaler", big)
    guarded(rows, fp16, started, s, 30, training_row(s, data, "fp16", False, big))
    if not s.cuda:
        fp16.note = fp16.note or "CPU: fp16 falls back to float32"

    def measure_eval(row: Row) -> None:
        result = eval_run(s, bin_path)
        row.facecore, row.peak, row.numbers["facecore"] = fmt_rate(result), fmt_gib(result["peak_gib"]), result
        row.note = f"{result['images']} images, each with its mirror, float32"

    guarded(rows, Row(f"{s.backbone} embedding (validation pass)", s.eval_batch), started, s, 20, measure_eval)
    classifier_rows = [Row(f"classifier {s.classes:,} classes, 1 rank, sample_rate {rate}", big) for rate in s.sample_rates]

    def measure_classifiers(first: Row) -> None:  # fills every classifier row: the centers are built once
        for row, result in zip(classifier_rows, classifier_run(s, s.sample_rates, big)):
            row.facecore, row.peak, row.numbers["facecore"] = f"{result['ms_per_step']:.2f} ms/step", fmt_gib(result["peak_gib"]), result
            row.note = f"forward + backward + SGD step; centers built in {result['build_s']:.0f} s"

    guarded(rows, classifier_rows[0], started, s, 40, measure_classifiers)
    for row in classifier_rows[1:]:
        row.note = row.note or classifier_rows[0].note
        rows.append(row)
    if s.compile:
        for batch in s.batches:
            guarded(rows, Row(f"{s.backbone} train, {amp}, channels_last, compile", batch), started, s, 150,
                    training_row(s, data, amp, True, batch))
    else:
        rows.append(Row(f"{s.backbone} train, compile", note="left out (--no-compile)"))

    total = time.perf_counter() - started
    print(f"\nfacecore GPU benchmark, {env.get('gpu', 'CPU (' + platform.machine() + ')')}, torch {env['torch']}, "
          f"{total:.0f} s in all. overhead = bare img/s / facecore img/s - 1 (negative: facecore faster). "
          f"facecore: {s.timed_windows} log windows of {s.log_every} steps after {s.warm_windows} warm-up window(s); "
          f"bare loop: the same steps after the same warm-up.")
    print_table(rows)
    report = {"environment": env, "settings": asdict(s), "seconds": round(total, 1),
              "rows": [asdict(r) for r in rows]}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=1, default=str))
    print(f"\nall numbers: {args.json}")


if __name__ == "__main__":
    main()

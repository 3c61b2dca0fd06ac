"""What the loggers (logging.loggers) cost the training thread, and that a slow tracker costs it nothing more.

1. One record (a log window's numbers) handed to the loggers: microseconds per call on the training
   thread, for TensorBoard and for a logger that hangs (its queue only grows).
2. A tiny CPU training logging every step (the worst case): its speed (the median images/s of the
   log lines, so building and the bounded wait at the end do not count) with no logger, with
   TensorBoard, and with a tracker that takes 0.5 s per call (an unreachable server), in rounds
   interleaved so the machine's load falls on all three alike; the ratios to no logger.

    python benchmarks/loggers.py              # about a minute on 2 cores
    python benchmarks/loggers.py --rounds 3 --steps 40
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

from facecore import hookimpl
from facecore.core import plugins
from facecore.core.config import validate_config
from facecore.core.loggers import RunInfo, Trackers
from facecore.data.packing import pack_rec
from facecore.data.synthetic import generate_identity_folder
from facecore.train.trainer import train

CACHE = Path(tempfile.gettempdir()) / "facecore-bench-loggers"


class Slow:
    """A tracker whose every call takes ``seconds`` (a server that times out)."""

    def __init__(self, seconds: float = 0.5):
        self.seconds = seconds

    def scalars(self, prefix, values, step):
        time.sleep(self.seconds)


class SlowPlugin:
    @hookimpl
    def register_loggers(self, register):
        register("bench-slow", Slow, description="0.5 s per call", schema={
            "type": "object", "additionalProperties": False,
            "properties": {"seconds": {"type": "number", "default": 0.5}}})


def per_record_microseconds(loggers: list, calls: int, folder: Path) -> float:
    trackers = Trackers(loggers, timeout=0.5, report=lambda _: None)
    trackers.start(RunInfo("train", "bench/run", folder, folder, {"logging": {}}))
    values = {"loss": 1.0, "lr": 0.1, "images_per_s": 100.0}
    start = time.perf_counter()
    for step in range(calls):
        trackers.scalars("train", values, step)
    elapsed = time.perf_counter() - start
    trackers.finish("finished")
    return 1e6 * elapsed / calls


def dataset() -> Path:
    root = CACHE / "rec"
    if not (root / "train.rec").exists():
        generate_identity_folder(CACHE / "images", 10, 16, seed=0, progress=False)
        pack_rec(CACHE / "images", root, progress=False)
    return root


def seconds_per_step(data: Path, out: Path, loggers: list, steps: int) -> float:
    cfg = validate_config({
        "seed": 0, "device": "cpu",
        "model": {"backbone": "fastcontextface", "embedding_size": 32, "depths": [1, 1, 1, 1], "dims": [8, 16, 16, 32]},
        "head": {"type": "arcface"},
        "data": {"root": str(data), "batch_size": 16, "num_workers": 0},
        "training": {"epochs": 1000, "max_steps": steps, "lr": 0.01, "scheduler": "constant", "log_every": 1},
        "checkpoint": {"save_dir": str(out / "runs")},
        "logging": {"log_dir": str(out / "logs"), "loggers": loggers, "logger_timeout": 0.5},
        "eval": {"bin_file": None},
    })
    summary = train(cfg, verbose=False)
    lines = [json.loads(x) for x in (Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    speeds = [x["images_per_s"] for x in lines if x["event"] == "train"][1:]  # the first window includes warm-up
    return 16 / statistics.median(speeds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    from facecore_plugins.tensorboard_logger import TensorBoardLogger

    print(f"load average before: {os.getloadavg()}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        release = threading.Event()

        class Hung:
            def scalars(self, prefix, values, step):
                release.wait()

        tb = per_record_microseconds([("tensorboard", TensorBoardLogger())], 2000, folder)
        hung = per_record_microseconds([("hung", Hung())], 2000, folder)
        release.set()
        print(f"one record on the training thread: {tb:.1f} us with tensorboard, {hung:.1f} us with a hung tracker")

        plugins.pm.register(SlowPlugin(), name="bench-slow")
        try:
            data = dataset()
            kinds = {"none": [], "tensorboard": ["tensorboard"], "slow tracker (0.5 s/call)": ["bench-slow"]}
            times: dict[str, list[float]] = {k: [] for k in kinds}
            seconds_per_step(data, folder / "warmup", [], args.steps)
            for r in range(args.rounds):
                for kind, loggers in kinds.items():
                    times[kind].append(seconds_per_step(data, folder / f"{r}-{len(times[kind])}-{kind[:4]}", loggers,
                                                        args.steps))
        finally:
            plugins.pm.unregister(name="bench-slow")
        base = statistics.median(times["none"])
        print(f"training, log_every 1, {args.steps} steps x {args.rounds} rounds (median seconds per step):")
        for kind, values in times.items():
            med = statistics.median(values)
            print(f"  {kind:28s} {1000 * med:7.1f} ms/step   x{med / base:.2f}")
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()

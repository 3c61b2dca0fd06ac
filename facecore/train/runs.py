"""Run directories and what a run writes: effective config, log file, metrics.jsonl, TensorBoard."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from ..core.config import dump_config
from ..core.tensorboard import TensorBoard
from ..errors import CheckpointError

LOGGER_NAME = "facecore"


def new_run_dir(save_dir: str | Path, backbone: str) -> Path:
    """``save_dir/<backbone>/<timestamp>/``, unique even when two runs start in the same second."""
    base = Path(save_dir) / backbone
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path, n = base / stamp, 1
    while path.exists():
        n += 1
        path = base / f"{stamp}-{n}"
    path.mkdir(parents=True)
    return path


def newest_checkpoint(save_dir: str | Path) -> Path:
    """``last.pth`` of the most recently written run under ``save_dir`` (any backbone)."""
    candidates = sorted(Path(save_dir).glob("*/*/last.pth"), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise CheckpointError(
            f"--resume found no run to continue: no */*/last.pth under checkpoint.save_dir ({save_dir}); "
            "pass --resume PATH or start without --resume"
        )
    return candidates[-1]


def setup_logging(log_files: list[Path], verbose: bool = True) -> logging.Logger:
    """A 'facecore' logger writing to the console and to each of ``log_files``."""
    logger = logging.getLogger(LOGGER_NAME)
    logger.setLevel(logging.INFO)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")
    if verbose:
        console = logging.StreamHandler()
        console.setFormatter(fmt)
        logger.addHandler(console)
    for path in log_files:
        path.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(path)
        handler.setFormatter(fmt)
        logger.addHandler(handler)
    logger.propagate = False
    return logger


class RunWriter:
    """Everything rank 0 records about a run besides checkpoints."""

    def __init__(self, run_dir: Path, tb_dir: Path | None):
        self.run_dir = run_dir
        self.metrics_path = run_dir / "metrics.jsonl"
        self.tb = TensorBoard(tb_dir) if tb_dir is not None else None

    def write_config(self, config: dict) -> None:
        (self.run_dir / "config.yaml").write_text(dump_config(config))

    def record(self, event: str, step: int, epoch: int, values: dict[str, Any], tb_prefix: str | None = None) -> None:
        """One line of metrics.jsonl, and the same numbers as TensorBoard scalars."""
        line = {"event": event, "epoch": epoch, "step": step, "time": round(time.time(), 3), **values}
        with self.metrics_path.open("a") as fh:
            fh.write(json.dumps(line, default=float) + "\n")
        if self.tb is not None and tb_prefix is not None:
            self.tb.scalars(tb_prefix, values, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()

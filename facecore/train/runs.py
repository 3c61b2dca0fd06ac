"""Run directories and what a run writes: effective config, log file, metrics.jsonl, and what the loggers get."""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from ..core.checkpoint import NUMBERED_GLOB, check_training_checkpoint, numbered_checkpoints
from ..core.config import dump_config
from ..core.loggers import LEDGER, Record, RunInfo, Trackers
from ..errors import CheckpointError, FacecoreError

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


def newest_checkpoint(save_dir: str | Path, logger: logging.Logger | None = None) -> Path:
    """The checkpoint to continue the most recently written run under ``save_dir`` (any backbone) from.

    That run is the one whose ``last.pth`` or numbered checkpoint (``checkpoint.keep``) was written
    last. Its ``last.pth`` is used when intact (every record's checksum, then a load); a damaged or
    missing one is named in a warning on ``logger`` (facecore's by default) with the reason, and the
    newest intact numbered checkpoint, then ``best.pth``, is used instead. Nothing intact is a
    CheckpointError listing every file tried and why.
    """
    logger = logger or logging.getLogger(LOGGER_NAME)
    written: dict[Path, int] = {}
    for pattern in ("*/*/last.pth", f"*/*/{NUMBERED_GLOB}"):
        for path in Path(save_dir).glob(pattern):
            try:
                written[path.parent] = max(written.get(path.parent, 0), path.stat().st_mtime_ns)
            except OSError:  # deleted meanwhile
                continue
    if not written:
        raise CheckpointError(
            f"--resume found no run to continue: no */*/last.pth under checkpoint.save_dir ({save_dir}); "
            "pass --resume PATH or start without --resume"
        )
    run = max(written, key=lambda r: written[r])
    skipped: list[str] = []
    seen: dict[tuple[int, int], Path] = {}
    for path in [run / "last.pth", *numbered_checkpoints(run), run / "best.pth"]:
        try:
            st = path.stat()
        except FileNotFoundError:
            if path.name == "last.pth":
                skipped.append(f"{path}: not found")
            continue
        if (st.st_dev, st.st_ino) in seen:
            skipped.append(f"{path}: the same file as {seen[st.st_dev, st.st_ino].name} (a hard link)")
            continue
        seen[st.st_dev, st.st_ino] = path
        try:
            check_training_checkpoint(path)
        except CheckpointError as exc:
            skipped.append(str(exc))
            continue
        for reason in skipped:
            logger.warning("--resume skips %s", reason)
        if skipped:
            logger.warning("--resume continues from %s, the newest intact checkpoint of %s", path.name, run)
        return path
    tried = "\n".join(f"  - {reason}" for reason in skipped)
    raise CheckpointError(f"--resume found no intact checkpoint in {run}; tried:\n{tried}\n"
                          "Pass --resume PATH with a good checkpoint, or start without --resume")


def check_writable(path: str | Path, key: str) -> None:
    """Raise a FacecoreError naming the config ``key`` and ``path`` unless the run can write there.

    A file is created (and deleted) in ``path``, or in its nearest existing parent when it does not
    exist yet (the run creates the rest), so the check leaves nothing behind. Run before anything
    is built, so a bad folder stops nothing that already ran.
    """
    path = Path(path)
    existing = next((p for p in [path, *path.parents] if p.exists()), Path("."))
    why = f"{existing} is a file, not a folder" if not existing.is_dir() else None
    if why is None:
        try:
            fd, probe = tempfile.mkstemp(prefix=".facecore-write-check.", dir=existing)
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            why = f"{existing}: {exc.strerror or exc}"
    if why is not None:
        raise FacecoreError(f"{key}: cannot write to {path} ({why}); set {key} to a folder you can write to "
                            f"(in the config or with --set {key}=PATH)")


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
    """Everything rank 0 records about a run besides checkpoints: config.yaml, metrics.jsonl, the loggers.

    metrics.jsonl is the run's own record, always written, one line per event; the loggers
    (``logging.loggers``) get the same numbers through :class:`~facecore.core.loggers.Trackers`,
    each line's number going with it so a resumed run knows what each logger already has.
    """

    def __init__(self, run_dir: Path, trackers: Trackers | None = None):
        self.run_dir = run_dir
        self.metrics_path = run_dir / "metrics.jsonl"
        self.trackers = trackers or Trackers([])
        self.lines = self._existing_lines()

    def _existing_lines(self) -> int:
        """Lines already in metrics.jsonl (a resumed run); a last line cut short by kill -9 is ended first."""
        try:
            text = self.metrics_path.read_bytes()
        except FileNotFoundError:
            return 0
        if text and not text.endswith(b"\n"):
            with self.metrics_path.open("ab") as fh:
                fh.write(b"\n")
            text += b"\n"
        return text.count(b"\n")

    def write_config(self, config: dict) -> None:
        (self.run_dir / "config.yaml").write_text(dump_config(config))

    def start_loggers(self, run: RunInfo, states: dict | None) -> dict:
        """Start the loggers (``states``: theirs from the checkpoint being resumed); returns their states so far."""
        history = metrics_records(self.metrics_path) if states is not None else []
        return self.trackers.start(run, states, history, ledger=self.run_dir / LEDGER if self.trackers else None)

    def record(self, event: str, step: int, epoch: int, values: dict[str, Any], tb_prefix: str | None = None) -> None:
        """One line of metrics.jsonl, and the same numbers to the loggers under ``tb_prefix`` (see :func:`prefix_of`)."""
        line = {"event": event, "epoch": epoch, "step": step, "time": round(time.time(), 3), **values}
        with self.metrics_path.open("a") as fh:
            fh.write(json.dumps(line, default=float) + "\n")
        seq, self.lines = self.lines, self.lines + 1
        if tb_prefix is not None:
            self.trackers.scalars(tb_prefix, values, step, seq=seq)

    def artifact(self, name: str, path: Path, kind: str, step: int) -> None:
        self.trackers.artifact(name, path, kind, step)

    def close(self, status: str = "finished") -> None:
        self.trackers.finish(status)


def prefix_of(line: dict) -> str | None:
    """The prefix the loggers get a metrics.jsonl line's numbers under: ``train``, ``val/<set>``, ``data``."""
    event = line.get("event")
    if event == "validation":
        return f"val/{line.get('set')}"
    return event if event in ("train", "data") else None


def metrics_records(path: Path) -> list[Record]:
    """The lines of metrics.jsonl as logger records, numbered by line (unreadable lines keep their number)."""
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return []
    out = []
    for seq, text in enumerate(lines):
        try:
            line = json.loads(text)
        except ValueError:
            continue
        prefix = prefix_of(line) if isinstance(line, dict) else None
        if prefix is None or not isinstance(line.get("step"), int):
            continue
        values = {k: v for k, v in line.items() if k not in ("event", "epoch", "step", "time", "set")}
        out.append(Record(seq, prefix, values, line["step"]))
    return out

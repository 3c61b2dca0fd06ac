"""The ``wandb`` logger: Weights & Biases, online or (``mode: offline``) into the run directory only.

The run's files go to ``<run dir>/wandb/``. The config is the W&B run's config; scalars are rows
with facecore's ``step`` as their x axis (``train/loss``, ``val/lfw/accuracy``, ``eval/lfw/...``);
ROC plots and result files are saved with the run, and the best checkpoint's path goes into the
summary. The W&B run id is kept in checkpoints: ``--resume`` continues the same W&B run and
``facecore eval`` of a checkpoint logs into the run it came from. Offline, W&B cannot resume a run:
each start writes a folder of its own (``offline-run-<time>-<id>``) with the same run id, and a
resumed run reads the earlier folders to continue at the step after the last one they hold
(``wandb sync`` uploads them as one run).

wandb is an optional dependency (``pip install 'facecore[wandb]'``); it is imported when the run starts.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any, Iterator

from facecore import hookimpl
from facecore.errors import ConfigError

from facecore_plugins.tracker_support import installed

INSTALL_HINT = "pip install 'facecore[wandb]'"
EXIT_CODES = {"finished": 0, "stopped": 75, "failed": 1}  # facecore's exit statuses
STEP = "step"  # the x axis of every row (W&B's own _step counts rows)
FLUSH_SECONDS = 2.0  # how often W&B writes its run file (its default, 15 s, is what a kill -9 loses)

SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "project": {"type": "string", "minLength": 1, "default": "facecore", "description": "W&B project."},
        "entity": {"type": ["string", "null"], "default": None, "description": "W&B entity (user or team); default: yours."},
        "mode": {
            "enum": ["online", "offline"],
            "default": "online",
            "description": "online: stream to W&B; offline: write the run folder only (no network), for `wandb sync`.",
        },
        "run_name": {"type": ["string", "null"], "default": None,
                     "description": "Display name of the W&B run; default: <backbone>/<run folder>."},
        "run_group": {"type": ["string", "null"], "default": None, "description": "W&B group of the run."},
        "tags": {"type": "array", "items": {"type": "string"}, "default": [], "description": "W&B tags of the run."},
    },
}


class WandbLogger:
    """One W&B run, started in the logger's thread; nothing of W&B is imported before."""

    def __init__(self, project: str = "facecore", entity: str | None = None, mode: str = "online",
                 run_name: str | None = None, run_group: str | None = None, tags: tuple[str, ...] = ()):
        if not installed("wandb"):
            raise ConfigError([f"logging.loggers: logger 'wandb' needs wandb, which is not installed; "
                               f"install with: {INSTALL_HINT}"])
        self.options = {"project": project, "entity": entity, "mode": mode, "name": run_name, "group": run_group,
                        "tags": list(tags)}
        self.run: Any = None
        self.logged_through: int | None = None  # a resumed run: the last step the tracker holds

    def start(self, run: Any) -> dict:
        import wandb

        options = dict(self.options)
        options["name"] = options["name"] or run.name
        previous = (run.resume or {}).get("run_id")
        if previous:  # online: the same run continues; offline: a new folder with the same id
            options.update(id=previous, resume="allow")
        Path(run.run_dir).mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(dir=str(run.run_dir), config=dict(run.config), job_type=run.kind,
                              settings=_settings(wandb), **options)
        self.run.define_metric("*", step_metric=STEP)
        if previous and run.kind == "train":
            steps = ([int(self.run.summary[STEP])] if STEP in self.run.summary else []) if self.options["mode"] == "online" \
                else [row[STEP] for row in offline_history(Path(run.run_dir), previous) if STEP in row]
            self.logged_through = max(steps, default=0)
        return {"run_id": self.run.id}

    def scalars(self, prefix: str, values: dict, step: int) -> None:
        self.run.log({STEP: step, **{f"{prefix}/{k}": v for k, v in values.items()}})

    def artifact(self, name: str, path: Path, kind: str, step: int) -> None:
        if kind == "checkpoint":
            self.run.summary[name] = str(path)
        else:
            self.run.save(str(path), base_path=str(Path(path).parent), policy="now")

    def finish(self, status: str) -> None:
        if self.run is not None:
            self.run.summary["facecore_status"] = status
            self.run.finish(exit_code=EXIT_CODES[status])


def _settings(wandb: Any) -> Any:
    """Quiet W&B settings (no console capture), with a short flush interval where this wandb has that setting."""
    try:
        return wandb.Settings(console="off", silent=True, x_transaction_log_flush_interval=FLUSH_SECONDS)
    except Exception:  # another wandb version: its default interval
        return wandb.Settings(console="off", silent=True)


def offline_history(run_dir: Path, run_id: str) -> list[dict]:
    """The history rows of every offline folder of W&B run ``run_id`` under ``run_dir/wandb``, oldest folder first."""
    rows = []
    for path in sorted(Path(run_dir).glob(f"wandb/offline-run-*-{run_id}/run-{run_id}.wandb")):
        rows += [row for kind, row in read_run_file(path) if kind == "history"]
    return rows


def read_run_file(path: Path) -> Iterator[tuple[str, dict]]:
    """``(record kind, {key: value})`` of a W&B run file: history rows, summaries, the run's config (``run``).

    The file is W&B's transaction log: a 7-byte header (``:W&B``, 0xBEE1, version), then 32 KiB blocks
    of chunks, each a 7-byte header (CRC-32, length, type: 1 whole, 2 first, 3 middle, 4 last) and
    bytes of a protobuf ``Record`` (wandb.proto.wandb_internal_pb2). A chunk cut short by a kill ends it.
    """
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        return
    pos, block, parts = 7, 32768, b""
    while pos + 7 <= len(data):
        room = block - pos % block
        if room < 7:  # no chunk header fits: the block ends in padding
            pos += room
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 or pos + 7 + length > len(data):
            return
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        parts = chunk if kind in (1, 2) else parts + chunk
        if kind not in (1, 4):
            continue
        record = wandb_internal_pb2.Record()
        record.ParseFromString(parts)
        which = record.WhichOneof("record_type") or ""
        items = {"history": record.history.item, "summary": record.summary.update,
                 "run": record.run.config.update}.get(which, [])
        yield which, {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items}


@hookimpl
def register_loggers(register):
    register("wandb", WandbLogger, schema=SCHEMA,
             description=f"Weights & Biases, online or offline into the run folder ({INSTALL_HINT})")

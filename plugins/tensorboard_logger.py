"""The ``tensorboard`` logger: TensorBoard event files under ``logging.log_dir/tensorboard/``.

Training writes to ``tensorboard/<backbone>/<run folder>``, ``facecore eval`` to
``tensorboard/<name>/eval_<time>`` (the folders facecore always used). Scalars are the finite
numbers only; ROC plots become images, a result JSON and the best checkpoint's path become text.
torch's SummaryWriter (and with it the tensorboard package) is imported when the run starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from facecore import hookimpl

SCHEMA = {"type": "object", "additionalProperties": False, "properties": {}}
TEXT_LIMIT = 64_000  # characters of a file shown as text; longer files are named, not shown


class TensorBoardLogger:
    """A SummaryWriter on the run's folder; each call flushes, so what returned is on disk (kill -9 loses nothing)."""

    def __init__(self) -> None:
        self.writer: Any = None

    def start(self, run: Any) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(Path(run.log_dir) / "tensorboard" / run.name))
        if run.kind == "train" and run.resume is None:
            from facecore.core.config import dump_config

            self.writer.add_text("config", _code(dump_config(dict(run.config))), run.step)
            self.writer.flush()

    def scalars(self, prefix: str, values: dict, step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(f"{prefix}/{key}", value, step)
        self.writer.flush()

    def artifact(self, name: str, path: Path, kind: str, step: int) -> None:
        if kind == "image":
            import numpy as np
            from PIL import Image

            with Image.open(path) as img:
                self.writer.add_image(name, np.asarray(img.convert("RGB")), step, dataformats="HWC")
        elif kind == "file" and path.stat().st_size <= TEXT_LIMIT:
            self.writer.add_text(name, _code(path.read_text(errors="replace")), step)
        else:
            self.writer.add_text(name, str(path), step)
        self.writer.flush()

    def finish(self, status: str) -> None:
        if self.writer is not None:
            self.writer.add_text("status", status)
            self.writer.close()


def _code(text: str) -> str:
    """Text as a Markdown code block (TensorBoard renders text summaries as Markdown)."""
    return "\n".join("    " + line for line in text.splitlines())


@hookimpl
def register_loggers(register):
    register("tensorboard", TensorBoardLogger, schema=SCHEMA,
             description="TensorBoard event files under logging.log_dir/tensorboard (scalars, ROC images, text)")

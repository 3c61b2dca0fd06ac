"""Checkpoint files: atomic writes and safe loads (``weights_only=True``).

Reading backbone weights out of a loaded file, in any layout, is ``pretrained.py``'s job; that
module imports this one, never the other way round."""

from __future__ import annotations

import os
import pickle
import re
import tempfile
from pathlib import Path
from typing import Any

from ..errors import CheckpointError

FORMAT = "facecore-checkpoint/1"


def save_checkpoint(state: dict, path: str | Path) -> None:
    """Write ``state`` to a temporary file in the same folder, fsync it, then rename it over ``path``.

    A kill at any moment leaves either the old file or the new one, never a broken one.
    """
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save({"format": FORMAT, **state}, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_checkpoint(path: str | Path) -> Any:
    """Load a file with ``torch.load(weights_only=True)`` on the CPU; errors name the file."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    with path.open("rb") as fh:
        head = fh.read(4)
    if head[:4] != b"PK\x03\x04" and head[:1] != b"\x80":  # torch.save's zip format, or a legacy pickle
        raise CheckpointError(f"{path} is not a PyTorch checkpoint (expected a file written by torch.save)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        if not found:
            raise CheckpointError(f"{path} is not a readable checkpoint: its pickle data is corrupt or truncated") from None
        raise CheckpointError(
            f"{path} holds pickled Python objects ({found.group(1)}) besides tensors and plain containers; facecore loads "
            "checkpoints with weights_only=True and will not run pickled code. If you trust the file, load it "
            "yourself and save just its state_dict with torch.save"
        ) from None
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path} is not a readable checkpoint ({first})") from None


def is_facecore_checkpoint(obj: Any) -> bool:
    """Whether ``obj`` (a loaded file) was written by :func:`save_checkpoint`."""
    return isinstance(obj, dict) and obj.get("format") == FORMAT


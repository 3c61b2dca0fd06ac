"""Checkpoint files: atomic writes, safe loads (``weights_only=True``), and backbone weights
from either a facecore checkpoint or a bare state dict (InsightFace ``backbone.pth``)."""

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
    return isinstance(obj, dict) and obj.get("format") == FORMAT


def backbone_state_dict(obj: Any, path: str | Path = "checkpoint") -> dict:
    """The backbone weights in a loaded checkpoint: a facecore checkpoint or a bare state dict.

    A ``module.`` prefix (DataParallel/DDP saves) is stripped.
    """
    import torch

    if is_facecore_checkpoint(obj):
        state = obj["backbone"]
    elif isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        state = obj
    elif isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        state = obj["state_dict"]
    else:
        raise CheckpointError(
            f"{path} holds neither a facecore checkpoint nor a state dict of tensors "
            f"(found {type(obj).__name__} with keys {list(obj)[:5] if isinstance(obj, dict) else '-'})"
        )
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}


def load_backbone_weights(backbone: Any, obj: Any, path: str | Path, backbone_name: str = "backbone") -> None:
    """Load weights into ``backbone`` strictly; a mismatch names both the file and the model."""
    state = backbone_state_dict(obj, path)
    own = backbone.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shape = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or shape:
        saved = ""
        if is_facecore_checkpoint(obj):
            m = obj.get("config", {}).get("model", {})
            saved = f" (it was saved for backbone '{m.get('backbone')}' with embedding_size {m.get('embedding_size')})"
        details = []
        if shape:
            k = shape[0]
            details.append(f"{len(shape)} shape mismatch(es), e.g. {k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}")
        if missing:
            details.append(f"{len(missing)} key(s) missing from the file, e.g. {missing[0]}")
        if unexpected:
            details.append(f"{len(unexpected)} unexpected key(s) in the file, e.g. {unexpected[0]}")
        raise CheckpointError(
            f"{path} does not fit the configured backbone '{backbone_name}'{saved}: " + "; ".join(details)
        )
    backbone.load_state_dict(state, strict=True)

"""Checkpoint files: atomic writes and safe loads (``weights_only=True``).

Reading backbone weights out of a loaded file, in any layout, is ``pretrained.py``'s job; that
module imports this one, never the other way round."""

from __future__ import annotations

import errno
import os
import pickle
import re
import shutil
import tempfile
import uuid
import zipfile
from pathlib import Path
from typing import Any, BinaryIO, Callable

from ..errors import CheckpointError

FORMAT = "facecore-checkpoint/1"
ZIP_MAGIC = b"PK\x03\x04"


NUMBERED_GLOB = "ckpt-step*.pth"


def numbered_name(step: int) -> str:
    """The file name of the checkpoint kept for ``step`` (``checkpoint.keep`` > 1)."""
    return f"ckpt-step{step:08d}.pth"


def numbered_step(path: Path) -> int | None:
    """The step in a :func:`numbered_name`, None for any other name."""
    found = re.fullmatch(r"ckpt-step(\d+)\.pth", path.name)
    return int(found.group(1)) if found else None


def save_checkpoint(state: dict, path: str | Path) -> None:
    """Write ``state`` to a temporary file in the same folder, fsync it, then rename it over ``path``.

    A kill at any moment leaves either the old file or the new one, never a broken one. A failed
    write (full disk, I/O error) removes the temporary file, leaves the old ``path`` as it was and
    raises a CheckpointError that gives the free space and the space the checkpoint needs.
    """
    import torch

    path = Path(path)
    try:
        _write_atomically(path, lambda fh: torch.save({"format": FORMAT, **state}, fh))
    except _WriteFailed as failed:
        raise CheckpointError(_write_failure(path, failed.error, state)) from None


def save_numbered(state: dict, path: str | Path, step: int, keep: int) -> list[tuple[Path, str]]:
    """Write ``state`` once as ``ckpt-step<step>.pth`` next to ``path``, make ``path`` the same file, keep ``keep``.

    ``path`` (last.pth) becomes a hard link to the numbered file, put in place by a rename, so it
    is never half-written; where the filesystem has no hard links it becomes a copy (also written
    to a temporary file and renamed). Only after that are the numbered files beyond the newest
    ``keep`` (by step) deleted. On a failure the new numbered file is
    removed again, ``path`` and the older files are as they were, and a CheckpointError says why.
    Returns the old files that could not be deleted, with the reason (for the caller to log).
    """
    import torch

    path = Path(path)
    numbered = path.parent / numbered_name(step)
    try:
        _write_atomically(numbered, lambda fh: torch.save({"format": FORMAT, **state}, fh))
    except _WriteFailed as failed:
        raise CheckpointError(_write_failure(numbered, failed.error, state, unchanged=path)) from None
    try:
        _link_atomically(numbered, path)
    except OSError as link_error:
        try:
            with numbered.open("rb") as src:
                _write_atomically(path, lambda fh: shutil.copyfileobj(src, fh, 1 << 20))
        except (_WriteFailed, OSError) as failed:
            error = failed.error if isinstance(failed, _WriteFailed) else failed
            _remove(numbered)
            how = f"a hard link to {numbered.name} failed ({_describe(link_error)}) and so did a copy"
            raise CheckpointError(_write_failure(path, error, state, how=how)) from None
    return prune_numbered(path.parent, keep, newest=numbered)


def prune_numbered(folder: Path, keep: int, newest: Path | None = None) -> list[tuple[Path, str]]:
    """Delete all but the ``keep`` newest numbered checkpoints in ``folder`` (``newest``, the one just
    written, always stays). Returns the files that could not be deleted, with the reason."""
    files = sorted(numbered_checkpoints(folder), key=lambda p: p != newest)  # stable: ``newest`` first
    not_removed = []
    for old in files[keep:]:
        try:
            old.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            not_removed.append((old, _describe(exc)))
    return not_removed


def numbered_checkpoints(folder: Path) -> list[Path]:
    """The numbered checkpoints in ``folder``, newest first: by the step in the name (modification times
    change when files are copied or touched), then by modification time."""

    def age(p: Path) -> tuple[int, int]:
        try:
            return (numbered_step(p) or 0, p.stat().st_mtime_ns)
        except OSError:
            return (numbered_step(p) or 0, -1)

    found = [p for p in Path(folder).glob(NUMBERED_GLOB) if numbered_step(p) is not None]
    return sorted(found, key=age, reverse=True)


def state_nbytes(obj: Any) -> int:
    """Bytes of tensor data in ``obj`` (dicts, lists, tuples walked; shared storages counted once):
    about what torch.save writes, without serialising it."""
    import torch

    seen: set = set()
    total = 0
    stack = [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            storage = item.untyped_storage()
            key = (item.device, storage.data_ptr(), storage.nbytes())
            if key not in seen:
                seen.add(key)
                total += storage.nbytes()
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return total


class _WriteFailed(Exception):
    """An OSError somewhere in :func:`_write_atomically` (possibly wrapped by torch.save's writer)."""

    def __init__(self, error: BaseException):
        super().__init__(str(error))
        self.error = error


def _write_atomically(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """``write(fh)`` into a temporary file next to ``path``, fsync, rename over ``path``, fsync the folder.

    Any failure removes the temporary file and leaves ``path`` untouched; an OSError (also one that
    torch.save's zip writer turned into a RuntimeError) is raised as :class:`_WriteFailed`.
    """
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        tmp = None
    except BaseException as exc:
        if tmp is not None:
            _remove(Path(tmp))
        cause = _os_error_in(exc)
        if cause is None:
            raise
        raise _WriteFailed(cause) from exc
    _sync_folder(path.parent)


def _link_atomically(target: Path, path: Path) -> None:
    """Make ``path`` a hard link to ``target``: link under a temporary name, then rename over ``path``."""
    tmp = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.link"
    try:
        os.link(target, tmp)
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise
    _sync_folder(path.parent)


def _sync_folder(folder: Path) -> None:
    """fsync a folder so a rename in it survives a power cut; best effort (not every system allows it)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def _os_error_in(exc: BaseException) -> OSError | None:
    """``exc`` if it is an OSError, else the first OSError it was raised from or during (torch.save's
    writer reports a failed write as RuntimeError('unexpected pos ...') raised while handling it)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _describe(error: BaseException) -> str:
    if isinstance(error, OSError) and error.errno is not None:
        name = errno.errorcode.get(error.errno, str(error.errno))
        return f"{name}: {error.strerror or os.strerror(error.errno)}"
    return f"{type(error).__name__}: {error}"


def _size(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _write_failure(path: Path, error: BaseException, state: dict, how: str | None = None,
                   unchanged: Path | None = None) -> str:
    """The one message for a checkpoint that could not be written: the path, the error, free and needed space."""
    try:
        free = _size(shutil.disk_usage(_existing(path.parent)).free)
    except OSError:
        free = "unknown space"
    needed = _size(state_nbytes(state))
    unchanged = unchanged or path
    previous = f"the previous {unchanged.name} is unchanged" if unchanged.exists() else f"no {unchanged.name} was written"
    reason = f"{how} ({_describe(error)})" if how else _describe(error)
    return (f"could not write checkpoint {path}: {reason}; {free} free on its filesystem, the checkpoint needs about "
            f"{needed}. Training stopped; {previous}. Free some space or fix the disk (or set checkpoint.save_dir to "
            "another one), then continue with --resume")


def _existing(folder: Path) -> Path:
    """``folder`` or its nearest existing parent (disk_usage needs a path that exists)."""
    while not folder.exists() and folder.parent != folder:
        folder = folder.parent
    return folder


def load_checkpoint(path: str | Path, mmap: bool = False) -> Any:
    """Load a file with ``torch.load(weights_only=True)`` on the CPU; errors name the file.

    ``mmap``: map the tensors of a zip-format file instead of reading them (for a quick look)."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    with path.open("rb") as fh:
        head = fh.read(4)
    is_zip = head[:4] == ZIP_MAGIC
    if not is_zip and head[:1] != b"\x80":  # torch.save's zip format, or a legacy pickle
        raise CheckpointError(f"{path} is not a PyTorch checkpoint (expected a file written by torch.save)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and is_zip)
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



def check_training_checkpoint(path: str | Path) -> None:
    """Raise a CheckpointError saying why, unless ``path`` is a whole, readable training checkpoint.

    Every record's checksum is verified (a truncated file or flipped bytes in the tensor data,
    which torch.load does not check), then the file is loaded with its tensors memory-mapped.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: not found")
    with path.open("rb") as fh:
        is_zip = fh.read(4) == ZIP_MAGIC
    if is_zip:
        try:
            with zipfile.ZipFile(path) as archive:
                bad = archive.testzip()
        except (zipfile.BadZipFile, EOFError, OSError, ValueError) as exc:
            raise CheckpointError(f"{path} is truncated or damaged ({exc})") from None
        if bad is not None:
            raise CheckpointError(f"{path} is damaged: the record {bad} fails its checksum")
    obj = load_checkpoint(path, mmap=True)
    if not isinstance(obj, dict) or "optimizer" not in obj or "backbone" not in obj:
        raise CheckpointError(f"{path} is not a facecore training checkpoint")

"""MXNet RecordIO without mxnet: record framing, the IRHeader payload, an indexed reader and a writer.

Files written here read back in mxnet, and files written by mxnet (``MXIndexedRecordIO``)
read back here byte for byte. Reading is random access by key through ``os.pread`` on a
per-process file descriptor, so a multi-GB ``.rec`` is never loaded and DataLoader
workers (fork or spawn) each open their own handle.
"""

from __future__ import annotations

import mmap
import os
import struct
import warnings
from pathlib import Path
from typing import Any, NamedTuple, Sequence, Union

import numpy as np

from ..errors import DataError

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_LENGTH_MASK = (1 << 29) - 1
MAX_RECORD = 1 << 29  # the length field has 29 bits
_FRAME = struct.Struct("<II")  # magic, (continuation flag << 29) | length
IR_FORMAT = "<IfQQ"  # flag, label, id, id2: mxnet's 'IfQQ' on little-endian machines
_IR = struct.Struct(IR_FORMAT)
IR_SIZE = _IR.size  # 24
_FIRST_READ = 64 * 1024  # bytes fetched first when the index gives no better guess

Label = Union[float, Sequence[float], np.ndarray]

# Bumped in the child after every fork: readers compare it to the value they opened under,
# so a forked DataLoader worker opens its own descriptor instead of reusing the parent's.
_fork_generation = [0]


def _after_fork_in_child() -> None:
    _fork_generation[0] += 1


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class IRHeader(NamedTuple):
    """The image-record header: ``flag`` label count (0: ``label`` is a scalar), ``label``, ``id``, ``id2``."""

    flag: int
    label: Any
    id: int
    id2: int


def pack(label: Label, data: bytes = b"", id: int = 0, id2: int = 0) -> bytes:
    """An image-record payload: IRHeader, then the float32 labels when ``label`` is an array, then ``data``."""
    if np.ndim(label) == 0:
        return _IR.pack(0, float(label), id, id2) + bytes(data)
    labels = np.asarray(label, dtype="<f4").ravel()
    return _IR.pack(labels.size, 0.0, id, id2) + labels.tobytes() + bytes(data)


def unpack(payload: bytes | bytearray | memoryview) -> tuple[IRHeader, memoryview]:
    """Split a payload into its IRHeader (array labels as float32 ndarray) and the image bytes.

    Raises ValueError when the payload is too short for its header.
    """
    view = memoryview(payload)
    if len(view) < IR_SIZE:
        raise ValueError(f"payload of {len(view)} bytes is shorter than the {IR_SIZE}-byte IRHeader")
    flag, label, id_, id2 = _IR.unpack_from(view)
    start = IR_SIZE
    if flag > 0:
        end = start + 4 * flag
        if len(view) < end:
            raise ValueError(f"IRHeader announces {flag} labels but the payload has {len(view)} bytes")
        label = np.frombuffer(view[start:end], dtype="<f4").astype(np.float32)
        start = end
    return IRHeader(flag, label, id_, id2), view[start:]


def class_label(header: IRHeader) -> float:
    """The class of an image record: the scalar label, or the first element of a label array."""
    if header.flag > 0:
        return float(header.label[0])
    return float(header.label)


def frame(payload: bytes | bytearray | memoryview) -> bytes:
    """The on-disk bytes of one record, split at 4-byte-aligned magic words exactly as dmlc-core does."""
    data = bytes(payload)
    size = len(data)
    if size >= MAX_RECORD:
        raise ValueError(f"a RecordIO record holds at most {MAX_RECORD - 1} bytes, got {size}")
    lower = size & ~3
    hits = np.flatnonzero(np.frombuffer(data, dtype="<u4", count=lower // 4) == MAGIC) * 4 if lower else []
    out = []
    start = 0
    for pos in hits:  # the magic word itself is dropped; the reader puts it back between parts
        pos = int(pos)
        out.append(_FRAME.pack(MAGIC, ((1 if start == 0 else 2) << 29) | (pos - start)))
        out.append(data[start:pos])
        start = pos + 4
    out.append(_FRAME.pack(MAGIC, ((3 if start else 0) << 29) | (size - start)))
    out.append(data[start:])
    out.append(b"\0" * (-size % 4))
    return b"".join(out)


def read_index(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Parse a ``key<TAB>offset`` index into (keys, offsets) int64 arrays, in file order."""
    path = Path(path)
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"index file not found: {path}") from None
    except OSError as exc:
        raise DataError(f"cannot read index file {path}: {exc.strerror}") from None
    table = _parse_index_fast(text)
    if table is None:
        table = _parse_index_lines(text, path)
    return table[:, 0].copy(), table[:, 1].copy()


def _parse_index_fast(text: bytes) -> np.ndarray | None:
    """numpy's C parser; None when anything looks off (the line-by-line parser then names the line)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy warns (instead of raising) on unparsable text
        try:
            numbers = np.fromstring(text, dtype=np.int64, sep=" ")
        except (ValueError, DeprecationWarning):
            return None
    lines = text.count(b"\n") + (0 if text.endswith(b"\n") or not text else 1)
    if numbers.size != 2 * lines or (numbers.size and (numbers.min() < 0 or numbers.max() == np.iinfo(np.int64).max)):
        return None
    return numbers.reshape(-1, 2)


def _parse_index_lines(text: bytes, path: Path) -> np.ndarray:
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2 or not all(p.isdigit() and len(p) < 19 for p in parts):
            shown = line.decode("utf-8", "replace")[:80]
            raise DataError(
                f"{path} line {number}: expected 'key<TAB>offset' with two non-negative integers, got {shown!r}; "
                "the index is damaged: rebuild it (or re-pack the set with `facecore pack rec`)"
            )
        rows.append((int(parts[0]), int(parts[1])))
    return np.array(rows, dtype=np.int64).reshape(-1, 2)


class RecordReader:
    """Random access to the records of an indexed ``.rec`` file, by key.

    ``method`` is ``"pread"`` (one ``os.pread`` per record on a per-process descriptor; the
    default: flat memory) or ``"mmap"``. The object pickles without its handle, and reopens
    lazily in each process (DataLoader workers, fork or spawn).
    """

    def __init__(self, rec_path: str | os.PathLike, idx_path: str | os.PathLike, method: str = "pread"):
        if method not in ("pread", "mmap"):
            raise ValueError(f"method must be 'pread' or 'mmap', got {method!r}")
        self.path = Path(rec_path)
        self.idx_path = Path(idx_path)
        self.method = method if hasattr(os, "pread") else "mmap"  # Windows has no pread
        try:
            self.file_size = self.path.stat().st_size
        except FileNotFoundError:
            raise DataError(f"record file not found: {self.path}") from None
        keys, offsets = read_index(self.idx_path)
        self._build_lookup(keys, offsets)
        self._fd: int | None = None
        self._mm: mmap.mmap | None = None
        self._generation = -1

    # -- index -------------------------------------------------------------------
    def _build_lookup(self, keys: np.ndarray, offsets: np.ndarray) -> None:
        # The last line for a key wins, as in mxnet's dict-based index.
        uniq, last = np.unique(keys[::-1], return_index=True)
        offsets = offsets[::-1][last]
        self.keys = uniq  # sorted
        self._dense = bool(len(uniq) and uniq[-1] - uniq[0] == len(uniq) - 1)
        self._first = int(uniq[0]) if len(uniq) else 0
        self._offsets = offsets.astype(np.int64)
        self._count = len(self._offsets)
        # Bytes up to the next indexed record: a good size for a single read.
        ordered = np.sort(np.append(offsets, self.file_size))
        ordered = ordered[np.concatenate(([True], ordered[1:] != ordered[:-1]))]  # np.unique, minus its cost
        nxt = ordered[np.minimum(np.searchsorted(ordered, offsets, side="right"), len(ordered) - 1)]
        span = nxt - offsets
        self._spans = np.where((span > 0) & (span <= 1 << 24), span, _FIRST_READ).astype(np.int64)

    def __len__(self) -> int:
        return len(self.keys)

    def _position(self, key: int) -> int | None:
        if self._dense:
            pos = key - self._first
            return pos if 0 <= pos < self._count else None
        pos = int(np.searchsorted(self.keys, key))
        return pos if pos < len(self.keys) and self.keys[pos] == key else None

    def __contains__(self, key: object) -> bool:
        return isinstance(key, (int, np.integer)) and self._position(int(key)) is not None

    def offset(self, key: int) -> int:
        """The byte offset of ``key`` in the ``.rec`` file (DataError when the index lacks it)."""
        pos = self._position(key)
        if pos is None:
            raise DataError(f"{self.idx_path}: key {key} is not in the index; the index and {self.path.name} "
                            "do not belong together or the index is damaged")
        return self._offsets.item(pos)

    # -- handles -----------------------------------------------------------------
    def _open(self) -> None:
        """Open this process's descriptor (closing the copy a fork inherited: it is this process's own)."""
        self.close()
        try:
            self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError as exc:
            raise DataError(f"cannot open record file {self.path}: {exc.strerror}") from None
        if self.method == "mmap" and self.file_size:
            self._mm = mmap.mmap(self._fd, 0, access=mmap.ACCESS_READ)
        self._generation = _fork_generation[0]

    def close(self) -> None:
        """Close the handle (reading again reopens it)."""
        if self._mm is not None:
            self._mm.close()
        if self._fd is not None:
            os.close(self._fd)
        self._fd = self._mm = None

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.update(_fd=None, _mm=None, _generation=-1)
        return state

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass

    def __enter__(self) -> RecordReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reading -----------------------------------------------------------------
    def _pread(self, size: int, offset: int) -> bytes:
        if self._mm is not None:
            return self._mm[offset : offset + size]
        return os.pread(self._fd, size, offset)

    def _error(self, key: int, offset: int, problem: str) -> DataError:
        return DataError(f"{self.path}: record key {key} at byte offset {offset}: {problem}; "
                         "the file is damaged or truncated (re-download or re-pack it)")

    def read(self, key: int, limit: int | None = None) -> bytes:
        """The payload of record ``key``; with ``limit``, at least its first ``limit`` bytes (or all of it)."""
        if self._generation != _fork_generation[0] or self._fd is None:
            self._open()
        pos = self._position(key)
        if pos is None:
            self.offset(key)  # raises the 'key not in the index' error
        offset = self._offsets.item(pos)
        if offset >= self.file_size:
            raise self._error(key, offset, f"the index offset is past the end of the file ({self.file_size} bytes)")
        span = self._spans.item(pos)
        buf = self._pread(span if limit is None else min(span, limit + 8), offset)
        if len(buf) >= 8:  # fast path: a single-part record inside the first read
            magic, lrec = _FRAME.unpack_from(buf)
            if magic == MAGIC and lrec >> 29 == 0:
                length = lrec & _LENGTH_MASK
                if 8 + length <= len(buf):
                    return buf[8 : 8 + length]
                if limit is not None and len(buf) >= 8 + limit:
                    return buf[8:]
        return self._read_parts(key, offset, buf, limit)

    def _extend(self, buf: bytes, start: int, upto: int) -> bytes:
        have = start + len(buf)
        if have >= upto:
            return buf
        return buf + self._pread(upto - have, have)

    def _read_parts(self, key: int, start: int, buf: bytes, limit: int | None) -> bytes:
        """Read a record part by part (continuation records, short first reads), checking every frame."""
        parts: list[bytes] = []
        total, pos, first = 0, start, True
        while True:
            buf = self._extend(buf, start, pos + 8)
            if start + len(buf) < pos + 8:
                raise self._error(key, pos, "the record header is cut off by the end of the file")
            magic, lrec = _FRAME.unpack_from(buf, pos - start)
            if magic != MAGIC:
                raise self._error(key, pos, f"bad magic number 0x{magic:08x} (expected 0x{MAGIC:08x})")
            cflag, length = lrec >> 29, lrec & _LENGTH_MASK
            if cflag not in ((0, 1) if first else (2, 3)):
                where = "the index points into the middle of a record" if first else "a record part is missing"
                raise self._error(key, pos, f"unexpected continuation flag {cflag}: {where}")
            end = pos + 8 + length
            if end > self.file_size:
                raise self._error(key, pos, f"the record needs {length} bytes after its header but the file "
                                  f"ends at byte {self.file_size}")
            buf = self._extend(buf, start, end)
            parts.append(buf[pos + 8 - start : end - start])
            total += length
            if cflag in (0, 3) or (limit is not None and total >= limit):
                return b"".join(parts)
            parts.append(_MAGIC_BYTES)
            total += 4
            pos, first = end + (-length % 4), False

    def header(self, key: int) -> IRHeader:
        """The IRHeader of record ``key`` (labels included), reading only the start of the record."""
        payload = self.read(key, limit=IR_SIZE + 32)  # room for 8 labels: one read in practice
        flag = _IR.unpack_from(payload)[0] if len(payload) >= IR_SIZE else 0
        if flag > 0 and len(payload) < IR_SIZE + 4 * flag:
            payload = self.read(key, limit=IR_SIZE + 4 * flag)
        try:
            return unpack(payload)[0]
        except ValueError as exc:
            raise self._error(key, self.offset(key), str(exc)) from None


class RecordWriter:
    """Write an indexed ``.rec`` + ``.idx`` pair in mxnet's format: ``write(key, payload)``."""

    def __init__(self, rec_path: str | os.PathLike, idx_path: str | os.PathLike):
        self.rec_path, self.idx_path = Path(rec_path), Path(idx_path)
        self._rec = open(self.rec_path, "wb")
        self._idx = open(self.idx_path, "w", encoding="ascii", newline="\n")
        self._pos = 0

    def write(self, key: int, payload: bytes | bytearray | memoryview) -> int:
        """Append one record under ``key``; returns its byte offset."""
        data = frame(payload)
        offset = self._pos
        self._rec.write(data)
        self._idx.write(f"{int(key)}\t{offset}\n")
        self._pos += len(data)
        return offset

    def close(self) -> None:
        self._rec.close()
        self._idx.close()

    def __enter__(self) -> RecordWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

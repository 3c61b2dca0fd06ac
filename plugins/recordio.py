"""The ``recordio`` training dataset: InsightFace/mxnet ``train.rec`` + ``train.idx`` + ``property``, read without mxnet."""

from __future__ import annotations

import math
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from facecore import hookimpl
from facecore.errors import DataError
from facecore.data.images import skipped_placeholder, training_item, training_set_schema
from facecore.data.recordio import RecordReader, class_label, unpack

SCHEMA = training_set_schema("Folder holding train.rec, train.idx and property.")


def read_property(path: Path) -> tuple[int, int, int] | None:
    """``num_classes,height,width`` from an InsightFace ``property`` file (None when there is none)."""
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from None
    parts = [p.strip() for p in text.split(",")]
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        raise DataError(f"{path}: expected 'num_classes,height,width' (e.g. 85742,112,112), got {text[:60]!r}")
    num_classes, height, width = (int(p) for p in parts)
    return num_classes, height, width


def _progress(iterable, total: int, desc: str):
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="rec", disable=not sys.stderr.isatty(), leave=False)


class RecordIODataset(Dataset):
    """(image, label) pairs from an indexed RecordIO set, images (3, H, W) uint8; ``num_classes`` is checked
    against ``property``.

    ``labels`` holds each image's class as the index tells it (identity ranges, or the headers
    of a plain set), e.g. for samplers; ``__getitem__`` returns the label in the image's header.

    ``skipped`` counts images skipped in this process (``on_bad_image: skip``); items skipped
    in DataLoader workers come back with label -1 and are counted by the trainer.
    """

    def __init__(self, root: str, train: bool = False, img_size: int = 112, on_bad_image: str = "stop"):
        if on_bad_image not in ("stop", "skip"):
            raise DataError(f"data.on_bad_image must be 'stop' or 'skip', got {on_bad_image!r}")
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"data.root {self.root} is not a folder; it must hold train.rec, train.idx and property")
        self.train = train  # the group's context argument; augmentation happens on the device (data.augment)
        self.img_size = img_size
        self.skip_bad = on_bad_image == "skip"
        self.skipped = 0
        rec, idx = self.root / "train.rec", self.root / "train.idx"
        for f in (rec, idx):
            if not f.is_file():
                raise DataError(f"{f} not found: a RecordIO set needs train.rec and train.idx in data.root")
        self.reader = RecordReader(rec, idx)
        self.layout, self.keys, self.num_classes = self._scan()
        if len(self.keys) == 0:
            raise DataError(f"{idx} lists no images; re-pack the set (facecore pack rec)")
        self._check_property()

    # -- structure ---------------------------------------------------------------
    def _scan(self) -> tuple[str, np.ndarray, int]:
        reader = self.reader
        if 0 in reader:
            head = reader.header(0)
            if head.flag > 0 and len(reader.read(0)) == 24 + 4 * head.flag:  # labels only: the set's header
                return self._scan_insightface(head.label)
        return self._scan_plain()

    def _scan_insightface(self, label: np.ndarray) -> tuple[str, np.ndarray, int]:
        rec = self.reader.path
        a, b = (float(v) for v in label[:2]) if len(label) >= 2 else (-1.0, -1.0)
        if not (a.is_integer() and b.is_integer() and 1 <= a <= b):
            raise DataError(f"{rec}: record 0 is a header with label {label.tolist()}; expected (a, b) with "
                            "1 <= a <= b (images 1..a-1, identities a..b-1)")
        a, b = int(a), int(b)
        images, identities = np.arange(1, a, dtype=np.int64), np.arange(a, b, dtype=np.int64)
        wanted = np.concatenate([images, identities])
        missing = wanted[~np.isin(wanted, self.reader.keys)]
        if missing.size:
            raise DataError(f"{self.reader.idx_path}: key {int(missing[0])} is not in the index ({missing.size} "
                            f"missing) but record 0 says images are keys 1..{a - 1} and identities {a}..{b - 1}")
        labels = np.full(len(images), -1, dtype=np.int64)
        for cls, key in enumerate(_progress(identities.tolist(), len(identities), "checking identities")):
            h = self.reader.header(key)
            rng = h.label if h.flag > 0 else None
            if rng is None or len(rng) < 2 or not (1 <= rng[0] <= rng[1] <= a):
                raise DataError(f"{rec}: identity record key {key} at byte offset {self.reader.offset(key)} has "
                                f"label {np.atleast_1d(h.label).tolist()}; expected a key range [start, end) "
                                f"within images 1..{a - 1}")
            labels[int(rng[0]) - 1 : int(rng[1]) - 1] = cls
        self.labels = labels
        return "insightface", images, b - a

    def _scan_plain(self) -> tuple[str, np.ndarray, int]:
        keys = self.reader.keys
        labels = np.empty(len(keys), dtype=np.int64)
        for i in _progress(range(len(keys)), len(keys), "reading labels"):
            key = keys.item(i)
            labels[i] = self._label(key, class_label(self.reader.header(key)), None)
        self.labels = labels
        return "plain", keys, int(labels.max()) + 1 if len(labels) else 0

    def _label(self, key: int, value: float, num_classes: int | None) -> int:
        if not (math.isfinite(value) and float(value).is_integer() and value >= 0) or (
            num_classes is not None and value >= num_classes
        ):
            limit = f" below {num_classes}" if num_classes is not None else ""
            raise DataError(f"{self.reader.path}: record key {key} at byte offset {self.reader.offset(key)} has "
                            f"label {value}; class labels must be whole numbers from 0{limit}")
        return int(value)

    def _check_property(self) -> None:
        path = self.root / "property"
        prop = read_property(path)
        if prop is None:
            warnings.warn(f"{path} not found; using {self.num_classes} classes from the labels in train.rec",
                          stacklevel=3)
            return
        num_classes, height, width = prop
        if num_classes != self.num_classes:
            how = "identity records" if self.layout == "insightface" else "largest label + 1"
            raise DataError(f"{path} says {num_classes} classes but {self.reader.path} has {self.num_classes} "
                            f"({how}); the files do not belong together: fix property or re-pack the set")
        if height != width:
            raise DataError(f"{path} says the images are {width}x{height}; only square images are supported")
        if height != self.img_size:
            raise DataError(f"{path} says the images are {width}x{height} but data.img_size is {self.img_size}; "
                            f"set data.img_size: {height}")

    # -- items -------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        key = int(self.keys[index])
        payload = self.reader.read(key)
        try:
            header, data = unpack(payload)
        except ValueError as exc:
            raise DataError(f"{self.reader.path}: record key {key} at byte offset {self.reader.offset(key)}: "
                            f"{exc}") from None
        label = self._label(key, class_label(header), self.num_classes)
        image = training_item(data, img_size=self.img_size, skip_bad=self.skip_bad,
                              where=lambda: f"{self.reader.path}: record key {key} at byte offset "
                              f"{self.reader.offset(key)}")
        if image is None:
            self.skipped += 1
            return skipped_placeholder(self.img_size), -1
        return image, label


@hookimpl
def register_datasets(register):
    register("recordio", RecordIODataset, schema=SCHEMA,
             description="InsightFace/mxnet RecordIO training set (train.rec, train.idx, property), no mxnet needed")

"""Label cleaning with a trained classifier's centers (``facecore clean``), as in sub-center ArcFace.

Every image of a RecordIO training set is embedded by the checkpoint's backbone; its angle to each
of its class's K sub-centers (K = the head's ``centers_per_class``; 1 for single-center heads) is
kept. A class's dominant sub-center is the one most of its images are nearest to; an image whose
angle to it is above the threshold is dropped (the paper uses 75 degrees). Writes the kept images
as a new RecordIO set (InsightFace layout, same classes: a ``data.root`` as it is), the dropped
list, the kept list with the old record keys, a histogram of the angles and a summary.

Only (N, K) cosines are held, never the (N, D) embeddings, so the set may be large. Everything is
written into a temporary folder beside the output and renamed at the end: bad input or a failure
part way leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..errors import CheckpointError, DataError, FacecoreError

DEFAULT_THRESHOLD = 75.0  # degrees: sub-center ArcFace's cut for high-confidence noise
KEPT_DIR, DROPPED_FILE, KEPT_FILE, HISTOGRAM_FILE, SUMMARY_FILE = (
    "kept", "dropped.tsv", "kept.tsv", "angles.png", "summary.json")


def check_threshold(threshold: float) -> float:
    """The threshold as a float, or an error unless it is an angle strictly between 0 and 180 degrees."""
    value = float(threshold)
    if not 0.0 < value < 180.0:
        raise FacecoreError(f"--threshold: {threshold} is not an angle in (0, 180) degrees; images further than "
                            f"it from their class's dominant sub-center are dropped (sub-center ArcFace uses "
                            f"{DEFAULT_THRESHOLD:g})")
    return value


def class_centers(obj: Any, path: str | Path) -> Any:
    """The class-center matrix (rows class-major, K per class) of a loaded training checkpoint."""
    import torch

    classifier = obj.get("classifier") if isinstance(obj, dict) else None
    weight = classifier.get("weight") if isinstance(classifier, dict) else None
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise CheckpointError(
            f"{path} holds no class centers (classifier.weight): clean measures each image's angle to the centers "
            "a training run learned. Pass last.pth or best.pth of 'facecore train', not a bare backbone or an export")
    return weight


# -- the angles --------------------------------------------------------------------------------------
def subcenter_cosines(embeddings: Any, labels: Any, centers: Any, k: int) -> Any:
    """(B, K) float64 cosines between each embedding and the K sub-centers of its own class."""
    import torch
    import torch.nn.functional as F

    rows = labels.long().unsqueeze(1) * k + torch.arange(k, device=labels.device)
    own = F.normalize(centers[rows].double(), dim=2)  # (B, K, D)
    return torch.einsum("bd,bkd->bk", F.normalize(embeddings.double(), dim=1), own).clamp_(-1.0, 1.0)


def dominant_subcenters(labels: np.ndarray, nearest: np.ndarray, num_classes: int, k: int) -> np.ndarray:
    """(C,) each class's dominant sub-center: the one most of its images are nearest to (ties: the lowest)."""
    counts = np.bincount(labels * k + nearest, minlength=num_classes * k).reshape(num_classes, k)
    return counts.argmax(axis=1)


@dataclass
class Angles:
    """Each image's cosines to its class's sub-centers, and what follows from them."""

    keys: np.ndarray  # (N,) record keys, in the dataset's order
    labels: np.ndarray  # (N,) classes
    cosines: np.ndarray  # (N, K) float64
    num_classes: int
    nearest: np.ndarray = field(init=False)  # (N,) nearest sub-center of the image's class
    dominant: np.ndarray = field(init=False)  # (C,) dominant sub-center per class
    degrees: np.ndarray = field(init=False)  # (N,) angle to the class's dominant sub-center

    def __post_init__(self) -> None:
        k = self.cosines.shape[1]
        self.nearest = self.cosines.argmax(axis=1)
        self.dominant = dominant_subcenters(self.labels, self.nearest, self.num_classes, k)
        own = self.cosines[np.arange(len(self.labels)), self.dominant[self.labels]]
        self.degrees = np.degrees(np.arccos(np.clip(own, -1.0, 1.0)))

    def on_dominant(self) -> np.ndarray:
        """(N,) whether an image is nearest to its class's dominant sub-center."""
        return self.nearest == self.dominant[self.labels]


class _CheckedItems:
    """The training set's items as ``(image, problem)`` for the embedding pass: a DataError inside a
    DataLoader worker, an image the set skipped, or a header label that disagrees with ``labels`` becomes
    a message that :func:`~facecore.eval.evaluation.embedding_batches` raises as one clean error."""

    def __init__(self, dataset: Any, img_size: int, name: str):
        self.dataset, self.img_size, self.name = dataset, img_size, name

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Any, str]:
        import torch

        key = int(self.dataset.keys[index])
        where = f"{self.dataset.reader.path}: record key {key}"
        try:
            image, label = self.dataset[index]
        except DataError as exc:
            return torch.zeros(3, self.img_size, self.img_size, dtype=torch.uint8), f"{exc}"
        expected = int(self.dataset.labels[index])
        if label == -1:
            return image, (f"{where}: the image cannot be decoded (data.on_bad_image: skip left it out of training); "
                           "clean needs every image: remove it from the set and re-pack it")
        if label != expected:
            return image, (f"{where}: its header says class {label} but the set's index puts it in class {expected}; "
                           "the set is inconsistent: re-pack it (facecore pack rec)")
        return image, ""


def recordio_training_set(config: dict) -> Any:
    """The config's training set, which must read RecordIO records (a ``reader``, its ``keys`` and ``labels``)."""
    from ..core.build import build_train_dataset
    from ..data.recordio import RecordReader

    dataset = build_train_dataset(config, train=False)
    if not (isinstance(getattr(dataset, "reader", None), RecordReader) and hasattr(dataset, "keys")
            and hasattr(dataset, "labels")):
        data = config["data"]
        raise DataError(f"data.type: '{data['type']}' (data.root {data.get('root')}) is not a RecordIO training set; "
                        "clean reads and rewrites the records of train.rec/train.idx. Pack the images with "
                        "'facecore pack rec' and point data.root at that folder (data.type: recordio)")
    return dataset


def measure_angles(backbone: Any, dataset: Any, centers: Any, k: int, *, batch_size: int, device: Any,
                   num_workers: int = 0, img_size: int = 112, progress: bool = False) -> Angles:
    """Embed every image of ``dataset`` (one pass, eval mode, no mirror) and keep its (K,) cosines."""
    import torch

    from .evaluation import embedding_batches

    labels = np.asarray(dataset.labels, dtype=np.int64)
    cosines = np.empty((len(dataset), k), dtype=np.float64)
    items = _CheckedItems(dataset, img_size, str(getattr(dataset, "root", "") or type(dataset).__name__))
    on_device = centers.to(device)
    at = 0
    for feats, _ in embedding_batches(backbone, items, batch_size, device, flip=False, num_workers=num_workers,
                                      progress=progress, what="training set"):
        n = feats.shape[0]
        y = torch.from_numpy(labels[at : at + n]).to(device)
        cosines[at : at + n] = subcenter_cosines(feats, y, on_device, k).cpu().numpy()
        at += n
    return Angles(np.asarray(dataset.keys, dtype=np.int64), labels, cosines, int(dataset.num_classes))


# -- the outputs -------------------------------------------------------------------------------------
def write_kept_set(reader: Any, keys: np.ndarray, labels: np.ndarray, num_classes: int, img_size: int,
                   folder: Path) -> np.ndarray:
    """Copy the records ``keys`` (payloads unchanged) into ``folder``/train.rec, train.idx, property.

    InsightFace layout with every class kept (a class left without images gets an empty range), so
    the class ids and the class count stay those of the original set; images are ordered by class,
    then by their order in ``keys``. Returns each written image's new key, in the order of ``keys``.
    """
    from ..data.recordio import RecordWriter, pack

    folder.mkdir(parents=True, exist_ok=True)
    order = np.argsort(labels, kind="stable")
    new_keys = np.empty(len(keys), dtype=np.int64)
    new_keys[order] = np.arange(1, len(keys) + 1)
    first = len(keys) + 1  # the identity records' keys start here (a in record 0's label (a, b))
    starts = np.searchsorted(labels[order], np.arange(num_classes + 1)) + 1  # class c: keys starts[c]..starts[c+1]-1
    with RecordWriter(folder / "train.rec", folder / "train.idx") as writer:
        writer.write(0, pack([first, first + num_classes]))
        for i in order.tolist():
            writer.write(int(new_keys[i]), reader.read(int(keys[i])))
        for c in range(num_classes):
            writer.write(first + c, pack([int(starts[c]), int(starts[c + 1])], id=first + c))
    (folder / "property").write_text(f"{num_classes},{img_size},{img_size}\n")
    return new_keys


def _write_table(path: Path, header: Sequence[str], columns: Sequence[np.ndarray], formats: Sequence[str]) -> None:
    """A tab-separated file with a header row, written in blocks (the lists can be long)."""
    with path.open("w", encoding="ascii", newline="\n") as fh:
        fh.write("\t".join(header) + "\n")
        line = "\t".join(formats) + "\n"
        for lo in range(0, len(columns[0]), 65536):
            fh.write("".join(line.format(*row) for row in zip(*(c[lo : lo + 65536].tolist() for c in columns))))


@dataclass
class Cleaning:
    """What ``facecore clean`` found and wrote."""

    angles: Angles
    threshold: float
    centers_per_class: int
    output: Path
    checkpoint: str
    data_root: str

    @property
    def dropped(self) -> np.ndarray:
        """(N,) whether each image is dropped: its angle is above the threshold."""
        return self.angles.degrees > self.threshold

    def shares(self) -> list[dict]:
        """Images, kept and dropped among those nearest the dominant sub-center, the others, and all."""
        dropped, on = self.dropped, self.angles.on_dominant()
        groups = [("nearest the dominant sub-center", on), ("nearest another sub-center", ~on)]
        if self.centers_per_class == 1:
            groups = []
        rows = []
        for name, mask in groups + [("all", np.ones_like(on))]:
            rows.append({"images": name, "count": int(mask.sum()), "kept": int((mask & ~dropped).sum()),
                         "dropped": int((mask & dropped).sum())})
        return rows

    def summary(self) -> dict:
        """The numbers of summary.json."""
        labels, dropped = self.angles.labels, self.dropped
        num_classes = self.angles.num_classes
        before = np.bincount(labels, minlength=num_classes) > 0
        after = np.bincount(labels[~dropped], minlength=num_classes) > 0
        return {
            "checkpoint": self.checkpoint,
            "data_root": self.data_root,
            "threshold_degrees": self.threshold,
            "centers_per_class": self.centers_per_class,
            "images": int(labels.size),
            "kept": int((~dropped).sum()),
            "dropped": int(dropped.sum()),
            "classes": num_classes,
            "classes_left_without_images": int((before & ~after).sum()),
            "angle_percentiles": {str(p): float(np.percentile(self.angles.degrees, p)) for p in (50, 90, 99)},
            "shares": self.shares(),
            "files": {"kept_set": KEPT_DIR, "kept_list": KEPT_FILE, "dropped_list": DROPPED_FILE,
                      "histogram": HISTOGRAM_FILE},
        }

    def lines(self) -> list[str]:
        """The summary the command prints: kept and dropped counts with their shares, per sub-center group."""
        n = max(self.angles.labels.size, 1)
        pct = lambda x: f"{100 * x / n:.1f}%"  # noqa: E731
        out = [f"{self.angles.labels.size:,} images of {self.angles.num_classes:,} classes, "
               f"{self.centers_per_class} center(s) per class; dropped: angle to the class's dominant "
               f"sub-center > {self.threshold:g} degrees"]
        width = max(len(r["images"]) for r in self.shares())
        out.append(f"  {'images':<{width}}  {'count':>16}  {'kept':>16}  {'dropped':>16}")
        for r in self.shares():
            out.append(f"  {r['images']:<{width}}  {r['count']:>8,} {pct(r['count']):>7}  {r['kept']:>8,} "
                       f"{pct(r['kept']):>7}  {r['dropped']:>8,} {pct(r['dropped']):>7}")
        s = self.summary()
        if s["classes_left_without_images"]:
            out.append(f"  {s['classes_left_without_images']} class(es) lost every image (kept as empty classes)")
        return out

    def write(self, folder: Path, reader: Any, img_size: int) -> None:
        """The kept set, the kept and dropped lists, the histogram and summary.json, into ``folder``."""
        from .angle_plot import plot_angle_histogram

        a, dropped = self.angles, self.dropped
        kept = ~dropped
        new_keys = write_kept_set(reader, a.keys[kept], a.labels[kept], a.num_classes, img_size, folder / KEPT_DIR)
        _write_table(folder / KEPT_FILE, ["key", "original_key", "label", "angle"],
                     [new_keys, a.keys[kept], a.labels[kept], a.degrees[kept]], ["{}", "{}", "{}", "{:.3f}"])
        _write_table(folder / DROPPED_FILE, ["key", "label", "angle"],
                     [a.keys[dropped], a.labels[dropped], a.degrees[dropped]], ["{}", "{}", "{:.3f}"])
        plot_angle_histogram(a.degrees, self.threshold, folder / HISTOGRAM_FILE,
                             title=f"angle to the class's dominant sub-center ({a.labels.size:,} images)")
        (folder / SUMMARY_FILE).write_text(json.dumps(self.summary(), indent=2) + "\n")


def _check_output(output: Path, force: bool) -> None:
    if output.exists() and not output.is_dir():
        raise DataError(f"--output: {output} is a file; give a folder for the cleaned set")
    if output.is_dir() and any(output.iterdir()) and not force:
        raise DataError(f"--output: {output} is not empty; choose a new folder, or pass --force to replace it")


def _move_into_place(tmp: Path, output: Path) -> None:
    """Rename the finished ``tmp`` folder to ``output``; an existing ``output`` goes only once the new one is there."""
    if not output.exists():
        os.replace(tmp, output)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{output.name}.old-", dir=output.parent))
    os.replace(output, old / output.name)
    os.replace(tmp, output)
    shutil.rmtree(old, ignore_errors=True)


def clean(
    checkpoint_path: str | Path,
    output: str | Path,
    *,
    config_path: str | Path | None = None,
    overrides: Sequence[str] = (),
    threshold: float = DEFAULT_THRESHOLD,
    batch_size: int | None = None,
    device: str | None = None,
    num_workers: int | None = None,
    force: bool = False,
    progress: bool = False,
    say: Callable[[str], None] = lambda line: None,
) -> Cleaning:
    """Measure every training image's angle to its class's dominant sub-center and write the cleaned set.

    The config (``config_path``, else the checkpoint's own) names the backbone, the head (for K) and
    the RecordIO training set. Every input is checked before anything is written into ``output``.
    """
    import torch

    from ..core.build import build_head
    from ..core.checkpoint import load_checkpoint
    from .evaluation import load_trained_backbone, resolve_device

    threshold = check_threshold(threshold)
    output = Path(output)
    _check_output(output, force)
    obj = load_checkpoint(checkpoint_path, mmap=True)  # the optimizer state is never read
    centers = class_centers(obj, checkpoint_path)
    backbone, config, _ = load_trained_backbone(checkpoint_path, config_path, overrides, loaded=obj)
    dataset = recordio_training_set(config)
    k = int(getattr(build_head(config), "centers_per_class", 1))
    num_classes, embedding_size = int(dataset.num_classes), int(config["model"]["embedding_size"])
    declared = config["head"].get("num_classes")
    if declared is not None and declared != num_classes:
        raise DataError(f"head.num_classes is {declared} but the training set at data.root ({config['data']['root']}) "
                        f"has {num_classes} classes; clean needs the set the checkpoint was trained on")
    if tuple(centers.shape) != (num_classes * k, embedding_size):
        raise CheckpointError(
            f"{checkpoint_path}: the class centers are {tuple(centers.shape)}, but head '{config['head']['type']}' keeps "
            f"{k} per class and the training set at data.root ({config['data']['root']}) has {num_classes} classes: "
            f"expected ({num_classes * k}, {embedding_size}) (classes x K, model.embedding_size). Was the checkpoint "
            "trained on another set, or with another head.type or k?")
    run_device = resolve_device(device or config["device"])
    img_size = int(config["data"].get("img_size", 112))
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent))
    try:
        say(f"embedding {len(dataset):,} images of {config['data']['root']} with {checkpoint_path}")
        angles = measure_angles(backbone.to(run_device), dataset, centers.to(torch.float32), k,
                                batch_size=batch_size or config["eval"]["test_batch_size"], device=run_device,
                                num_workers=config["data"]["num_workers"] if num_workers is None else num_workers,
                                img_size=img_size, progress=progress)
        result = Cleaning(angles, threshold, k, output, str(checkpoint_path), str(config["data"]["root"]))
        if result.dropped.all():
            raise DataError(f"--threshold {threshold:g}: every image is further than that from its class's dominant "
                            "sub-center, so the kept set would be empty; raise the threshold (is the checkpoint "
                            "trained on this set?)")
        result.write(tmp, dataset.reader, img_size)
        _move_into_place(tmp, output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return result

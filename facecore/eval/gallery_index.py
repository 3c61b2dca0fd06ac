"""Gallery indexes for deployment: a gallery's embeddings, names and model fingerprint in one file.

A ``.fcidx`` file is an uncompressed zip holding

- ``header.json``: format and version, the model's fingerprint and description, one name per
  row (and per row the gallery image, or the number of images pooled into it), and the open-set
  thresholds calibrated on identities outside the gallery;
- ``embeddings.npy``: (N, D) float32 unit rows, one per identity (its images' normalized
  embeddings averaged and re-normalized) or one per image (``per_image``);
- ``calibration.npy`` (when calibrated): float32 best scores of the calibration images against
  the gallery, from which a threshold for any FPIR is read.

It loads with ``json`` and ``numpy.load(allow_pickle=False)``: nothing in it can run code.
Every member's CRC-32 is checked on reading, so a truncated or damaged file is refused.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import DataError, FacecoreError

FORMAT = "facecore-gallery-index"
VERSION = 1
SUFFIX = ".fcidx"
FPIR_TARGETS = (1e-1, 1e-2, 1e-3, 1e-4)
HEADER, EMBEDDINGS, CALIBRATION = "header.json", "embeddings.npy", "calibration.npy"
EMBED_CHUNK = 256  # images decoded and embedded at a time while building: bounds memory for any gallery size
SEARCHES = ("exact", "faiss")


def fpir_label(fpir: float) -> str:
    """``1e-03`` for 0.001: the spelling of FPIR targets in the header and in messages."""
    return f"{fpir:.0e}" if float(f"{fpir:.0e}") == fpir else f"{fpir:g}"


@dataclass(frozen=True)
class Match:
    """One gallery row found for a probe: its identity, cosine similarity and, per-image, its file."""

    name: str
    score: float
    image: str | None = None


@dataclass(frozen=True)
class Identification:
    """The answer for one probe image: the top-k gallery rows, and the open-set decision.

    ``threshold`` is None when there is none for ``fpir``; ``note`` then says why (an uncalibrated
    index, or too few calibration images to measure that FPIR).
    """

    matches: list[Match]
    fpir: float
    threshold: float | None
    note: str = ""

    @property
    def known(self) -> bool | None:
        """True when the best score is above the threshold, False at or below it ("unknown"), None without one.

        Strictly above: the convention the threshold was calibrated with (identification.open_set_threshold).
        """
        if self.threshold is None:
            return None
        return bool(self.matches) and self.matches[0].score > self.threshold

    @property
    def identity(self) -> str | None:
        """The best match's name when it is known (above the threshold), else None."""
        return self.matches[0].name if self.known else None


@dataclass
class GalleryIndex:
    """A searchable gallery (see the module docstring for the file)."""

    embeddings: np.ndarray  # (N, D) float32, unit rows
    names: list[str]  # one per row
    fingerprint: str
    model: dict  # fingerprint.model_description of the model that embedded it
    per_image: bool = False
    images: list[str] | None = None  # per_image: each row's file, relative to the gallery folder
    counts: list[int] | None = None  # templates: images pooled into each row
    gallery: str = ""  # the folder it was built from
    calibration_scores: np.ndarray | None = None  # best score of each calibration image (non-mated)
    calibration: dict = field(default_factory=dict)  # the calibration set: its folder (source), identities
    path: Path | None = None  # the file it was loaded from or saved to
    _faiss: Any = field(default=None, repr=False)

    @property
    def size(self) -> int:
        return int(self.embeddings.shape[0])

    @property
    def identities(self) -> int:
        return len(set(self.names))

    @property
    def calibrated(self) -> bool:
        return self.calibration_scores is not None

    def where(self) -> str:
        return str(self.path) if self.path is not None else "the gallery index"

    def threshold(self, fpir: float) -> tuple[float | None, str]:
        """The open-set threshold for ``fpir`` from the calibration scores, or None and why not."""
        from .identification import open_set_threshold

        if not 0 < fpir < 1:
            raise DataError(f"FPIR {fpir:g} is not between 0 and 1 (e.g. 1e-3: one in a thousand unknown faces "
                            "is taken for someone in the gallery)")
        if self.calibration_scores is None:
            return None, (f"{self.where()} is not calibrated, so there is no open-set threshold and no probe is "
                          "called unknown; rebuild it with 'facecore index build --calibrate DIR' (faces of "
                          "people outside the gallery)")
        found = open_set_threshold(self.calibration_scores, fpir)
        if found is None:
            n = int(self.calibration_scores.size)
            return None, (f"FPIR {fpir_label(fpir)} is not measurable with the {n} calibration images of "
                          f"{self.where()} (it needs at least {int(np.ceil(1 / fpir))}); no probe is called "
                          f"unknown. Choose a larger FPIR or calibrate with more images")
        return float(found), ""

    def thresholds(self) -> dict[str, float | None]:
        """The threshold at each of FPIR_TARGETS (None where not measurable); empty when uncalibrated."""
        if self.calibration_scores is None:
            return {}
        return {fpir_label(f): self.threshold(f)[0] for f in FPIR_TARGETS}

    def search(self, probes: np.ndarray, k: int, method: str = "exact") -> tuple[np.ndarray, np.ndarray]:
        """``(scores, rows)`` (P, k'), k' = min(k, N): the best gallery rows of each unit-norm probe, best first.

        ``exact``: every row scored (torch, in chunks); ``faiss``: an HNSW graph built on first use and kept
        (the optional extra ``faiss``; approximate, for galleries where exact search is too slow:
        docs/deployment-search.md says where that starts).
        """
        probes = np.ascontiguousarray(probes, dtype=np.float32)
        if probes.ndim != 2 or probes.shape[1] != self.embeddings.shape[1]:
            raise DataError(f"probe embeddings of shape {probes.shape} do not match the {self.embeddings.shape[1]}-d "
                            f"embeddings of {self.where()}")
        k = min(int(k), self.size)
        if k < 1:
            raise DataError(f"top-k must be at least 1 (got {k})")
        if method == "exact":
            import torch

            from .identification import search_topk

            scores, rows = search_topk(torch.from_numpy(probes), torch.from_numpy(self.embeddings), k)
            return scores.numpy(), rows.numpy()
        if method == "faiss":
            return faiss_search(self, probes, k)
        raise DataError(f"unknown search method '{method}': one of {', '.join(SEARCHES)}")

    def identify(self, probes: np.ndarray, fpir: float = 1e-3, top_k: int = 5,
                 method: str = "exact") -> list[Identification]:
        """Top-k matches and the open-set decision at ``fpir`` for each unit-norm probe embedding."""
        threshold, note = self.threshold(fpir)
        scores, rows = self.search(probes, top_k, method)
        out = []
        for s, r in zip(scores.tolist(), rows.tolist()):
            matches = [Match(self.names[j], float(v), self.images[j] if self.images else None)
                       for v, j in zip(s, r) if j >= 0]  # an approximate search may find fewer than k rows
            out.append(Identification(matches=matches, fpir=fpir, threshold=threshold, note=note))
        return out

    def check_model(self, fingerprint: str, model: dict, checkpoint: str = "this model") -> None:
        """Refuse to search with a model other than the one that built the index."""
        if fingerprint == self.fingerprint:
            return
        built = _describe_model(self.model)
        given = _describe_model(model)
        same = " (same architecture, other weights)" if built == given else ""
        raise DataError(
            f"{self.where()} was built with another model ({built}, fingerprint {self.fingerprint[:19]}...) than "
            f"{checkpoint} ({given}, fingerprint {fingerprint[:19]}...){same}: its embeddings cannot be compared. "
            f"Search it with the checkpoint it was built with, or rebuild it: facecore index build --checkpoint "
            f"{checkpoint} --gallery {self.gallery or 'DIR'} --output {self.path or 'gallery' + SUFFIX}"
        )

    def header(self) -> dict:
        """The JSON header written into the file."""
        calibration = None
        if self.calibration_scores is not None:
            calibration = {**self.calibration, "images": int(self.calibration_scores.size),
                           "thresholds": self.thresholds()}
        return {
            "format": FORMAT,
            "version": VERSION,
            "fingerprint": self.fingerprint,
            "model": self.model,
            "gallery": self.gallery,
            "per_image": self.per_image,
            "rows": self.size,
            "dim": int(self.embeddings.shape[1]),
            "names": list(self.names),
            "images": self.images,
            "counts": self.counts,
            "calibration": calibration,
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write the index atomically: a temporary file next to ``path``, then a rename (a failure leaves no file)."""
        path = Path(path)
        members: dict[str, bytes | np.ndarray] = {
            HEADER: json.dumps(self.header(), indent=1, ensure_ascii=False).encode(),
            EMBEDDINGS: self.embeddings.astype(np.float32, copy=False)}
        if self.calibration_scores is not None:
            members[CALIBRATION] = self.calibration_scores.astype(np.float32, copy=False)
        write_atomically(path, members)
        self.path = path
        return path


def _describe_model(model: dict) -> str:
    m = model.get("model", {}) if isinstance(model, dict) else {}
    return f"backbone '{m.get('backbone')}', embedding_size {m.get('embedding_size')}, input {model.get('img_size')}"


def check_writable(path: str | os.PathLike) -> None:
    """Fail before a long build when ``path`` cannot be written: its nearest existing folder is not writable."""
    folder = Path(path).resolve().parent
    while not folder.exists() and folder.parent != folder:
        folder = folder.parent
    if not os.access(folder, os.W_OK | os.X_OK):
        raise DataError(f"cannot write {path}: folder {folder} is not writable; choose another --output")


def write_atomically(path: Path, members: dict[str, bytes | np.ndarray]) -> None:
    """A zip of ``members`` (bytes, or arrays written as .npy; stored, not compressed) at ``path``, via a
    temporary file and a rename. Arrays are streamed into the zip: no second copy of a large gallery."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as fh:
            with zipfile.ZipFile(fh, "w", compression=zipfile.ZIP_STORED) as zf:
                for name, data in members.items():
                    if isinstance(data, np.ndarray):
                        with zf.open(name, "w", force_zip64=True) as member:
                            np.lib.format.write_array(member, np.ascontiguousarray(data), allow_pickle=False)
                    else:
                        zf.writestr(name, data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        tmp = None
    except OSError as exc:
        raise DataError(f"could not write {path}: {exc.strerror or exc}; nothing was written") from None
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass


def load_index(path: str | os.PathLike) -> GalleryIndex:
    """Read a ``.fcidx`` file (json + npy, no pickle) and check it whole; a DataError names the file and the fault."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"gallery index not found: {path} (make one with 'facecore index build')")
    rebuild = "rebuild it with 'facecore index build'"
    try:
        with zipfile.ZipFile(path) as zf:
            names = set(zf.namelist())
            if HEADER not in names or EMBEDDINGS not in names:
                raise DataError(f"{path} is a zip file but not a facecore gallery index (no {HEADER} / {EMBEDDINGS})")
            header = json.loads(zf.read(HEADER).decode())
            _check_header(path, header)
            embeddings = _read_array(zf, EMBEDDINGS)
            calibration = _read_array(zf, CALIBRATION) if header.get("calibration") is not None else None
    except zipfile.BadZipFile as exc:
        raise DataError(f"{path} is not a readable gallery index ({exc}: truncated or damaged); {rebuild}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: its header is not valid JSON ({exc}); {rebuild}") from None
    except (ValueError, KeyError, EOFError) as exc:
        raise DataError(f"{path} is not a readable gallery index ({exc}); {rebuild}") from None
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from None
    rows, dim = header["rows"], header["dim"]
    if embeddings.dtype != np.float32 or embeddings.shape != (rows, dim):
        raise DataError(f"{path}: embeddings are {embeddings.dtype} {embeddings.shape}, the header says float32 "
                        f"({rows}, {dim}); {rebuild}")
    if not all(np.isfinite(embeddings[i:i + 65536]).all() for i in range(0, rows, 65536)):
        raise DataError(f"{path}: some embeddings are NaN or infinite; {rebuild}")
    for key in ("images", "counts"):
        if header.get(key) is not None and len(header[key]) != rows:
            raise DataError(f"{path}: {len(header[key])} entries in '{key}' for {rows} rows; {rebuild}")
    if calibration is not None and (calibration.ndim != 1 or calibration.size == 0):
        raise DataError(f"{path}: calibration scores of shape {calibration.shape}; {rebuild}")
    cal = {k: v for k, v in (header.get("calibration") or {}).items() if k not in ("images", "thresholds")}
    return GalleryIndex(embeddings=embeddings, names=list(header["names"]), fingerprint=header["fingerprint"],
                        model=header["model"], per_image=bool(header["per_image"]), images=header.get("images"),
                        counts=header.get("counts"), gallery=header.get("gallery", ""),
                        calibration_scores=calibration, calibration=cal, path=path)


def _read_array(zf: zipfile.ZipFile, name: str) -> np.ndarray:
    if name not in zf.namelist():
        raise KeyError(f"member {name} is missing")
    with zf.open(name) as fh:
        array = np.lib.format.read_array(fh, allow_pickle=False)
        if fh.read(1):
            raise ValueError(f"member {name} has bytes after its array")
    return array


def _check_header(path: Path, header: Any) -> None:
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise DataError(f"{path} is not a facecore gallery index (its header names no '{FORMAT}' format)")
    if header.get("version") != VERSION:
        raise DataError(f"{path} is a gallery index of format version {header.get('version')}; this facecore reads "
                        f"version {VERSION}: rebuild it with this facecore's 'facecore index build'")
    problems = [key for key, kind in (("fingerprint", str), ("model", dict), ("names", list), ("rows", int),
                                      ("dim", int), ("per_image", bool)) if not isinstance(header.get(key), kind)]
    if problems:
        raise DataError(f"{path}: header field(s) {', '.join(problems)} missing or of the wrong type; rebuild it")
    if len(header["names"]) != header["rows"] or not all(isinstance(n, str) for n in header["names"]):
        raise DataError(f"{path}: the header holds {len(header['names'])} names for {header['rows']} rows; rebuild it")


# ---- building ---------------------------------------------------------------------------------------------


def _images_in(folder: Path) -> list[Path]:
    from ..data.images import IMAGE_EXTENSIONS

    return sorted(Path(e.path) for e in os.scandir(folder)
                  if e.is_file() and not e.name.startswith(".") and os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS)


def calibration_images(root: str | os.PathLike, gallery_names: Sequence[str]) -> tuple[list[Path], int]:
    """Images of ``root`` for calibration: one sub-folder per identity and/or loose images (each someone);
    ``(paths, identities)``. An identity also in the gallery is refused: its faces are not unknown."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"calibration folder {root} not found; expected {root}/<identity>/<image>.jpg "
                        "(people who are not in the gallery)")
    overlap = sorted(set(gallery_names) & {e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith(".")})
    if overlap:
        raise DataError(f"calibration folder {root} has identities that are in the gallery ({', '.join(overlap[:5])}"
                        f"{' ...' if len(overlap) > 5 else ''}); calibration needs people outside the gallery: "
                        "remove them from it")
    loose = _images_in(root)
    paths, identities = list(loose), len(loose)
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        if entry.is_dir() and not entry.name.startswith("."):
            found = _images_in(Path(entry.path))
            paths += found
            identities += bool(found)
    if not paths:
        raise DataError(f"calibration folder {root} holds no .jpg/.jpeg/.png images (directly or one folder down)")
    return paths, identities


def embed_files(predictor: Any, paths: Sequence[Path], progress: bool = False, what: str = "gallery") -> np.ndarray:
    """Unit embeddings (N, D) float32 of image files with the predictor's protocol, EMBED_CHUNK files at a time."""
    from tqdm import tqdm

    out = []
    with tqdm(total=len(paths), unit="img", desc=f"embed {what}", leave=False,
              disable=not progress or not sys.stderr.isatty()) as bar:
        for start in range(0, len(paths), EMBED_CHUNK):
            chunk = [str(p) for p in paths[start:start + EMBED_CHUNK]]
            out.append(predictor.embed(chunk))
            bar.update(len(chunk))
    return np.concatenate(out)


def pool_identities(embeddings: np.ndarray, labels: np.ndarray, count: int) -> np.ndarray:
    """One template per label: the mean of its unit embeddings, re-normalized (rows in label order)."""
    from .evaluation import l2_normalize

    sums = np.zeros((count, embeddings.shape[1]), dtype=np.float64)
    np.add.at(sums, labels, embeddings.astype(np.float64))
    return l2_normalize(sums / np.bincount(labels, minlength=count)[:, None]).astype(np.float32)


def build_index(predictor: Any, gallery: str | os.PathLike, *, per_image: bool = False,
                calibrate: str | os.PathLike | None = None, progress: bool = False) -> GalleryIndex:
    """Embed ``gallery`` (``<identity>/<image>`` folders) with ``predictor`` into a GalleryIndex.

    One row per identity (its images pooled), or per image with ``per_image``. With ``calibrate`` (faces of
    people not in the gallery), each calibration image's best score against the gallery is kept: the
    open-set thresholds come from them.
    """
    from ..data.images import list_image_folder

    gallery = Path(gallery)
    classes, items = list_image_folder(gallery)
    # Reject a calibration folder before the (long) gallery pass when it overlaps or is empty.
    cal_paths, cal_identities = calibration_images(calibrate, classes) if calibrate is not None else ([], 0)
    paths = [p for p, _ in items]
    labels = np.array([c for _, c in items], dtype=np.int64)
    embeddings = embed_files(predictor, paths, progress)
    if per_image:
        rows, names = embeddings, [classes[c] for c in labels]
        images, counts = [p.relative_to(gallery).as_posix() for p in paths], None
    else:
        rows, names = pool_identities(embeddings, labels, len(classes)), list(classes)
        images, counts = None, np.bincount(labels, minlength=len(classes)).tolist()
    index = GalleryIndex(embeddings=rows, names=names, fingerprint=predictor.fingerprint,
                         model=predictor.model_description, per_image=per_image, images=images, counts=counts,
                         gallery=str(gallery))
    if calibrate is not None:
        probes = embed_files(predictor, cal_paths, progress, what="calibration")
        index.calibration_scores = index.search(probes, 1)[0][:, 0].astype(np.float32)
        index.calibration = {"source": str(calibrate), "identities": cal_identities}
    return index


def faiss_search(index: GalleryIndex, probes: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Approximate top-k with a faiss HNSW graph over the gallery (inner product), built once per GalleryIndex.

    Rows it could not fill (fewer than k found) are -1 with score -inf.
    """
    try:
        import faiss
    except ImportError:
        raise FacecoreError("search 'faiss' needs the faiss extra: pip install 'facecore[faiss]'") from None
    if index._faiss is None:
        graph = faiss.IndexHNSWFlat(index.embeddings.shape[1], HNSW_M, faiss.METRIC_INNER_PRODUCT)
        graph.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        graph.add(np.ascontiguousarray(index.embeddings))
        index._faiss = graph
    index._faiss.hnsw.efSearch = max(HNSW_EF_SEARCH, k)
    scores, rows = index._faiss.search(probes, k)
    scores[rows < 0] = -np.inf
    return scores.astype(np.float32), rows.astype(np.int64)


# HNSW parameters: see benchmarks/index_search.py and docs/deployment-search.md for recall and speed.
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 80
HNSW_EF_SEARCH = 256


__all__ = ["FPIR_TARGETS", "GalleryIndex", "Identification", "Match", "build_index", "fpir_label", "load_index"]

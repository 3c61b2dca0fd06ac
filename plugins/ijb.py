"""The ``ijb`` template set: IJB-B / IJB-C 1:1 verification and 1:N identification in InsightFace's layout.

    <root>/IJBC/meta/ijbc_face_tid_mid.txt         image_name template_id media_id
    <root>/IJBC/meta/ijbc_template_pair_label.txt  template_1 template_2 label (1: same person)
    <root>/IJBC/meta/ijbc_name_5pts_score.txt      image_name x1 y1 ... x5 y5 detector_score
    <root>/IJBC/loose_crop/<image_name>            the loose face crops

    <root>/IJBC/meta/ijbc_1N_gallery_G1.csv, ijbc_1N_gallery_G2.csv, ijbc_1N_probe_mixed.csv
                                                   TEMPLATE_ID,SUBJECT_ID,... (1:N; header row)

(``ijbb_`` files under IJBB/ for IJB-B, with galleries S1 and S2; ``root`` may also be the IJBC/
folder itself.) Every file is read and cross-checked when the set is built, so a missing file,
an image without landmarks, landmarks for a missing image or a template without images is
reported before the embedding pass starts. Items are the crops aligned to the ArcFace template.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np

from facecore import hookimpl
from facecore.data.landmarks import listing, read_landmark_file
from facecore.errors import DataError
from facecore.eval.ijb_1n import PROTOCOLS, check_1n_templates, meta_files_1n, read_meta_1n

TARGETS = ("IJBC", "IJBB")

SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["root"],
    "properties": {
        "root": {"type": "string",
                 "description": "The IJB release folder holding <target>/meta and <target>/loose_crop, or the "
                                "<target> folder itself."},
        "target": {"enum": list(TARGETS), "default": "IJBC", "description": "Which set: IJBC or IJBB."},
        "img_size": {"type": "integer", "minimum": 8, "default": 112,
                     "description": "Side of the aligned crops (the ArcFace template is scaled to it)."},
        "protocol": {"enum": ["auto", "1:1", "1:N", "both"], "default": "auto",
                     "description": "Which meta files to read: 1:1 (pairs), 1:N (galleries and probes), both, or "
                                    "auto (1:1, and 1:N when its files are there)."},
    },
}


def meta_files(target: str) -> dict[str, str]:
    """The three meta file names of a target."""
    prefix = target.lower()
    return {"faces": f"{prefix}_face_tid_mid.txt", "pairs": f"{prefix}_template_pair_label.txt",
            "landmarks": f"{prefix}_name_5pts_score.txt"}


def locate(root: str | os.PathLike, target: str) -> Path:
    """The folder holding ``meta/`` and ``loose_crop/``: ``root/<target>`` or ``root`` itself."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"IJB folder not found: {root} (expected the folder holding {target}/meta and "
                        f"{target}/loose_crop)")
    for folder in (root / target, root):
        if (folder / "meta").is_dir():
            return folder
    raise DataError(f"{root} holds neither {target}/meta/ nor meta/; expected {root}/{target}/meta/"
                    f"{meta_files(target)['faces']} and the other IJB meta files, and {root}/{target}/loose_crop/")


def _read_lines(path: Path) -> list[str]:
    try:
        return path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from None


def read_face_file(path: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    """``image_name template_id media_id`` lines -> names, template ids, media ids."""
    names, templates, medias = [], [], []
    for number, line in enumerate(_read_lines(path), 1):
        parts = line.split()
        if not parts:
            continue
        try:
            if len(parts) != 3:
                raise ValueError
            template, media = int(parts[1]), int(parts[2])
        except ValueError:
            raise DataError(f"{path} line {number}: expected 'image_name template_id media_id' (two integers), "
                            f"got {line[:80]!r}") from None
        names.append(parts[0])
        templates.append(template)
        medias.append(media)
    if not names:
        raise DataError(f"{path} lists no images; expected lines of 'image_name template_id media_id'")
    return names, np.asarray(templates, dtype=np.int64), np.asarray(medias, dtype=np.int64)


def read_pair_file(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """``template_1 template_2 label`` lines -> pairs (P, 2) int64 and labels (P,) int8, parsed in C."""
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "input contained no data": reported below as an error
            table = np.loadtxt(path, dtype=np.int64, ndmin=2, comments=None)
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc}") from None
    except ValueError:
        table = None
    if table is None or table.shape[1:] != (3,):
        _report_bad_pair_line(path)
    if table.shape[0] == 0:
        raise DataError(f"{path} lists no template pairs; expected lines of 'template_1 template_2 label'")
    labels = table[:, 2]
    bad = np.flatnonzero((labels != 0) & (labels != 1))
    if bad.size:
        raise DataError(f"{path}: the label of pair {bad[0] + 1} is {labels[bad[0]]}; labels are 1 (same person) or "
                        "0 (different people)")
    return np.ascontiguousarray(table[:, :2]), labels.astype(np.int8)


def _report_bad_pair_line(path: Path) -> None:
    """Find the first malformed line (the fast parser only says that one exists) and raise about it."""
    for number, line in enumerate(_read_lines(path), 1):
        parts = line.split()
        if not parts:
            continue
        try:
            if len(parts) != 3:
                raise ValueError
            [int(p) for p in parts]
        except ValueError:
            raise DataError(f"{path} line {number}: expected 'template_1 template_2 label' (three integers), "
                            f"got {line[:80]!r}") from None
    raise DataError(f"{path} lists no template pairs; expected lines of 'template_1 template_2 label'")


class IJBTemplateSet:
    """The aligned face images of an IJB set in the order of its face file, and its protocol.

    ``templates``, ``medias``, ``scores`` (detector scores) per image; ``pairs`` (P, 2) template
    ids and ``labels`` (P,) per template pair (none with protocol 1:N); ``galleries`` ({name: (G, 2)})
    and ``probes`` ((P, 2)): rows of (template id, subject id) for 1:N, or None; ``name`` is the target. An item is
    ``(image, problem)``: the (3, img_size, img_size) crop in [-1, 1] and "" , or a black image
    and a message naming the file when it cannot be read (raised by the evaluator).
    """

    def __init__(self, root: str, target: str = "IJBC", img_size: int = 112, protocol: str = "auto"):
        if target not in TARGETS:
            raise DataError(f"IJB target must be one of {', '.join(TARGETS)}, got {target!r}")
        if protocol not in PROTOCOLS:
            raise DataError(f"IJB protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
        self.name = target
        self.img_size = img_size
        self.folder = locate(root, target)
        meta = self.folder / "meta"
        needed = meta_files(target)
        if protocol == "1:N":  # the pair list is the 1:1 protocol's
            del needed["pairs"]
        files = {key: meta / name for key, name in needed.items()}
        missing = [p.name for p in files.values() if not p.is_file()]
        self.image_dir = self.folder / "loose_crop"
        if not self.image_dir.is_dir():
            missing.append("../loose_crop/")
        if missing:
            raise DataError(f"{meta} lacks {', '.join(missing)}; an {target} folder holds meta/"
                            + ", meta/".join(needed.values()) + " and loose_crop/")
        self.files = files
        names, self.templates, self.medias = read_face_file(files["faces"])
        self.image_names = names
        self.landmarks, self.scores = self._join_landmarks(names, files["landmarks"])
        if "pairs" in files:
            self.pairs, self.labels = read_pair_file(files["pairs"])
            self._check_pair_templates()
        else:
            self.pairs, self.labels = np.zeros((0, 2), dtype=np.int64), np.zeros(0, dtype=np.int8)
        self.galleries, self.probes = self._read_1n(meta, target, protocol)

    def _read_1n(self, meta: Path, target: str, protocol: str):
        """The 1:N galleries and probes, or (None, None) when the protocol leaves 1:N out."""
        files = {key: meta / name for key, name in meta_files_1n(target).items()}
        present = [p for p in files.values() if p.is_file()]
        if protocol == "1:1" or (protocol == "auto" and not present):
            return None, None
        if protocol == "auto" and len(present) < len(files):
            absent = [p.name for p in files.values() if not p.is_file()]
            raise DataError(f"{meta} has {', '.join(p.name for p in present)} but lacks {', '.join(absent)}: add "
                            "the missing 1:N files, or pass --ijb-protocol 1:1 (eval.ijb.protocol) to skip 1:N")
        galleries, probes = read_meta_1n(meta, target)
        check_1n_templates(galleries, probes, np.unique(self.templates), files, self.files["faces"])
        return galleries, probes

    def _join_landmarks(self, names: list[str], path: Path) -> tuple[np.ndarray, np.ndarray]:
        """Landmarks and detector scores in face-file order; every image needs one, every landmark an image."""
        marks = read_landmark_file(path)
        no_score = np.flatnonzero(np.isnan(marks.scores))
        if no_score.size:
            raise DataError(f"{path} line {marks.lines[no_score[0]]}: no detector score; lines are 'image_name x1 y1 "
                            "... x5 y5 score' (11 numbers)")
        existing = set(os.listdir(self.image_dir))
        absent = [f"{n} (line {line})" for n, line in zip(marks.names, marks.lines)
                  if n not in existing and not (self.image_dir / n).is_file()]
        if absent:
            raise DataError(f"{path} has landmarks for {len(absent)} image(s) that are not in {self.image_dir}: "
                            f"{listing(absent)}")
        if marks.names == names:  # the published files list the images in the same order
            return marks.points.astype(np.float32), marks.scores
        where: dict[str, int] = {}
        for i, n in enumerate(marks.names):
            if n in where:
                raise DataError(f"{path}: {n} has landmarks on two lines ({marks.lines[where[n]]} and {marks.lines[i]})")
            where[n] = i
        without = [n for n in names if n not in where]
        if without:
            raise DataError(f"{len(without)} image(s) of {self.files['faces']} have no landmarks in {path}: "
                            f"{listing(without)}")
        index = np.array([where[n] for n in names])
        return marks.points[index].astype(np.float32), marks.scores[index]

    def _check_pair_templates(self) -> None:
        known = np.unique(self.templates)
        unknown = ~np.isin(self.pairs, known)
        if unknown.any():
            rows = np.flatnonzero(unknown.any(axis=1))
            ids = np.unique(self.pairs[unknown])
            shown = [f"{t} (pair {np.flatnonzero((self.pairs == t).any(axis=1))[0] + 1})" for t in ids[:5]]
            raise DataError(f"{self.files['pairs']} names {ids.size} template(s) that have no images in "
                            f"{self.files['faces']}: {listing(shown)}{', ...' if ids.size > 5 else ''} "
                            f"({rows.size} pair(s) affected)")

    def __len__(self) -> int:
        return len(self.image_names)

    def __getitem__(self, index: int):
        import torch

        from facecore.data.align import alignment_matrix, warp_affine
        from facecore.data.images import decode_chw, normalize

        path = self.image_dir / self.image_names[index]
        try:
            chw = decode_chw(path.read_bytes())
            crop = warp_affine(chw.permute(1, 2, 0).numpy(), alignment_matrix(self.landmarks[index], self.img_size),
                               self.img_size)
        except OSError as exc:
            return torch.zeros(3, self.img_size, self.img_size), f"{path} cannot be read ({exc.strerror or exc})"
        except DataError as exc:
            return torch.zeros(3, self.img_size, self.img_size), f"{path}: {exc}"
        return normalize(torch.from_numpy(np.ascontiguousarray(crop.transpose(2, 0, 1)))), ""


@hookimpl
def register_datasets(register):
    register("ijb", IJBTemplateSet, schema=SCHEMA,
             description="IJB-B/IJB-C template set, 1:1 and 1:N (InsightFace layout: meta/ + loose_crop/), aligned by its 5 landmarks")

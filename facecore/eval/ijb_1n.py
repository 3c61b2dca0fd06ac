"""IJB-B / IJB-C 1:N identification: the meta files, and the open- and closed-set protocol on pooled templates.

Meta files (InsightFace's IJB release, beside the 1:1 files in ``<target>/meta``)::

    ijbc_1N_gallery_G1.csv  ijbc_1N_gallery_G2.csv  ijbc_1N_probe_mixed.csv     (IJB-C)
    ijbb_1N_gallery_S1.csv  ijbb_1N_gallery_S2.csv  ijbb_1N_probe_mixed.csv     (IJB-B)

comma-separated with a header row, TEMPLATE_ID and SUBJECT_ID first (NIST's originals carry more
columns and one row per image: extra columns are ignored, repeated template rows must agree).
Templates are pooled exactly as for 1:1 (:mod:`facecore.eval.ijb`), then each gallery is
searched on its own (open set) and the two together (the closed-set numbers of older tables);
docs/identification.md states every convention. (No torch import at module level: the ``ijb``
plugin imports the readers.)
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import DataError

if TYPE_CHECKING:
    from .identification_report import IdentificationResult

GALLERIES = {"IJBC": ("G1", "G2"), "IJBB": ("S1", "S2")}
PROTOCOLS = ("auto", "1:1", "1:N", "both")


def meta_files_1n(target: str) -> dict[str, str]:
    """``{gallery name: file, ..., "probe": file}`` of a target's 1:N meta files."""
    prefix = target.lower()
    files = {g: f"{prefix}_1N_gallery_{g}.csv" for g in GALLERIES[target]}
    files["probe"] = f"{prefix}_1N_probe_mixed.csv"
    return files


def _ints(fields: list[str]) -> tuple[int, int] | None:
    try:
        return int(fields[0]), int(fields[1])
    except (ValueError, IndexError):
        return None


def read_template_subjects(path: str | os.PathLike) -> np.ndarray:
    """A 1:N meta file -> (T, 2) int64 rows ``(template id, subject id)``, one per template, sorted by template.

    The first line is a header unless it starts with two integers. A line without two
    integers, a negative id, a template listed with two subjects, or a file without rows is a
    DataError naming the file and line.
    """
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        raise DataError(f"1:N meta file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from None
    subject_of: dict[int, tuple[int, int]] = {}  # template -> (subject, line)
    first = True
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        fields = [f.strip() for f in line.split(",")]
        ids = _ints(fields)
        if first:
            first = False
            if ids is None:  # the header row
                if not fields[0].upper().startswith("TEMPLATE"):
                    raise DataError(f"{path} line {number}: expected the header TEMPLATE_ID,SUBJECT_ID,... "
                                    f"or rows of 'template_id,subject_id', got {line[:80]!r}")
                continue
        if ids is None:
            raise DataError(f"{path} line {number}: expected 'TEMPLATE_ID,SUBJECT_ID,...' (two integers first), "
                            f"got {line[:80]!r}")
        template, subject = ids
        if template < 0 or subject < 0:
            raise DataError(f"{path} line {number}: template and subject ids are non-negative, got {line[:80]!r}")
        seen = subject_of.get(template)
        if seen is None:
            subject_of[template] = (subject, number)
        elif seen[0] != subject:
            raise DataError(f"{path}: template {template} belongs to subject {seen[0]} on line {seen[1]} "
                            f"but to subject {subject} on line {number}")
    if not subject_of:
        raise DataError(f"{path} lists no templates; expected a header and rows of 'TEMPLATE_ID,SUBJECT_ID,...'")
    table = np.array([(t, s) for t, (s, _) in subject_of.items()], dtype=np.int64)
    return table[np.argsort(table[:, 0], kind="stable")]


def read_meta_1n(meta: str | os.PathLike, target: str) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """``({gallery name: (G, 2)}, probes (P, 2))`` from ``meta``; a missing file or a template both
    in a gallery and among the probes is a DataError naming the files."""
    meta = Path(meta)
    files = meta_files_1n(target)
    missing = [n for n in files.values() if not (meta / n).is_file()]
    if missing:
        raise DataError(f"{meta} lacks {', '.join(missing)}: the 1:N protocol of {target} needs "
                        + ", ".join(files.values()))
    galleries = {g: read_template_subjects(meta / files[g]) for g in GALLERIES[target]}
    probes = read_template_subjects(meta / files["probe"])
    for g, table in galleries.items():
        both = np.intersect1d(table[:, 0], probes[:, 0])
        if both.size:
            raise DataError(f"template {both[0]} is in both {meta / files[g]} and {meta / files['probe']} "
                            f"({both.size} template(s) in both); a probe cannot be its own gallery template")
    return galleries, probes


def check_1n_templates(galleries: dict[str, np.ndarray], probes: np.ndarray, known: np.ndarray,
                       files: dict[str, Path], face_file: str | os.PathLike) -> None:
    """Every 1:N template has images in the face file; else a DataError naming both files and the templates."""
    for key, table in [*galleries.items(), ("probe", probes)]:
        absent = np.setdiff1d(table[:, 0], known)
        if absent.size:
            shown = ", ".join(str(t) for t in absent[:5]) + (f" and {absent.size - 5} more" if absent.size > 5 else "")
            raise DataError(f"{files[key]} names {absent.size} template(s) that have no images in {face_file}: "
                            f"{shown}")


def identification(
    template_ids: np.ndarray,
    template_features: np.ndarray,
    galleries: dict[str, np.ndarray],
    probes: np.ndarray,
    name: str,
    *,
    ranks: tuple[int, ...] | None = None,
    fpir_targets: tuple[float, ...] | None = None,
) -> "IdentificationResult":
    """Open set per gallery and the closed set on the merged galleries, from pooled template features.

    ``template_ids`` sorted (as :func:`~facecore.eval.ijb.pool_templates` returns them) with
    their L2-normalized features; ``galleries``/``probes`` (T, 2) rows (template, subject).
    """
    import torch

    from .identification import FPIR_TARGETS, RANKS, identify
    from .identification_report import IdentificationResult
    from .ijb import template_rows

    ranks, fpir_targets = ranks or RANKS, fpir_targets or FPIR_TARGETS

    start = time.perf_counter()
    features = torch.from_numpy(np.ascontiguousarray(template_features, dtype=np.float32))
    probe_rows = template_rows(template_ids, probes[:, 0]).astype(np.int64)
    probe_feats = features[probe_rows]
    opened, searches, gallery_rows = {}, {}, {}
    for g, table in galleries.items():
        gallery_rows[g] = template_rows(template_ids, table[:, 0]).astype(np.int64)
        found, opened[g], _ = identify(probe_feats, probes[:, 1], features[gallery_rows[g]], table[:, 1],
                                       closed_set_numbers=False, ranks=ranks, fpir_targets=fpir_targets)
        searches[g] = found
    merged = np.concatenate(list(galleries.values()))
    merged = merged[np.unique(merged[:, 0], return_index=True)[1]]
    merged_rows = template_rows(template_ids, merged[:, 0]).astype(np.int64)
    merged_name = "+".join(galleries)
    found, _, closed = identify(probe_feats, probes[:, 1], features[merged_rows], merged[:, 1],
                                open_set_numbers=False, ranks=ranks, fpir_targets=fpir_targets)
    searches[merged_name] = found
    arrays = {"probe_template_ids": probes[:, 0], "probe_subject_ids": probes[:, 1],
              "probe_template_features": probe_feats.numpy()}
    for g, table in galleries.items():
        arrays[f"{g.lower()}_template_ids"] = table[:, 0]
        arrays[f"{g.lower()}_subject_ids"] = table[:, 1]
    return IdentificationResult(
        name=name, open_sets=opened, closed=closed, closed_gallery=merged_name, probes=int(probes.shape[0]),
        sizes={g: int(t.shape[0]) for g, t in galleries.items()}, searches=searches,
        gallery_features={g: features[r] for g, r in gallery_rows.items()}, probe_features=probe_feats,
        arrays=arrays, seconds={"search": time.perf_counter() - start}, mean_of=tuple(galleries),
    )


__all__ = ["GALLERIES", "PROTOCOLS", "check_1n_templates", "identification", "meta_files_1n", "read_meta_1n",
           "read_template_subjects"]

"""A small synthetic IJB-C (or IJB-B) in the published layout, for tests and for trying ``facecore eval --ijb``.

Each image is a synthetic face (facecore.data.synthetic) rendered as an aligned 112x112
crop, then placed into a bigger "loose crop" by a random similarity transform (scale,
rotation, shift) over a random background. Its landmarks are the ArcFace template points
mapped through that transform, so aligning the loose crop gives back the rendered face;
each gets a random detector score. Identities have a few templates, a template 1-3 medias,
a media 1-3 images; the pairs are every pair of templates (same identity: label 1). The 1:N
files follow IJB-C's design: each identity's first template is its gallery template, in G1
for even and G2 for odd identities (S1/S2 for IJB-B), and its other templates are probes, so
each gallery has mated and non-mated probes. They are written like NIST's originals: a header,
one row per image, TEMPLATE_ID,SUBJECT_ID,FILENAME.
Deterministic from the seed; numpy + Pillow only.
"""

from __future__ import annotations

import math
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import DataError
from .align import template, transform_points, warp_affine
from .synthetic import encode_jpeg, random_identity, render

IJB_STREAM = 2  # identity stream of facecore.data.synthetic not used by the quick start's train (0) or test (1) sets


def loose_crop(face: np.ndarray, rng: np.random.Generator, *, scale: tuple[float, float] = (1.2, 2.0),
               max_roll: float = 20.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(loose crop, its 5 landmarks (5, 2), the 2x3 matrix aligned -> loose)`` for an aligned (S, S, 3) face.

    The face is scaled by ``scale``, rotated by up to ``max_roll`` degrees and shifted inside a
    canvas big enough to hold all of it; the rest of the canvas is a random smooth background.
    """
    size = face.shape[0]
    s = rng.uniform(*scale)
    roll = math.radians(rng.uniform(-max_roll, max_roll))
    extent = size * s * (abs(math.cos(roll)) + abs(math.sin(roll)))  # side of the rotated face's bounding box
    margin = rng.uniform(0.05, 0.25) * extent
    canvas = int(math.ceil(extent + 2 * margin))
    rotation = s * np.array([[math.cos(roll), -math.sin(roll)], [math.sin(roll), math.cos(roll)]])
    centre = (size - 1) / 2
    where = canvas / 2 - 0.5 + rng.uniform(-0.8, 0.8, 2) * margin  # the face centre, inside the margins
    matrix = np.hstack([rotation, (where - rotation @ np.array([centre, centre]))[:, None]])
    warped = warp_affine(face, matrix, canvas).astype(np.float32)
    coverage = warp_affine(np.full(face.shape[:2], 255, np.uint8), matrix, canvas).astype(np.float32)[..., None] / 255
    out = warped + _background(rng, canvas) * (1 - coverage)  # warped is already weighted by coverage
    return np.clip(np.rint(out), 0, 255).astype(np.uint8), transform_points(matrix, template(size)), matrix


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A smooth random colour field with some noise, (size, size, 3) float32."""
    small = rng.uniform(0, 255, (4, 4, 3)).astype(np.uint8)
    field = np.asarray(Image.fromarray(small).resize((size, size), Image.BILINEAR), dtype=np.float32)
    return field + rng.normal(0, 6, field.shape).astype(np.float32)


def make_ijb_data(
    out_dir: str | Path,
    *,
    target: str = "IJBC",
    identities: int = 40,
    templates_per_identity: int = 3,
    seed: int = 0,
    force: bool = False,
    progress: bool = True,
) -> dict:
    """Write ``out_dir/<target>/meta/*.txt`` and ``out_dir/<target>/loose_crop/*.jpg``; return a summary.

    Refuses a non-empty ``out_dir/<target>`` unless ``force`` (then it is replaced).
    """
    if target not in ("IJBC", "IJBB"):
        raise DataError(f"target must be IJBC or IJBB, got {target!r}")
    if identities < 2 or templates_per_identity < 2:
        raise DataError("a synthetic IJB set needs at least 2 identities with 2 templates each (for same-person pairs)")
    folder = Path(out_dir) / target
    if folder.exists() and any(folder.iterdir()):
        if not force:
            raise DataError(f"{folder} is not empty; choose another folder or pass --force to replace it")
        shutil.rmtree(folder)
    meta, crops = folder / "meta", folder / "loose_crop"
    meta.mkdir(parents=True)
    crops.mkdir()
    rng = np.random.default_rng([seed, IJB_STREAM])
    faces, landmark_lines, pair_lines = [], [], []
    template_ids, owner = [], []
    one_to_n: dict[str, list[str]] = {}  # 1:N file -> rows
    media_id, medias, image_no = 0, 0, 0
    from tqdm import tqdm

    bar = tqdm(total=identities, desc="IJB identities", unit="id", disable=not progress or not sys.stderr.isatty())
    files_1n = _files_1n(target)
    for person in range(identities):
        ident = random_identity(np.random.default_rng([seed, IJB_STREAM, person]))
        for which in range(templates_per_identity):
            tid = 1 + len(template_ids) * 3 + int(rng.integers(0, 3))  # sparse ids, as in the real files
            template_ids.append(tid)
            owner.append(person)
            rows_1n = one_to_n.setdefault(files_1n[person % 2] if which == 0 else files_1n[2], [])
            for _ in range(int(rng.integers(1, 4))):
                media_id += 1 + int(rng.integers(0, 2))  # sparse ids
                medias += 1
                for _ in range(int(rng.integers(1, 4))):
                    image_no += 1
                    face, _ = render(ident, np.random.default_rng([seed, IJB_STREAM, person, image_no]))
                    crop, points, _ = loose_crop(np.asarray(face), rng)
                    name = f"{image_no}.jpg"
                    (crops / name).write_bytes(encode_jpeg(Image.fromarray(crop), quality=95))
                    faces.append(f"{name} {tid} {media_id}")
                    rows_1n.append(f"{tid},{person + 1},{name}")
                    score = rng.uniform(0.4, 1.0)
                    landmark_lines.append(f"{name} " + " ".join(f"{v:.3f}" for v in points.ravel()) + f" {score:.4f}")
        bar.update(1)
    bar.close()
    for i in range(len(template_ids)):
        for j in range(i + 1, len(template_ids)):
            pair_lines.append(f"{template_ids[i]} {template_ids[j]} {int(owner[i] == owner[j])}")
    order = rng.permutation(len(pair_lines))  # the pairs in no particular order
    prefix = target.lower()
    (meta / f"{prefix}_face_tid_mid.txt").write_text("\n".join(faces) + "\n")
    (meta / f"{prefix}_name_5pts_score.txt").write_text("\n".join(landmark_lines) + "\n")
    (meta / f"{prefix}_template_pair_label.txt").write_text("\n".join(pair_lines[i] for i in order) + "\n")
    for file_name in files_1n:
        (meta / file_name).write_text("TEMPLATE_ID,SUBJECT_ID,FILENAME\n" + "\n".join(one_to_n.get(file_name, [])) + "\n")
    genuine = sum(1 for line in pair_lines if line.endswith(" 1"))
    return {"folder": str(folder), "identities": identities, "templates": len(template_ids), "medias": medias,
            "images": image_no, "pairs": len(pair_lines), "genuine": genuine,
            "gallery_templates": identities, "probe_templates": len(template_ids) - identities}


def _files_1n(target: str) -> tuple[str, str, str]:
    """The two gallery files and the probe file of a target's 1:N protocol (names as facecore.eval.ijb_1n reads)."""
    prefix, galleries = target.lower(), ("G1", "G2") if target == "IJBC" else ("S1", "S2")
    return (f"{prefix}_1N_gallery_{galleries[0]}.csv", f"{prefix}_1N_gallery_{galleries[1]}.csv",
            f"{prefix}_1N_probe_mixed.csv")


__all__ = ["IJB_STREAM", "loose_crop", "make_ijb_data"]

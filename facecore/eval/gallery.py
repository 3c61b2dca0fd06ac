"""Galleries and probes from folders of aligned face images, for 1:N evaluation (``facecore eval --gallery``).

Two layouts are read, chosen per folder by what it holds:

- ``DIR/<identity>/<image>``: one sub-folder per identity (the layout ``pack`` and training read);
- flat ``DIR/<image>``: the identity is the file name's prefix before the first ``_`` (the whole
  name without extension when it has none). This is how TinyFace's release names its
  ``Gallery_Match`` and ``Probe`` images (``<id>_<n>.jpg``); facecore does not read the
  release's .mat lists, so the name is the only source of the identity.

Distractor folders (``--distractors``) are any images in any depth of folders; they belong to no
identity, so a probe can never be mated to them (MegaFace-style distractors, TinyFace's
``Gallery_Distractor``). Images are decoded as uint8 and resized to ``img_size`` when they have
another size (TinyFace's faces are tiny; aligned crops are the expectation).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..data.images import IMAGE_EXTENSIONS, list_image_folder
from ..errors import DataError

if TYPE_CHECKING:
    from .identification_report import IdentificationResult


@dataclass
class ImageFolder:
    """The images of one folder and their identities (None for distractors), in a fixed order."""

    role: str  # "gallery", "probe" or "distractors": used in messages
    folder: Path
    layout: str  # "identity folders", "flat (identity = name prefix)" or "distractors"
    paths: list[Path]
    identities: list[str | None]

    def __len__(self) -> int:
        return len(self.paths)


def _is_image(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def name_identity(file_name: str) -> str:
    """The identity of a flat folder's image: the name's prefix before the first ``_`` (``12_3.jpg`` -> ``12``)."""
    stem = os.path.splitext(file_name)[0]
    return stem.split("_", 1)[0] if "_" in stem else stem


def read_identity_folder(folder: str | os.PathLike, role: str) -> ImageFolder:
    """A gallery or probe folder: identity sub-folders, or flat images named ``<identity>_<rest>``.

    A missing or empty folder, one that mixes sub-folders and images, or one without images is a
    DataError naming it.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{role} folder not found: {folder} (expected {folder}/<identity>/<image>.jpg, or images "
                        "named <identity>_<n>.jpg as in TinyFace)")
    entries = [e for e in os.scandir(folder) if not e.name.startswith(".")]
    dirs = [e for e in entries if e.is_dir()]
    images = sorted(e.name for e in entries if e.is_file() and _is_image(e.name))
    if dirs and images:
        raise DataError(f"{role} folder {folder} holds both sub-folders ({dirs[0].name}, ...) and images "
                        f"({images[0]}, ...); use one sub-folder per identity, or only images named "
                        "<identity>_<n>.jpg")
    if dirs:
        classes, items = list_image_folder(folder)
        return ImageFolder(role, folder, "identity folders", [p for p, _ in items], [classes[c] for _, c in items])
    if not images:
        raise DataError(f"{role} folder {folder} has no images; expected {folder}/<identity>/<image>.jpg "
                        "(.jpg/.jpeg/.png), or images named <identity>_<n>.jpg")
    return ImageFolder(role, folder, "flat (identity = name prefix)", [folder / n for n in images],
                       [name_identity(n) for n in images])


def read_distractor_folder(folder: str | os.PathLike) -> ImageFolder:
    """Every image under ``folder`` (any depth), sorted by path; a missing folder or one without images is a DataError."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"distractors folder not found: {folder}")
    paths = []
    for where, subdirs, files in os.walk(folder):
        subdirs[:] = [d for d in subdirs if not d.startswith(".")]
        paths += [Path(where) / f for f in files if not f.startswith(".") and _is_image(f)]
    if not paths:
        raise DataError(f"distractors folder {folder} has no .jpg/.jpeg/.png images")
    paths.sort()
    return ImageFolder("distractors", folder, "distractors", paths, [None] * len(paths))


class FolderImages:
    """The images of several :class:`ImageFolder` s in order, as ``(uint8 (3, S, S), problem)`` items.

    An image of another size is resized to ``img_size``; one that cannot be read yields a black
    image and a message naming it (the evaluator raises it, as for IJB).
    """

    def __init__(self, folders: list[ImageFolder], img_size: int = 112, name: str = "gallery"):
        self.paths = [p for f in folders for p in f.paths]
        self.img_size = img_size
        self.name = name

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        import torch

        from ..data.images import BadImageError, check_size, decode_chw, resize_rgb

        path = self.paths[index]
        try:
            chw = decode_chw(path.read_bytes())
        except OSError as exc:
            return torch.zeros(3, self.img_size, self.img_size, dtype=torch.uint8), \
                f"{path} cannot be read ({exc.strerror or exc})"
        except BadImageError as exc:
            return torch.zeros(3, self.img_size, self.img_size, dtype=torch.uint8), f"{path}: {exc}"
        if check_size(chw, self.img_size) is not None:
            chw = torch.from_numpy(np.ascontiguousarray(resize_rgb(chw.permute(1, 2, 0).numpy(), self.img_size)
                                                        .transpose(2, 0, 1)))
        return chw, ""


def templates_of(identities: list[str | None], ids: dict[str, int], per_image: bool,
                 first: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(template id per image, identity id per template id)``: one template per identity, or per image.

    Distractors (None) are one template each and get identity -1. Template ids are
    ``first, first + 1, ...`` in order of first appearance.
    """
    template_of: dict[str, int] = {}
    templates = np.empty(len(identities), dtype=np.int64)
    owners: list[int] = []
    for i, name in enumerate(identities):
        if name is None or per_image:
            templates[i] = first + len(owners)
            owners.append(-1 if name is None else ids[name])
        else:
            if name not in template_of:
                template_of[name] = first + len(owners)
                owners.append(ids[name])
            templates[i] = template_of[name]
    return templates, np.asarray(owners, dtype=np.int64)




def evaluate_folders(
    backbone: object,
    config: dict,
    gallery: str | os.PathLike,
    probe: str | os.PathLike,
    distractors: str | os.PathLike | None,
    *,
    per_image: bool,
    batch_size: int,
    device: object,
    num_workers: int = 0,
    say: object = None,
) -> "IdentificationResult":
    """Embed the folders' images once, pool templates and search the probes in the gallery (+ distractors).

    Every folder is read and checked before the embedding pass. Image features are weighted like
    IJB's (``eval.ijb.flip``, ``eval.ijb.norm_score``; no detector score) and pooled per identity,
    or kept one per image with ``per_image``; distractors are always one entry per image.
    """
    import time

    import torch

    from .identification import identify
    from .identification_report import IdentificationResult
    from .ijb import embed_images, pool_templates, weight_features

    options = config["eval"]["ijb"]
    found_gallery = read_identity_folder(gallery, "gallery")
    found_probe = read_identity_folder(probe, "probe")
    found_distractors = read_distractor_folder(distractors) if distractors else None
    extra = [found_distractors] if found_distractors else []
    names = sorted({n for f in (found_gallery, found_probe) for n in f.identities if n is not None})
    ids = {n: i for i, n in enumerate(names)}
    name = found_gallery.folder.name or "gallery"
    dataset = FolderImages([found_gallery, *extra, found_probe], img_size=config["data"]["img_size"], name=name)
    if callable(say):
        say(f"identifying {len(found_probe):,} probe images in {len(found_gallery):,} gallery images"
            + (f" + {len(found_distractors):,} distractors" if found_distractors else "") + f" on {device}...")
    features = embed_images(backbone, dataset, batch_size, device, flip=options["flip"], num_workers=num_workers,
                            progress=True)
    start = time.perf_counter()
    features = weight_features(features, norm_score=options["norm_score"], detector_score=False)
    n_gallery = len(found_gallery) + sum(len(f) for f in extra)
    side = {}
    for key, images, rows in (("gallery", found_gallery.identities + [None] * (n_gallery - len(found_gallery)),
                               slice(0, n_gallery)),
                              ("probe", found_probe.identities, slice(n_gallery, None))):
        templates, owners = templates_of(images, ids, per_image)
        _, pooled = pool_templates(features[rows], templates, np.arange(templates.size))
        side[key] = (torch.from_numpy(pooled), owners)
    seconds = {"pool": time.perf_counter() - start}
    start = time.perf_counter()
    found, opened, closed = identify(side["probe"][0], side["probe"][1], side["gallery"][0], side["gallery"][1])
    seconds["search"] = time.perf_counter() - start
    mode = "one entry per image" if per_image else "one template per identity"
    notes = [f"gallery {found_gallery.folder}: {len(found_gallery):,} images of "
             f"{len(set(found_gallery.identities)):,} identities ({found_gallery.layout}), {mode}"
             + (f"; distractors {found_distractors.folder}: {len(found_distractors):,} images" if found_distractors
                else ""),
             f"probes {found_probe.folder}: {len(found_probe):,} images of {len(set(found_probe.identities)):,} "
             f"identities ({found_probe.layout}), {mode}"]
    arrays = {"identity_names": np.asarray(names, dtype=str), "gallery_identity_ids": side["gallery"][1],
              "probe_identity_ids": side["probe"][1]}
    return IdentificationResult(
        name=name, open_sets={"gallery": opened}, closed=closed, closed_gallery="gallery",
        probes=int(side["probe"][1].size), sizes={"gallery": int(side["gallery"][1].size)},
        searches={"gallery": found}, gallery_features={"gallery": side["gallery"][0]},
        probe_features=side["probe"][0], arrays=arrays, seconds=seconds, notes=notes,
    )


__all__ = ["FolderImages", "ImageFolder", "evaluate_folders", "name_identity", "read_distractor_folder",
           "read_identity_folder", "templates_of"]

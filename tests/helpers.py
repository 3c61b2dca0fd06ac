"""Helpers shared by several test modules: tiny data sets, a tiny backbone plugin, distributions made on the fly."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path
from typing import Any

import torch
from torch import nn

from facecore import hookimpl
from facecore.data.packing import pack_bin, pack_rec
from facecore.data.synthetic import generate_identity_folder, write_pairs


def make_tiny_data(root: Path, identities: int = 6, per_identity: int = 8, pairs: int = 40) -> Path:
    """Synthetic identities packed as RecordIO under ``root/data``, plus ``val.bin`` of other identities."""
    generate_identity_folder(root / "train_images", identities, per_identity, seed=0, workers=1, progress=False)
    pack_rec(root / "train_images", root / "data", progress=False)
    generate_identity_folder(root / "test_images", 5, 4, seed=1, first_identity=50, workers=1, progress=False)
    write_pairs(root / "test_images", root / "pairs.txt", pairs, seed=0)
    pack_bin(root / "pairs.txt", root / "data" / "val.bin", progress=False)
    return root / "data"


def copy_with_broken_image(src: Path, dst: Path, key: int = 1) -> Path:
    """A copy of the RecordIO set ``src`` at ``dst`` whose image of record ``key`` no longer decodes."""
    import shutil

    from facecore.data.recordio import read_index

    shutil.copytree(src, dst)
    keys, offsets = read_index(dst / "train.idx")
    image_start = int(offsets[list(keys).index(key)]) + 8 + 24  # record header + IRHeader (flag 0)
    with (dst / "train.rec").open("r+b") as fh:  # break the JPEG start-of-image marker
        fh.seek(image_start)
        fh.write(b"\0\0\0\0")
    return dst


def fake_distribution(where: Path, dist: str, module: str, source: str, version: str = "1.2.3") -> None:
    """A module plus ``<dist>-<version>.dist-info`` with a facecore entry point: importlib.metadata
    finds it when ``where`` is on the path, as it would an installed package."""
    (where / f"{module}.py").write_text(textwrap.dedent(source))
    info = where / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(f"[facecore]\n{module} = {module}\n")


def subprocess_env(**extra: str) -> dict[str, str]:
    """This process's environment minus anything that would change which plugins load."""
    drop = {"PYTHONPATH", "PYTHONHOME", "FACECORE_LOAD_PLUGINS"}
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.setdefault("OMP_NUM_THREADS", "1")  # tiny workloads: extra threads only contend with pytest's
    env.update(extra)
    return env


class TinyNet(nn.Module):
    """A backbone small enough for tests that only need some trained-looking network."""

    def __init__(self, embedding_size: int = 8):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3, 2, 1, bias=False), nn.BatchNorm2d(4), nn.PReLU(4),
                                  nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(64, embedding_size),
                                  nn.BatchNorm1d(embedding_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class TinyBackbonePlugin:
    """A plugin object registering :class:`TinyNet` under ``name`` (for ``register_plugin``)."""

    def __init__(self, name: str):
        self.name = name

    @hookimpl
    def register_backbones(self, register):
        register(self.name, TinyNet, description="test backbone")


def former_flip(images: torch.Tensor, seed: int, epoch: int, batch: int, info: Any, inplace: bool = False) -> torch.Tensor:
    """The trainer's built-in flip before augmentations became plugins (facecore 0.1.0); ``inplace`` is ignored."""
    gen = torch.Generator().manual_seed((seed * 1_000_003 + epoch) * 1_000_003 + batch)
    n = images.shape[0]
    mask = torch.rand(n * info.world_size, generator=gen) < 0.5
    mask = mask[info.rank :: info.world_size][:n].to(images.device)
    return torch.where(mask[:, None, None, None], images.flip(3), images)

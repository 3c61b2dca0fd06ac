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


class TinyIRNet(nn.Module):
    """A tiny IR-ResNet (the resnet plugin's block layout at 8-16 channels): BN before the convolution,
    PReLU, a 1x1 downsample shortcut and the residual Add, for tests of what int8 quantisation keeps."""

    def __init__(self, embedding_size: int = 16):
        super().__init__()

        def block(cin: int, cout: int, stride: int) -> nn.ModuleDict:
            parts = {"body": nn.Sequential(nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, 1, 1, bias=False),
                                           nn.BatchNorm2d(cout), nn.PReLU(cout),
                                           nn.Conv2d(cout, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout))}
            if stride != 1 or cin != cout:
                parts["down"] = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            return nn.ModuleDict(parts)

        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.PReLU(8))
        self.blocks = nn.ModuleList([block(8, 16, 2), block(16, 16, 1), block(16, 16, 2)])
        self.head = nn.Sequential(nn.BatchNorm2d(16), nn.AdaptiveAvgPool2d(7), nn.Flatten(),
                                  nn.Linear(784, embedding_size), nn.BatchNorm1d(embedding_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for b in self.blocks:
            x = b["body"](x) + (b["down"](x) if "down" in b else x)
        return self.head(x)


class TinyIRPlugin:
    """A plugin object registering :class:`TinyIRNet` under ``name``."""

    def __init__(self, name: str):
        self.name = name

    @hookimpl
    def register_backbones(self, register):
        register(self.name, TinyIRNet, description="test IR-style backbone")


def face_like_images(count: int, size: int = 112, seed: int = 0) -> list:
    """``count`` smooth RGB uint8 images (a 6x6 random pattern upscaled, plus noise): enough structure for
    a network's activations to look like a photo's, made in milliseconds."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        base = Image.fromarray(rng.integers(0, 256, size=(6, 6, 3), dtype=np.uint8)).resize((size, size), Image.BILINEAR)
        noisy = np.asarray(base, dtype=np.int16) + rng.integers(-12, 13, size=(size, size, 3))
        out.append(np.clip(noisy, 0, 255).astype(np.uint8))
    return out


def png_bytes(image) -> bytes:
    """An HWC uint8 array as PNG bytes (lossless: every decoder gives back the same pixels)."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def make_tiny_ir_export_set(root: Path, backbone: str) -> TinyIRNet:
    """``root``: config.yaml and best.pth of a :class:`TinyIRNet` registered as ``backbone`` (which must be
    registered while this runs), with BatchNorm statistics of its data as after training and a validation
    threshold, plus ``calib.bin`` and ``test.bin`` (16 pairs each, PNG, disjoint images). Returns the network."""
    import numpy as np
    import yaml

    from facecore.core.checkpoint import save_checkpoint
    from facecore.core.config import load_config
    from facecore.data.binfile import write_bin

    images = face_like_images(64, seed=0)
    same = [i % 2 == 0 for i in range(16)]
    write_bin(root / "calib.bin", [png_bytes(i) for i in images[:32]], same)
    write_bin(root / "test.bin", [png_bytes(i) for i in images[32:]], same)
    config = {"device": "cpu", "model": {"backbone": backbone, "embedding_size": 16},
              "head": {"type": "arcface", "num_classes": 10}, "data": {"root": str(root)},
              "eval": {"test_batch_size": 16}, "logging": {"log_dir": str(root / "logs"), "tensorboard": False}}
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    torch.manual_seed(0)
    net = TinyIRNet(16)
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = None  # a plain average over the batches below
    net.train()
    with torch.no_grad():
        net(torch.from_numpy(np.stack(images[:32])).permute(0, 3, 1, 2).float() / 127.5 - 1)
    net.eval()
    val = {"test": {"accuracy": 0.9, "best_threshold": 1.2}}  # squared L2 1.2 = cosine 0.4
    save_checkpoint({"config": load_config(str(root / "config.yaml")), "backbone": net.state_dict(),
                     "val_metrics": val}, root / "best.pth")
    return net

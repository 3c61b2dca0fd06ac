"""The image-folder dataset and facecore.data.images: decoding, colour modes, transforms, load_image."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import facecore
from facecore.data import images
from facecore.errors import DataError
from facecore_plugins.image_folder import ImageFolderDataset


def rgb_array(seed: int, size: int = 16) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.array(Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize((size, size)))


def save(path: Path, array: np.ndarray, fmt: str, mode: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(array)
    if mode:
        img = img.convert(mode)
    img.save(path, format=fmt)
    return path


def encoded(array: np.ndarray, fmt: str = "JPEG", mode: str | None = None) -> bytes:
    img = Image.fromarray(array)
    if mode:
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def make_tree(root: Path) -> Path:
    save(root / "bob" / "1.JPG", rgb_array(1), "JPEG")
    save(root / "bob" / "2.png", rgb_array(2), "PNG")
    save(root / "alice" / "a.jpeg", rgb_array(3), "JPEG")
    save(root / "carol" / "x.Png", rgb_array(4), "PNG", mode="RGBA")
    save(root / "carol" / "y.jpg", rgb_array(5), "JPEG", mode="L")
    (root / "carol" / "notes.txt").write_text("ignored")
    return root


# -- decoding and transforms ---------------------------------------------------------------


@pytest.mark.parametrize(
    "fmt, mode",
    [("JPEG", None), ("JPEG", "L"), ("JPEG", "CMYK"), ("PNG", None), ("PNG", "L"), ("PNG", "RGBA"), ("PNG", "P")],
)
def test_decode_image_gives_rgb(fmt, mode):
    array = rgb_array(0)
    data = encoded(array, fmt, mode)
    out = images.decode_image(data)
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    want = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    assert np.abs(out.astype(int) - want).max() <= 1


def test_jpeg_decoders_agree():
    data = encoded(rgb_array(7, size=32))
    fast = images.decode_image(data)
    assert np.abs(fast.astype(int) - images._pil_decode(data)).max() <= 2


def test_jpeg_decoder_falls_back_from_torchcodec_to_torchvision_to_pillow(monkeypatch):
    assert images.JPEG_DECODER == "torchcodec"  # a declared dependency: the first choice when installed
    data = torch.frombuffer(bytearray(encoded(rgb_array(3, size=32))), dtype=torch.uint8)
    first = images._torch_jpeg(data)

    def missing():
        raise ImportError("not installed")

    monkeypatch.setattr(images, "_torchcodec_jpeg", missing)
    name, decode = images._probe_torch_jpeg()
    assert name == "torchvision" and torch.equal(decode(data), first)  # the same libjpeg-turbo pixels
    with warnings.catch_warnings(record=True) as caught:
        decode(data)
    assert not caught  # torchvision 0.29 warns on every call that its codecs are deprecated: silenced
    monkeypatch.setattr(images, "_torchvision_jpeg", missing)
    assert images._probe_torch_jpeg() == ("pillow", None)


def test_undecodable_bytes_raise_a_data_error():
    for data in (b"", b"hello", encoded(rgb_array(0))[:60]):
        with pytest.raises(images.BadImageError) as err:
            images.decode_image(data)
        assert isinstance(err.value, DataError) and "cannot decode" in str(err.value)


def test_transforms():
    array = rgb_array(3)
    out = images.eval_transform(array)
    want = (torch.from_numpy(array.astype(np.float32)).permute(2, 0, 1) - 127.5) / 127.5
    assert out.dtype == torch.float32 and torch.allclose(out, want, atol=1e-6)
    assert out.min() >= -1 and out.max() <= 1


def test_load_image_inputs_and_resize_warning(tmp_path):
    array = rgb_array(4)
    path = save(tmp_path / "face.png", array, "PNG")
    want = images.eval_transform(array)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for x in (path, str(path), path.read_bytes(), Image.fromarray(array), array, torch.from_numpy(array).permute(2, 0, 1)):
            assert torch.allclose(images.load_image(x, img_size=16), want, atol=1e-6)
    gray = images.load_image(array[:, :, 0], img_size=16)
    assert gray.shape == (3, 16, 16) and torch.equal(gray[0], gray[2])
    with pytest.warns(UserWarning, match="resizing it to 16x16"):
        out = images.load_image(rgb_array(4, size=40), img_size=16)
    assert out.shape == (3, 16, 16)
    with pytest.raises(DataError, match="image file not found"):
        images.load_image(tmp_path / "missing.jpg")
    with pytest.raises(DataError, match="cannot load an image from int"):
        images.load_image(3)


# -- the dataset ----------------------------------------------------------------------------


def test_folder_tree_labels_and_rgb(tmp_path):
    root = make_tree(tmp_path / "faces")
    ds = facecore.create("datasets", "image-folder", root=str(root), img_size=16, train=False)
    assert isinstance(ds, ImageFolderDataset)
    assert ds.classes == ["alice", "bob", "carol"] and ds.num_classes == 3
    names = [(p.parent.name, p.name) for p, _ in ds.items]
    assert names == [("alice", "a.jpeg"), ("bob", "1.JPG"), ("bob", "2.png"), ("carol", "x.Png"), ("carol", "y.jpg")]
    assert [ds[i][1] for i in range(len(ds))] == [0, 1, 1, 2, 2] == ds.labels
    for i, (path, _) in enumerate(ds.items):
        image, _ = ds[i]
        assert image.shape == (3, 16, 16) and image.dtype == torch.uint8
        assert torch.allclose(images.model_input(image), images.eval_transform(images.decode_image(path.read_bytes())))


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda r: r.mkdir(), "is empty"),
        (lambda r: (r.mkdir(), (r / "stray.jpg").write_bytes(b"x")), "stray.jpg is a file where an identity folder belongs"),
        (lambda r: ((r / "a").mkdir(parents=True), (r / "a" / "x.txt").write_text("")), "identity folder .*a has no"),
        (lambda r: (r / "a" / "deeper").mkdir(parents=True), "is a folder inside identity folder a"),
        (lambda r: None, "not found"),
    ],
)
def test_layout_errors(tmp_path, build, message):
    root = tmp_path / "faces"
    build(root)
    with pytest.raises(DataError, match=message):
        ImageFolderDataset(str(root))


def test_size_mismatch_and_bad_images(tmp_path):
    root = tmp_path / "faces"
    save(root / "a" / "ok.jpg", rgb_array(1), "JPEG")
    save(root / "a" / "big.jpg", rgb_array(2, size=20), "JPEG")
    (root / "b").mkdir()
    (root / "b" / "broken.jpg").write_bytes(b"\xff\xd8\xff broken")
    ds = ImageFolderDataset(str(root), img_size=16)
    with pytest.raises(DataError, match=r"big\.jpg: the image is 20x20 but img_size is 16"):
        ds[0]
    with pytest.raises(DataError, match=r"broken\.jpg: cannot decode .*on_bad_image: skip"):
        ds[2]
    skip = ImageFolderDataset(str(root), img_size=16, on_bad_image="skip")
    image, label = skip[2]
    assert label == -1 and not image.any() and skip.skipped == 1
    assert skip[1][1] == 0

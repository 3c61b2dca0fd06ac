"""``.bin`` pair sets: safe loading (Python 2 and 3 pickles), refusal of code, the bin-pairs dataset."""

from __future__ import annotations

import builtins
import io
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import facecore
from facecore.data.binfile import load_bin, write_bin
from facecore.errors import DataError
from facecore.data.images import decode_image
from facecore_plugins.bin_pairs import BinPairsDataset


def jpeg(seed: int, size: int = 16) -> bytes:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize((size, size), Image.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format="JPEG")
    return buf.getvalue()


# Python 2 pickles (protocol 2, str as SHORT_BINSTRING/BINSTRING), written opcode by opcode.
def _py2_str(b: bytes) -> bytes:
    return (b"U" + bytes([len(b)]) + b) if len(b) < 256 else (b"T" + struct.pack("<i", len(b)) + b)


def _py2_uint8_array(data: bytes) -> bytes:
    """What Python 2 numpy writes for np.frombuffer(data, np.uint8) at protocol 2."""
    return (
        b"cnumpy.core.multiarray\n_reconstruct\n" + b"cnumpy\nndarray\n" + b"K\x00\x85" + _py2_str(b"b") + b"\x87R"
        + b"(K\x01" + b"J" + struct.pack("<i", len(data)) + b"\x85"
        + b"cnumpy\ndtype\n" + _py2_str(b"u1") + b"K\x00K\x01\x87R"
        + b"(K\x03" + _py2_str(b"|") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
        + b"\x89" + _py2_str(data) + b"tb"
    )


def _py2_bytearray(data: bytes) -> bytes:
    text = data.decode("latin-1").encode("utf-8")
    return b"c__builtin__\nbytearray\n" + b"X" + struct.pack("<I", len(text)) + text + _py2_str(b"latin-1") + b"\x86R"


def py2_pickle(entries: list[bytes], kinds: list[str], issame: list[bool]) -> bytes:
    makers = {"str": _py2_str, "array": _py2_uint8_array, "bytearray": _py2_bytearray}
    body = b"".join(makers[k](e) for e, k in zip(entries, kinds))
    flags = b"".join(b"\x88" if s else b"\x89" for s in issame)
    return b"\x80\x02(" + body + b"l(" + flags + b"l\x86."


def test_loads_python3_insightface_pickle(tmp_path):
    images = [jpeg(i) for i in range(6)]
    path = tmp_path / "lfw.bin"
    path.write_bytes(pickle.dumps((images, [True, False, True]), protocol=pickle.HIGHEST_PROTOCOL))
    bins, issame = load_bin(path)
    assert bins == images and issame.dtype == bool and issame.tolist() == [True, False, True]


def test_loads_python2_pickle_with_bytes_arrays_and_bytearrays(tmp_path):
    images = [jpeg(i) for i in range(6)]
    path = tmp_path / "agedb_30.bin"
    path.write_bytes(py2_pickle(images, ["str", "array", "bytearray", "str", "array", "str"], [False, True, True]))
    bins, issame = load_bin(path)
    assert bins == images and issame.tolist() == [False, True, True]


def test_loads_uint8_array_and_bytearray_entries_from_python3(tmp_path):
    images = [jpeg(i) for i in range(4)]
    entries = [np.frombuffer(images[0], np.uint8), bytearray(images[1]), images[2], np.frombuffer(images[3], np.uint8)]
    path = tmp_path / "x.bin"
    path.write_bytes(pickle.dumps((entries, np.array([True, False])), protocol=4))
    bins, issame = load_bin(path)
    assert bins == images and issame.tolist() == [True, False]


class _System:
    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


class _Open:
    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (builtins.open, (str(self.target), "w"))


@pytest.mark.parametrize("payload", [_System, _Open])
def test_pickle_that_runs_code_is_refused_and_nothing_runs(tmp_path, payload):
    target = tmp_path / "pwned"
    path = tmp_path / "evil.bin"
    path.write_bytes(pickle.dumps(([payload(target), jpeg(0)], [True]), protocol=4))
    with pytest.raises(DataError, match=r"evil\.bin: refusing to load .*(posix\.system|io\.open)"):
        load_bin(path)
    assert not target.exists()


def test_python3_protocol_2_pickle_with_uint8_arrays_loads(tmp_path):
    # Older export scripts: Python 3, protocol 2, entries as uint8 arrays; the array data and any
    # bytes go through _codecs.encode(text, 'latin1') in such a pickle.
    images = [jpeg(0), jpeg(1), jpeg(2), jpeg(3)]
    entries = [np.frombuffer(images[0], np.uint8), images[1], np.frombuffer(images[2], np.uint8), images[3]]
    path = tmp_path / "p2.bin"
    path.write_bytes(pickle.dumps((entries, [True, False]), protocol=2))
    assert b"_codecs\nencode" in path.read_bytes()
    bins, issame = load_bin(path)
    assert bins == images and issame.tolist() == [True, False]


def _codecs_call(text: str, encoding: str) -> bytes:
    """A protocol-2 pickle entry calling _codecs.encode(text, encoding)."""
    t, e = text.encode("utf-8"), encoding.encode("utf-8")
    return (b"c_codecs\nencode\n" + b"X" + struct.pack("<I", len(t)) + t
            + b"X" + struct.pack("<I", len(e)) + e + b"\x86R")


@pytest.mark.parametrize("encoding", ["rot13", "utf-8", "hex", "zlib"])
def test_codecs_encode_with_another_codec_is_refused(tmp_path, encoding):
    path = tmp_path / "codec.bin"
    path.write_bytes(b"\x80\x02(" + _codecs_call("abcd", encoding) + _codecs_call("ef", "latin1") + b"l(\x88l\x86.")
    with pytest.raises(DataError, match=rf"codec\.bin: refusing .*_codecs\.encode\(str, '{encoding}'\)"):
        load_bin(path)


def test_object_arrays_are_refused(tmp_path):
    path = tmp_path / "obj.bin"
    path.write_bytes(pickle.dumps((np.array([jpeg(0), jpeg(1)], dtype=object), [True]), protocol=4))
    with pytest.raises(DataError, match="refusing"):
        load_bin(path)


def test_wrong_image_count_and_structure(tmp_path):
    path = tmp_path / "bad.bin"
    path.write_bytes(pickle.dumps(([jpeg(0), jpeg(1), jpeg(2)], [True, False]), protocol=4))
    with pytest.raises(DataError, match=r"3 images for 2 pairs"):
        load_bin(path)
    path.write_bytes(pickle.dumps({"bins": []}, protocol=4))
    with pytest.raises(DataError, match=r"expected a pickle of \(bins, issame_list\)"):
        load_bin(path)
    path.write_bytes(pickle.dumps(([jpeg(0), 7], [True]), protocol=4))
    with pytest.raises(DataError, match=r"pair 0 \(image 1\) is a int"):
        load_bin(path)
    path.write_bytes(b"not a pickle at all")
    with pytest.raises(DataError, match="not a readable .bin pair set"):
        load_bin(path)
    with pytest.raises(DataError, match="pair set not found"):
        load_bin(tmp_path / "missing.bin")


def test_write_bin_round_trip_protocol_4(tmp_path):
    images = [jpeg(i) for i in range(4)]
    path = tmp_path / "out.bin"
    write_bin(path, images, [False, True])
    assert path.read_bytes()[:2] == b"\x80\x04"
    bins, issame = load_bin(path)
    assert bins == images and issame.tolist() == [False, True]
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_dataset_items_in_pair_order(tmp_path):
    images = [jpeg(i) for i in range(6)]
    path = tmp_path / "cfp_fp.bin"
    write_bin(path, images, [True, False, True])
    ds = facecore.create("datasets", "bin-pairs", path=str(path), img_size=16)
    assert isinstance(ds, BinPairsDataset)
    assert ds.name == "cfp_fp" and len(ds) == 6 and ds.issame.tolist() == [True, False, True]
    for i, data in enumerate(images):
        assert ds[i].dtype == torch.uint8 and torch.equal(ds[i], torch.from_numpy(decode_image(data)).permute(2, 0, 1))


def test_dataset_names_the_broken_pair(tmp_path):
    images = [jpeg(i) for i in range(6)]
    path = tmp_path / "lfw.bin"
    write_bin(path, images[:3] + [b"\xff\xd8\xff garbage"] + images[4:], [True, False, True])
    with pytest.raises(DataError, match=r"lfw\.bin: pair 1 is broken: its second image \(image 3\): cannot decode"):
        BinPairsDataset(str(path), img_size=16)
    write_bin(path, images[:4] + [jpeg(9, size=20)] + images[5:], [True, False, True])
    with pytest.raises(DataError, match=r"pair 2 is broken: its first image \(image 4\): the image is 20x20"):
        BinPairsDataset(str(path), img_size=16)

"""RecordIO: our reader against files mxnet wrote, writer/reader round trips, corrupt files, workers."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import pickle
import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from torch.utils.data import DataLoader

import facecore
from facecore.errors import DataError
from facecore.data.images import decode_image, model_input
from facecore.data.recordio import MAGIC, RecordReader, RecordWriter, class_label, frame, pack, read_index, unpack
from facecore_plugins.recordio import RecordIODataset

FIXTURES = Path(__file__).parent / "fixtures"
EXPECTED = json.loads((FIXTURES / "mxnet_expected.json").read_text())
MAGIC_BYTES = struct.pack("<I", MAGIC)


def jpeg(seed: int, size: int = 16) -> bytes:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize((size, size), Image.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_set(folder: Path, records: list[tuple[int, bytes]], prop: str | None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    with RecordWriter(folder / "train.rec", folder / "train.idx") as w:
        for key, payload in records:
            w.write(key, payload)
    if prop is not None:
        (folder / "property").write_text(prop)
    return folder


def insightface_set(folder: Path, classes=(0, 0, 1, 1, 1), size: int = 16, images=None) -> Path:
    """A small set in the InsightFace layout, written by our writer."""
    images = images or [jpeg(i, size) for i in range(len(classes))]
    a = len(images) + 1
    ids = sorted(set(classes))
    recs = [(0, pack([a, a + len(ids)]))]
    recs += [(k, pack(float(c), img)) for k, (img, c) in enumerate(zip(images, classes), 1)]
    for c in ids:
        keys = [k for k, cc in enumerate(classes, 1) if cc == c]
        recs.append((a + c, pack([keys[0], keys[-1] + 1])))
    return write_set(folder, recs, f"{len(ids)},{size},{size}")


# -- files written by mxnet ----------------------------------------------------------


@pytest.mark.parametrize("name", ["mxnet_insightface", "mxnet_plain"])
def test_reads_mxnet_written_records_exactly(name):
    reader = RecordReader(FIXTURES / name / "train.rec", FIXTURES / name / "train.idx")
    assert sorted(reader.keys.tolist()) == sorted(e["key"] for e in EXPECTED[name])
    for e in EXPECTED[name]:
        header, image = unpack(reader.read(e["key"]))
        label = header.label.tolist() if isinstance(header.label, np.ndarray) else header.label
        assert reader.offset(e["key"]) == e["offset"]
        assert (header.flag, label, header.id, header.id2) == (e["flag"], e["label"], e["id"], e["id2"])
        assert hashlib.sha256(image).hexdigest() == e["image_sha256"]
        if "pixels" in e:
            ours = decode_image(image)
            theirs = np.frombuffer(base64.b64decode(e["pixels"]), np.uint8).reshape(ours.shape)
            assert np.array_equal(ours, theirs)


def test_fixture_has_a_record_split_by_mxnet():
    # The plain fixture carries the magic word inside a label array; dmlc-core splits such records.
    raw = (FIXTURES / "mxnet_plain" / "train.rec").read_bytes()
    flags = []
    pos = 0
    while pos < len(raw):
        magic, lrec = struct.unpack_from("<II", raw, pos)
        assert magic == MAGIC
        flags.append(lrec >> 29)
        length = lrec & ((1 << 29) - 1)
        pos += 8 + length + (-length % 4)
    assert 1 in flags and 3 in flags


@pytest.mark.parametrize("name", ["mxnet_insightface", "mxnet_plain"])
def test_writer_reproduces_mxnet_files_byte_for_byte(name, tmp_path):
    src = FIXTURES / name
    reader = RecordReader(src / "train.rec", src / "train.idx")
    keys, _ = read_index(src / "train.idx")
    with RecordWriter(tmp_path / "train.rec", tmp_path / "train.idx") as w:
        for key in keys.tolist():
            w.write(key, reader.read(key))
    assert (tmp_path / "train.rec").read_bytes() == (src / "train.rec").read_bytes()
    assert (tmp_path / "train.idx").read_bytes() == (src / "train.idx").read_bytes()


def test_dataset_on_mxnet_insightface_layout():
    ds = RecordIODataset(str(FIXTURES / "mxnet_insightface"), img_size=16)
    expected = [e for e in EXPECTED["mxnet_insightface"] if 1 <= e["key"] <= 6]
    assert ds.layout == "insightface"
    assert len(ds) == 6 and ds.num_classes == 2
    assert ds.labels.tolist() == [int(e["label"]) for e in expected]
    for i, e in enumerate(expected):
        image, label = ds[i]
        assert label == int(e["label"])
        assert image.dtype == torch.uint8 and image.shape == (3, 16, 16)  # normalized later, on the device
        pixels = np.frombuffer(base64.b64decode(e["pixels"]), np.uint8).reshape(16, 16, 3)
        assert torch.equal(image, torch.from_numpy(pixels.copy()).permute(2, 0, 1))
        want = (torch.from_numpy(pixels.astype(np.float32)).permute(2, 0, 1) - 127.5) / 127.5
        assert torch.allclose(model_input(image[None])[0], want, atol=1e-6)


def test_dataset_on_mxnet_plain_layout_with_label_arrays():
    ds = RecordIODataset(str(FIXTURES / "mxnet_plain"), img_size=16)
    by_key = {e["key"]: e for e in EXPECTED["mxnet_plain"]}
    assert ds.layout == "plain" and ds.num_classes == 2 and len(ds) == 6
    for i, key in enumerate(ds.keys.tolist()):
        _, label = ds[i]
        assert label == int(by_key[key]["label"][0]) == ds.labels[i]


def test_registered_factory_builds_the_dataset():
    ds = facecore.create("datasets", "recordio", root=str(FIXTURES / "mxnet_insightface"), img_size=16, train=True)
    assert isinstance(ds, RecordIODataset) and ds.train and ds.num_classes == 2


# -- round trips -----------------------------------------------------------------------

payloads = st.one_of(
    st.binary(min_size=0, max_size=64),
    # payloads with the magic word at 4-byte-aligned (and unaligned) places
    st.lists(st.sampled_from([MAGIC_BYTES, b"\x00\x01\x02\x03", b"ab", b"x"]), max_size=8).map(b"".join),
)
labels = st.one_of(
    st.integers(0, 10_000).map(float),
    st.lists(st.floats(width=32, allow_nan=False), min_size=1, max_size=5),
)


@settings(max_examples=60, deadline=None)
@given(records=st.lists(st.tuples(labels, payloads), min_size=1, max_size=8), method=st.sampled_from(["pread", "mmap"]))
def test_writer_reader_round_trip(records, method):
    with tempfile.TemporaryDirectory() as tmp:
        rec, idx = Path(tmp) / "x.rec", Path(tmp) / "x.idx"
        keys = [3 * i + 1 for i in range(len(records))][::-1]  # sparse keys, written out of order
        with RecordWriter(rec, idx) as w:
            for key, (label, data) in zip(keys, records):
                w.write(key, pack(label, data, id=key))
        assert rec.stat().st_size % 4 == 0
        reader = RecordReader(rec, idx, method=method)
        for key, (label, data) in zip(keys, records):
            header, image = unpack(reader.read(key))
            assert bytes(image) == data and header.id == key
            if isinstance(label, list):
                assert header.flag == len(label)
                assert header.label.tolist() == np.float32(label).tolist()
                assert class_label(header) == np.float32(label[0])
            else:
                assert header.flag == 0 and header.label == label
            assert reader.header(key).flag == header.flag
        reader.close()


@settings(max_examples=40, deadline=None)
@given(data=st.lists(st.sampled_from([MAGIC_BYTES, b"\xce\xd7", b"1234", b"z"]), max_size=10).map(b"".join))
def test_frame_splits_at_aligned_magic_like_dmlc(data):
    framed = frame(data)
    # rebuild by the format's rule: parts joined by the magic word; only aligned magic is split
    pos, parts = 0, []
    while True:
        magic, lrec = struct.unpack_from("<II", framed, pos)
        assert magic == MAGIC
        length = lrec & ((1 << 29) - 1)
        parts.append(framed[pos + 8 : pos + 8 + length])
        pos += 8 + length + (-length % 4)
        if lrec >> 29 in (0, 3):
            break
    assert pos == len(framed)
    assert MAGIC_BYTES.join(parts) == data
    aligned = sum(data[i : i + 4] == MAGIC_BYTES for i in range(0, len(data) - 3, 4))
    assert len(parts) == aligned + 1


# -- corrupt files -----------------------------------------------------------------------


def test_bad_magic_names_file_key_and_offset(tmp_path):
    folder = insightface_set(tmp_path / "s")
    reader = RecordReader(folder / "train.rec", folder / "train.idx")
    offset = reader.offset(2)
    raw = bytearray((folder / "train.rec").read_bytes())
    raw[offset : offset + 4] = b"\0\0\0\0"
    (folder / "train.rec").write_bytes(bytes(raw))
    ds = RecordIODataset(str(folder), img_size=16)
    with pytest.raises(DataError, match=rf"train\.rec: record key 2 at byte offset {offset}: bad magic"):
        ds[1]


def test_truncated_file(tmp_path):
    folder = insightface_set(tmp_path / "s", classes=(0, 1))
    raw = (folder / "train.rec").read_bytes()
    reader = RecordReader(folder / "train.rec", folder / "train.idx")
    last = reader.offset(4)  # last identity record
    (folder / "train.rec").write_bytes(raw[: reader.offset(2) + 20])
    with pytest.raises(DataError) as err:
        RecordReader(folder / "train.rec", folder / "train.idx").read(2)
    assert "key 2" in str(err.value) and str(reader.offset(2)) in str(err.value) and "train.rec" in str(err.value)
    with pytest.raises(DataError, match=f"key 4 at byte offset {last}: the index offset is past the end"):
        RecordReader(folder / "train.rec", folder / "train.idx").read(4)


def test_missing_key_in_index(tmp_path):
    folder = insightface_set(tmp_path / "s")
    lines = (folder / "train.idx").read_text().splitlines()
    (folder / "train.idx").write_text("\n".join(l for l in lines if not l.startswith("3\t")) + "\n")
    with pytest.raises(DataError, match=r"train\.idx: key 3 is not in the index"):
        RecordIODataset(str(folder), img_size=16)
    with pytest.raises(DataError, match="key 99 is not in the index"):
        RecordReader(folder / "train.rec", folder / "train.idx").read(99)


def test_malformed_index_line_is_named(tmp_path):
    folder = insightface_set(tmp_path / "s")
    lines = (folder / "train.idx").read_text().splitlines()
    lines[3] = "3\tnot-a-number"
    (folder / "train.idx").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"train\.idx line 4"):
        RecordReader(folder / "train.rec", folder / "train.idx")


def test_index_offset_into_the_middle_of_a_record(tmp_path):
    folder = insightface_set(tmp_path / "s")
    text = (folder / "train.idx").read_text().replace("\n2\t", "\n2\t4", 1)  # offset no longer a record start
    (folder / "train.idx").write_text(text)
    reader = RecordReader(folder / "train.rec", folder / "train.idx")
    with pytest.raises(DataError, match="key 2 at byte offset"):
        reader.read(2)


def test_undecodable_image_stop_and_skip(tmp_path):
    images = [jpeg(0), b"\xff\xd8\xff not really a jpeg", jpeg(2)]
    folder = insightface_set(tmp_path / "s", classes=(0, 1, 1), images=images)
    stop = RecordIODataset(str(folder), img_size=16)
    with pytest.raises(DataError, match=r"record key 2 at byte offset \d+: cannot decode"):
        stop[1]
    skip = RecordIODataset(str(folder), img_size=16, on_bad_image="skip")
    image, label = skip[1]
    assert label == -1 and torch.count_nonzero(image) == 0 and image.shape == (3, 16, 16)
    assert skip.skipped == 1
    assert skip[2][1] == 1 and skip.skipped == 1


def test_wrong_image_size_is_an_error_naming_the_key(tmp_path):
    images = [jpeg(0), jpeg(1, size=20), jpeg(2)]
    folder = insightface_set(tmp_path / "s", classes=(0, 0, 1), images=images)
    ds = RecordIODataset(str(folder), img_size=16, on_bad_image="skip")
    assert ds[0][0].shape == (3, 16, 16)
    with pytest.raises(DataError, match=r"record key 2 at byte offset \d+: the image is 20x20 but img_size is 16"):
        ds[1]


def test_property_mismatch_names_both_numbers(tmp_path):
    folder = insightface_set(tmp_path / "s")
    (folder / "property").write_text("5,16,16")
    with pytest.raises(DataError, match=r"property says 5 classes but .*train\.rec has 2"):
        RecordIODataset(str(folder), img_size=16)
    (folder / "property").write_text("2,16,16")
    with pytest.raises(DataError, match="data.img_size is 112"):
        RecordIODataset(str(folder))


def test_plain_layout_labels_checked_against_property(tmp_path):
    records = [(k, pack([float(c), 9.0], jpeg(k))) for k, c in [(5, 0), (6, 2), (9, 1)]]
    folder = write_set(tmp_path / "s", records, "3,16,16")
    ds = RecordIODataset(str(folder), img_size=16)
    assert ds.layout == "plain" and ds.num_classes == 3 and ds.labels.tolist() == [0, 2, 1]
    (folder / "property").write_text("4,16,16")
    with pytest.raises(DataError, match="says 4 classes .* has 3"):
        RecordIODataset(str(folder), img_size=16)


def test_bad_label_is_named(tmp_path):
    folder = write_set(tmp_path / "s", [(1, pack(0.0, jpeg(1))), (2, pack(1.5, jpeg(2)))], None)
    with pytest.raises(DataError, match="record key 2 .* has label 1.5"):
        RecordIODataset(str(folder), img_size=16)


def test_set_without_images(tmp_path):
    folder = write_set(tmp_path / "s", [(0, pack([1, 1]))], "0,16,16")
    with pytest.raises(DataError, match=r"train\.idx lists no images"):
        RecordIODataset(str(folder), img_size=16)


def test_missing_files(tmp_path):
    with pytest.raises(DataError, match="not a folder"):
        RecordIODataset(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"train\.rec not found"):
        RecordIODataset(str(tmp_path / "empty"))


# -- processes ---------------------------------------------------------------------------


def test_reader_pickles_without_its_handle(tmp_path):
    folder = insightface_set(tmp_path / "s")
    reader = RecordReader(folder / "train.rec", folder / "train.idx")
    first = reader.read(1)
    assert reader._fd is not None
    clone = pickle.loads(pickle.dumps(reader))
    assert clone._fd is None
    assert clone.read(1) == first
    assert clone._fd is not None and clone._fd != reader._fd


def test_train_flag_leaves_images_as_stored(tmp_path):
    # augmentation is the trainer's, on the device (data.augment): a dataset never flips
    folder = insightface_set(tmp_path / "s")
    plain = RecordIODataset(str(folder), img_size=16)[0][0]
    ds = RecordIODataset(str(folder), img_size=16, train=True)
    assert all(torch.equal(ds[0][0], plain) for _ in range(10))


class _SharedOffsetProbe(torch.utils.data.Dataset):
    """Reads a record, then reports whether its descriptor shares the parent's file offset."""

    def __init__(self, reader: RecordReader):
        self.reader = reader

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> int:
        self.reader.read(1)
        return os.lseek(self.reader._fd, 0, os.SEEK_CUR)


def test_forked_workers_open_their_own_descriptor(tmp_path):
    folder = insightface_set(tmp_path / "s")
    reader = RecordReader(folder / "train.rec", folder / "train.idx")
    reader.read(1)
    os.lseek(reader._fd, 12345, os.SEEK_SET)  # a descriptor inherited by fork would share this offset
    loader = DataLoader(_SharedOffsetProbe(reader), batch_size=1, num_workers=2, multiprocessing_context="fork")
    assert [int(x) for x in loader] == [0, 0, 0, 0]
    assert os.lseek(reader._fd, 0, os.SEEK_CUR) == 12345


@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_dataloader_workers(start_method, tmp_path):
    folder = insightface_set(tmp_path / "s", classes=(0, 0, 1, 1, 1, 2, 2, 2))
    ds = RecordIODataset(str(folder), img_size=16)
    ds[0]  # the parent has an open handle that workers must not reuse
    want = torch.stack([ds[i][0] for i in range(len(ds))]), [ds[i][1] for i in range(len(ds))]
    loader = DataLoader(ds, batch_size=3, num_workers=2, multiprocessing_context=start_method)
    images, labels = zip(*loader)
    assert torch.equal(torch.cat(images), want[0])
    assert torch.cat(labels).tolist() == want[1]

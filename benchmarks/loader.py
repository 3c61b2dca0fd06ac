"""Data-loading throughput: raw RecordIO reads, JPEG decoders, the recordio dataset, DataLoader workers, mxnet.

The dataset yields uint8 images (normalized later, on the training device); the float path it
replaced -- normalizing to float32 in the worker, 4x the bytes through worker queues, pinned
memory and the host-to-device copy -- is measured beside it (``FloatItems``) as "before".

Generates 112x112 JPEG face-sized images (cached under --data, default /tmp/facecore-bench),
packs them with facecore.data.packing.pack_rec, then prints rates and the ratios the project
targets. With --mxnet-python (a Python that has mxnet 1.9.1, e.g. a side venv) the same
records are read the way InsightFace's MXFaceDataset does (MXIndexedRecordIO.read_idx +
recordio.unpack + mx.image.imdecode) in a subprocess, and reported in the same table::

    .venv/bin/python benchmarks/loader.py --mxnet-python /tmp/mxvenv/bin/python

Single-process measurements run on one core (torch.set_num_threads(1), OMP_NUM_THREADS=1 for
mxnet) and are interleaved: every round runs a chunk of each measurement in turn, mxnet's
included (its subprocess waits for commands), so load from other processes hits all of them
alike. Rates are the median over rounds; ratios are the median of the per-round ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from facecore.data import images as fimages  # noqa: E402
from facecore.data.binfile import load_bin, write_bin  # noqa: E402
from facecore.data.packing import pack_rec  # noqa: E402
from facecore.data.recordio import RecordReader, unpack  # noqa: E402

IDENTITIES = 500

# Reads chunks of keys on command ("raw|full START COUNT" on stdin), answers the seconds taken.
MXNET_SERVER = r"""
import json, sys, time
import numpy as np
import mxnet as mx
rec_dir, keys_file = sys.argv[1], sys.argv[2]
keys = [int(k) for k in open(keys_file).read().split()]
r = mx.recordio.MXIndexedRecordIO(rec_dir + "/train.idx", rec_dir + "/train.rec", "r")
for k in keys[:200]:
    mx.image.imdecode(mx.recordio.unpack(r.read_idx(k))[1]).asnumpy()
print(json.dumps({"version": mx.__version__}), flush=True)
for line in sys.stdin:
    cmd, start, count = line.split()
    chunk = keys[int(start):int(start) + int(count)]
    t = time.perf_counter()
    if cmd == "raw":
        for k in chunk:
            r.read_idx(k)
    else:  # what MXFaceDataset.__getitem__ does before its torchvision transforms
        for k in chunk:
            header, img = mx.recordio.unpack(r.read_idx(k))
            label = header.label if np.isscalar(header.label) else header.label[0]
            sample = mx.image.imdecode(img).asnumpy()
    print(json.dumps(time.perf_counter() - t), flush=True)
"""


def make_images(folder: Path, count: int) -> None:
    """count 112x112 JPEGs (quality 95, smooth face-like content, about 6 KB) in identity folders."""
    from PIL import Image

    marker = folder / f".complete-{count}"
    if marker.exists():
        return
    print(f"generating {count} images in {folder} (cached for later runs) ...", flush=True)
    rng = np.random.default_rng(0)
    per = count // IDENTITIES
    yy, xx = np.mgrid[0:112, 0:112].astype(np.float32) / 112
    face = np.exp(-(((xx - 0.5) / 0.3) ** 2 + ((yy - 0.5) / 0.38) ** 2))[..., None]
    for ident in range(IDENTITIES):
        d = folder / f"id{ident:05d}"
        d.mkdir(parents=True, exist_ok=True)
        base = rng.uniform(40, 220, size=3)
        for j in range(per):
            low = rng.uniform(-60, 60, size=(8, 8, 3)).astype(np.float32)
            low = np.asarray(Image.fromarray(np.uint8(np.clip(low + 128, 0, 255))).resize((112, 112), Image.BICUBIC),
                             dtype=np.float32) - 128
            img = base * (0.4 + 0.6 * face) + low + rng.normal(0, 6, size=(112, 112, 3))
            Image.fromarray(np.uint8(np.clip(img, 0, 255))).save(d / f"{j:03d}.jpg", quality=95)
    marker.touch()


def ensure_data(root: Path, count: int) -> Path:
    faces, rec = root / f"faces-{count}", root / f"rec-{count}"
    make_images(faces, count)
    if not (rec / "property").exists():
        print(f"packing {faces} -> {rec} ...", flush=True)
        start = time.perf_counter()
        stats = pack_rec(faces, rec, progress=False, force=True)
        print(f"packed {stats['images']} images in {time.perf_counter() - start:.1f} s")
    return rec


class MxnetServer:
    """The mxnet side, in its own Python, answering timed chunks on request."""

    def __init__(self, python: str, rec: Path, keys: list[int], tmp: Path):
        keys_file = tmp / "mxnet-keys.txt"
        keys_file.write_text(" ".join(map(str, keys)))
        env = dict(os.environ, OMP_NUM_THREADS="1", MXNET_CPU_WORKER_NTHREADS="1")
        self.proc = subprocess.Popen([python, "-c", MXNET_SERVER, str(rec), str(keys_file)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{python} could not start mxnet (is mxnet 1.9.1 installed there?)")
        self.version = json.loads(line)["version"]

    def seconds(self, cmd: str, start: int, count: int) -> float:
        self.proc.stdin.write(f"{cmd} {start} {count}\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def interleaved(measures: dict[str, Callable[[int, int], float]], n: int, chunk: int, rounds: int) -> dict:
    """{name: [rate per round]}; each measure(start, count) returns the seconds for that chunk."""
    rates: dict[str, list[float]] = {name: [] for name in measures}
    for r in range(rounds):
        start = (r * chunk) % max(1, n - chunk + 1)
        for name, measure in measures.items():
            rates[name].append(chunk / measure(start, chunk))
    return rates


def clock(fn: Callable, items: list) -> Callable[[int, int], float]:
    def measure(start: int, count: int) -> float:
        part = items[start : start + count]
        t = time.perf_counter()
        for x in part:
            fn(x)
        return time.perf_counter() - t

    return measure


class FloatItems(torch.utils.data.Dataset):
    """The float path the dataset had before: each item normalized to float32 in [-1, 1] in the worker."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, index: int):
        image, label = self.ds[index]
        return fimages.normalize(image), label


def bench_loaders(datasets: dict, epochs_images: int) -> dict:
    """{(path, workers): images/s} of a DataLoader (batch 128) over the same random subset of each dataset."""
    from torch.utils.data import DataLoader, Subset

    order = np.random.default_rng(2).permutation(len(next(iter(datasets.values()))))[:epochs_images].tolist()
    out = {}
    for workers in (0, 1, 2):
        for path, ds in datasets.items():
            loader = DataLoader(Subset(ds, order), batch_size=128, shuffle=True, num_workers=workers, drop_last=True)
            it = iter(loader)
            next(it)  # start-up (worker start) is not counted
            start = time.perf_counter()
            count = sum(len(labels) for _, labels in it)
            out[(path, workers)] = count / (time.perf_counter() - start)
    return out


def print_loaders(loaders: dict) -> None:
    """Loader rates, per loading process (the workers, or the main process with num_workers=0)."""
    print("\nDataLoader, batch 128: images/s, and per loading process (num_workers, or 1 with 0 workers)")
    print(f"  {'num_workers':>11}  {'float (before)':>15} {'uint8 (now)':>12} {'per process: float':>19} "
          f"{'uint8':>7} {'uint8/float':>11}")
    for workers in (0, 1, 2):
        before, now = loaders[("float", workers)], loaders[("uint8", workers)]
        per = max(workers, 1)
        print(f"  {workers:>11}  {before:15.0f} {now:12.0f} {before / per:19.0f} {now / per:7.0f} {now / before:11.2f}")


def bench_bin(payloads: list[bytes], tmp: Path) -> None:
    from facecore_plugins.bin_pairs import BinPairsDataset

    path = tmp / "pairs-12000.bin"
    if not path.exists():
        write_bin(path, payloads[:12000], [bool(i % 2) for i in range(6000)])
    print(f"\n.bin pair set: 12,000 images (6,000 pairs), {path.stat().st_size / 1e6:.0f} MB")
    start = time.perf_counter()
    bins, _ = load_bin(path)
    t_unpickle = time.perf_counter() - start
    start = time.perf_counter()
    ds = BinPairsDataset(str(path))
    t_lazy = time.perf_counter() - start
    start = time.perf_counter()
    eager = torch.stack([fimages.decode_chw(b) for b in bins])
    t_eager = time.perf_counter() - start + t_unpickle
    start = time.perf_counter()
    for i in range(len(ds)):
        ds[i]
    pass_lazy = time.perf_counter() - start
    start = time.perf_counter()
    for i in range(len(eager)):
        fimages.normalize(eager[i])
    pass_eager = time.perf_counter() - start
    kept = sum(len(b) for b in bins) / 2**20
    print(f"  restricted unpickle alone                          {t_unpickle:5.2f} s")
    print(f"  load, lazy (unpickle + decode check, keep bytes)   {t_lazy:5.2f} s, keeps {kept:4.0f} MiB")
    print(f"  load, eager (unpickle + decode, keep uint8)        {t_eager:5.2f} s, keeps {eager.numel() / 2**20:4.0f} MiB")
    print(f"  one pass over the 12,000 items: lazy {pass_lazy:.2f} s, eager {pass_eager:.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="/tmp/facecore-bench", help="cache folder for the generated data")
    parser.add_argument("--images", type=int, default=20_000, help="images in the generated .rec")
    parser.add_argument("--chunk", type=int, default=1000, help="images per measurement per round")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--mxnet-python", help="a Python with mxnet 1.9.1 (e.g. /tmp/mxvenv/bin/python)")
    parser.add_argument("--no-bin", action="store_true", help="skip the .bin pair-set measurement")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    root = Path(args.data)
    root.mkdir(parents=True, exist_ok=True)
    rec = ensure_data(root, args.images)

    from torchvision import transforms

    from facecore_plugins.recordio import RecordIODataset

    ds = RecordIODataset(str(rec), train=True)
    float_ds = FloatItems(ds)
    reader = RecordReader(rec / "train.rec", rec / "train.idx")
    mm = RecordReader(rec / "train.rec", rec / "train.idx", method="mmap")
    order = np.random.default_rng(0).permutation(len(ds)).tolist()
    keys = [int(ds.keys[i]) for i in order]
    payloads = [bytes(unpack(reader.read(k))[1]) for k in keys]
    arrays = [fimages.decode_image(p) for p in payloads[: args.chunk * 2]]
    insightface_transform = transforms.Compose([  # arcface_torch's MXFaceDataset transform
        transforms.ToPILImage(), transforms.RandomHorizontalFlip(), transforms.ToTensor(),
        transforms.Normalize(mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5]),
    ])
    print(f"{len(ds)} images in {rec}, mean JPEG size {np.mean([len(p) for p in payloads]) / 1e3:.1f} KB; "
          f"{args.rounds} rounds x {args.chunk} images; torch {torch.__version__}; JPEG decoder: {fimages.JPEG_DECODER}")

    measures: dict[str, Callable[[int, int], float]] = {
        "raw read, pread (random keys)": clock(reader.read, keys),
        "raw read, mmap (random keys)": clock(mm.read, keys),
        "decode only, the JPEG decoder in use (ceiling)": clock(fimages.decode_chw, payloads),
        "decode only, Pillow": clock(fimages._pil_decode, payloads),
        "dataset[i] uint8: read + decode + flip (now)": clock(ds.__getitem__, order),
        "dataset[i] float: + normalize in the worker (before)": clock(float_ds.__getitem__, order),
        "InsightFace transforms alone (torchvision)": lambda s, c: clock(insightface_transform, arrays)(s % args.chunk, c),
    }
    server = None
    if args.mxnet_python:
        server = MxnetServer(args.mxnet_python, rec, keys, root)
        measures[f"mxnet {server.version} read_idx only"] = lambda s, c: server.seconds("raw", s, c)
        measures[f"mxnet {server.version} read_idx + unpack + imdecode"] = lambda s, c: server.seconds("full", s, c)
    for m in measures.values():  # warm-up: page cache, allocator, lazy imports
        m(0, min(200, args.chunk))
    rates = interleaved(measures, len(keys), args.chunk, args.rounds)
    if server:
        server.close()
        mx_full = rates[f"mxnet {server.version} read_idx + unpack + imdecode"]
        tf = rates["InsightFace transforms alone (torchvision)"]
        rates["MXFaceDataset item: mxnet read+decode, then transforms"] = [1 / (1 / a + 1 / b) for a, b in zip(mx_full, tf)]
    loaders = bench_loaders({"float": float_ds, "uint8": ds}, min(len(ds), 10_240))

    width = max(map(len, rates))
    print(f"\n{'measurement':<{width}}  {'median/s':>9} {'best/s':>9}")
    for name, values in rates.items():
        print(f"{name:<{width}}  {statistics.median(values):9.0f} {max(values):9.0f}")
    print_loaders(loaders)

    def ratio(a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(rates[a], rates[b]))

    ours, ceiling = "dataset[i] uint8: read + decode + flip (now)", "decode only, the JPEG decoder in use (ceiling)"
    print("\nratios, median of per-round ratios (targets in brackets)")
    print(f"  dataset[i] uint8 / float (per core)         {ratio(ours, 'dataset[i] float: + normalize in the worker (before)'):5.2f}")
    print(f"  dataset[i] / bare JPEG decode               {ratio(ours, ceiling):5.2f}  [>= 0.70]")
    print(f"  raw pread reads, median                {statistics.median(rates['raw read, pread (random keys)']):8.0f}/s  "
          "[>= 100,000]")
    print(f"  JPEG decoder in use / Pillow decode         {ratio(ceiling, 'decode only, Pillow'):5.2f}")
    if server:
        mx = f"mxnet {server.version} read_idx + unpack + imdecode"
        print(f"  dataset[i] / mxnet read+unpack+imdecode     {ratio(ours, mx):5.2f}  [>= 3]")
        print(f"  bare decode / mxnet read+unpack+imdecode    {ratio(ceiling, mx):5.2f}  (bound for any decode-bound loop)")
        print(f"  dataset[i] / MXFaceDataset item             "
              f"{ratio(ours, 'MXFaceDataset item: mxnet read+decode, then transforms'):5.2f}")
    else:
        print("  (no mxnet comparison: pass --mxnet-python)")
    if not args.no_bin:
        bench_bin(payloads, root)


if __name__ == "__main__":
    main()

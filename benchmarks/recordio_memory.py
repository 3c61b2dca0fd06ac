"""Memory of a process reading a multi-GB .rec by key: RSS against bytes read, for pread and mmap.

Writes a .rec of --gb gigabytes (default 3) into --dir (default /tmp), reads every record
in random order with facecore.data.recordio.RecordReader, prints RSS at intervals, and deletes
the file at the end. Usage::

    .venv/bin/python benchmarks/recordio_memory.py [--gb 3] [--dir /tmp] [--method pread|mmap|both]

pread keeps RSS flat (the kernel's page cache holds the file, not the process); mmap
maps file pages into the process, so its RSS (file-backed, reclaimable) grows with the
bytes touched.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from facecore.data.recordio import RecordReader, RecordWriter, pack  # noqa: E402

RECORD = 60_000  # bytes of image payload per record, about a 224px JPEG


def rss_mb() -> tuple[float, float]:
    """(RSS, its anonymous part) in MiB, from /proc/self/status."""
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon"):
                fields[key] = int(value.split()[0]) / 1024
    return fields.get("VmRSS", float("nan")), fields.get("RssAnon", float("nan"))


def write_file(folder: Path, gigabytes: float) -> tuple[Path, Path, int]:
    rec, idx = folder / "big.rec", folder / "big.idx"
    count = int(gigabytes * 1e9 // (RECORD + 32))
    blobs = [os.urandom(RECORD) for _ in range(16)]
    start = time.perf_counter()
    with RecordWriter(rec, idx) as writer:
        for key in range(count):
            writer.write(key, pack(float(key % 1000), blobs[key % 16], id=key))
    took = time.perf_counter() - start
    size = rec.stat().st_size
    print(f"wrote {count} records, {size / 1e9:.2f} GB in {took:.1f} s ({size / 1e6 / took:.0f} MB/s)")
    return rec, idx, count


def read_all(rec: Path, idx: Path, count: int, method: str, reports: int = 8) -> None:
    reader = RecordReader(rec, idx, method=method)
    order = np.random.default_rng(0).permutation(count)
    base, base_anon = rss_mb()
    print(f"\n[{method}] before reading: RSS {base:.0f} MiB (anonymous {base_anon:.0f} MiB)")
    print(f"{'GB read':>8} {'RSS MiB':>9} {'anon MiB':>9} {'records/s':>10}")
    step = max(1, count // reports)
    read = 0
    start = time.perf_counter()
    for i, key in enumerate(order.tolist(), 1):
        read += len(reader.read(key))
        if (i % step == 0 and i + step <= count) or i == count:
            rss, anon = rss_mb()
            rate = i / (time.perf_counter() - start)
            print(f"{read / 1e9:8.2f} {rss:9.0f} {anon:9.0f} {rate:10.0f}")
    rss, anon = rss_mb()
    reader.close()
    print(f"[{method}] RSS grew by {rss - base:.0f} MiB while reading {read / 1e9:.2f} GB "
          f"(anonymous memory by {anon - base_anon:.0f} MiB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=3.0, help="size of the test file in GB")
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="where to write it (deleted afterwards)")
    parser.add_argument("--method", choices=["pread", "mmap", "both"], default="both")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="facecore-rss-", dir=args.dir))
    try:
        rec, idx, count = write_file(folder, args.gb)
        for method in (["pread", "mmap"] if args.method == "both" else [args.method]):
            read_all(rec, idx, count, method)
    finally:
        for f in folder.iterdir():
            f.unlink()
        folder.rmdir()
        print(f"\ndeleted {folder}")


if __name__ == "__main__":
    main()

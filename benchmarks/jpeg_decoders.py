"""JPEG decoders for facecore's data path: what each costs to load and how fast it decodes (issue 13).

facecore used to register torchvision's image library by file name (``torch.ops.load_library``)
so that a process, a DataLoader worker above all, need not import the whole torchvision
package. torchvision 0.29 then deprecated its image codecs in favour of TorchCodec. This script
measures the three ways, each in fresh processes:

- ``private``: torchvision's image library loaded by file name, its op called directly;
- ``torchvision``: the public ``torchvision.io.decode_jpeg`` (imports the torchvision package);
- ``torchcodec``: the public ``torchcodec.decoders.decode_jpeg``.

1. import cost after ``import torch``;
2. DataLoader start: seconds from creating the iterator to the first batch, 2 workers, fork
   and spawn, each worker loading the decoder as the dataset module would;
3. decode rate of a 112x112 JPEG on one thread.

    .venv/bin/python benchmarks/jpeg_decoders.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("private", "torchvision", "torchcodec")

# Each snippet defines load() -> decode(tensor) for one variant.
LOADERS = textwrap.dedent("""
    import importlib.util, os, warnings
    import torch

    def load_private():
        folder = importlib.util.find_spec("torchvision").submodule_search_locations[0]
        lib = [f for f in os.listdir(folder) if f.startswith("image") and f.endswith(".so")][0]
        torch.ops.load_library(os.path.join(folder, lib))
        op = torch.ops.image.decode_jpeg
        return lambda t: op(t, 3, False)

    def load_torchvision():
        from torchvision.io import ImageReadMode, decode_jpeg
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        return lambda t: decode_jpeg(t, mode=ImageReadMode.RGB)

    def load_torchcodec():
        from torchcodec.decoders import decode_jpeg
        return lambda t: decode_jpeg(t, mode="RGB")

    LOAD = {"private": load_private, "torchvision": load_torchvision, "torchcodec": load_torchcodec}
""")

IMPORT = LOADERS + textwrap.dedent("""
    import sys, time
    t = time.perf_counter()
    LOAD[sys.argv[1]]()
    print(time.perf_counter() - t)
""")

LOADER = LOADERS + textwrap.dedent("""
    import multiprocessing as mp, sys, time
    from torch.utils.data import DataLoader, Dataset
    method, variant = sys.argv[1], sys.argv[2]

    class Images(Dataset):
        def __len__(self):
            return 64
        def __getitem__(self, i):
            return torch.zeros(3, 112, 112, dtype=torch.uint8), i

    def init(_):
        LOAD[variant]()  # as the dataset module does on import (free when forked from a parent that did)

    if __name__ == "__main__":
        LOAD[variant]()
        loader = DataLoader(Images(), batch_size=32, num_workers=2, multiprocessing_context=mp.get_context(method),
                            worker_init_fn=init)
        t = time.perf_counter()
        next(iter(loader))
        print(time.perf_counter() - t)
""")

DECODE = LOADERS + textwrap.dedent("""
    import io, sys, time
    import numpy as np
    from PIL import Image
    torch.set_num_threads(1)
    decode = LOAD[sys.argv[1]]()
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (14, 14, 3), dtype=np.uint8)).resize((112, 112)).save(buf, "JPEG", quality=90)
    data = torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)
    for _ in range(200):
        decode(data)
    n = 3000
    t = time.perf_counter()
    for _ in range(n):
        decode(data)
    print(n / (time.perf_counter() - t))
""")


def run(code: str, *args: str) -> float:
    """Run ``code`` as a script file in a fresh interpreter (spawned workers re-import it by path)."""
    with tempfile.TemporaryDirectory() as folder:
        script = Path(folder) / "measure.py"
        script.write_text(code)
        out = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, check=True, cwd=ROOT)
    return float(out.stdout.split()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    rounds = parser.parse_args().rounds
    rows: dict[str, dict[str, list[float]]] = {}
    for _ in range(rounds):  # interleaved, so load from other processes hits every variant alike
        for v in VARIANTS:
            rows.setdefault("load decoder after import torch (s)", {}).setdefault(v, []).append(run(IMPORT, v))
            for method in ("fork", "spawn"):
                rows.setdefault(f"first batch, 2 workers, {method} (s)", {}).setdefault(v, []).append(run(LOADER, method, v))
            rows.setdefault("decode 112x112 JPEG, 1 thread (img/s)", {}).setdefault(v, []).append(run(DECODE, v))
    width = max(map(len, rows))
    print(f"median over {rounds} rounds")
    print(f"{''.ljust(width)}  " + "  ".join(v.rjust(11) for v in VARIANTS))
    for name, by in rows.items():
        print(f"{name.ljust(width)}  " + "  ".join(f"{statistics.median(by[v]):11.3f}" for v in VARIANTS))
    med = {name: {v: statistics.median(by[v]) for v in VARIANTS} for name, by in rows.items()}
    for method in ("fork", "spawn"):
        m = med[f"first batch, 2 workers, {method} (s)"]
        print(f"DataLoader start, {method}: private library saves {m['torchvision'] - m['private']:+.3f} s over torchvision.io; "
              f"torchcodec {m['torchcodec'] - m['private']:+.3f} s against private")
    rate = med["decode 112x112 JPEG, 1 thread (img/s)"]
    print(f"decode rate vs private op: torchvision.io {rate['torchvision'] / rate['private']:.2f}x, "
          f"torchcodec {rate['torchcodec'] / rate['private']:.2f}x")


if __name__ == "__main__":
    main()

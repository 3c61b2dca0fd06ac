"""benchmarks/gpu.py: runs end to end (tiny sizes on the CPU), and from a checkout that is not pip-installed."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import subprocess_env

REPO = Path(__file__).resolve().parents[1]


def _load_checkout_module():
    spec = importlib.util.spec_from_file_location("facecore_bench_checkout", REPO / "benchmarks" / "checkout.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_checkout_folder_mirrors_pyproject(tmp_path) -> None:
    tomllib = pytest.importorskip("tomllib")
    checkout = _load_checkout_module()
    text = (REPO / "pyproject.toml").read_text()
    meta = tomllib.loads(text)
    assert checkout._parse_flat_tables(text) == checkout._pyproject(REPO)  # the Python 3.10 reader agrees
    folder = checkout.build_site(REPO, tmp_path / "site")
    for name, source in meta["tool"]["setuptools"]["package-dir"].items():
        assert (folder / name).resolve() == (REPO / source).resolve()
    (info,) = folder.glob("facecore-*.dist-info")
    assert info.name == f"facecore-{meta['project']['version']}.dist-info"
    lines = (info / "entry_points.txt").read_text().splitlines()
    assert lines[0] == "[facecore]"
    assert dict(line.split(" = ") for line in lines[1:]) == meta["project"]["entry-points"]["facecore"]


@pytest.mark.slow
def test_gpu_benchmark_runs_end_to_end_on_the_cpu(tmp_path) -> None:
    out = tmp_path / "gpu.json"
    run = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu.py"), "--device", "cpu", "--quick", "--no-compile",
                          "--data", str(tmp_path / "data"), "--json", str(out)],
                         capture_output=True, text=True, env=subprocess_env(), timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "measurement" in run.stdout and "overhead" in run.stdout
    rows = json.loads(out.read_text())["rows"]
    measured = [r for r in rows if "left out" not in r["note"]]
    assert len(measured) == 6 and not [r for r in measured if r["note"].startswith(("error", "skipped"))]
    assert all(r["numbers"]["facecore"] for r in measured)
    assert all(r["numbers"]["bare"]["images_per_s"] > 0 for r in measured[:3])

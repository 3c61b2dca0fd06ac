"""The quick start, shortened: demo data -> facecore train -> facecore eval, through the CLI.

It must learn (held-out identities well above raw pixels and the untrained network), write the
run's files, and continue a finished run when asked for more epochs.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import subprocess_env

from facecore.core.checkpoint import load_checkpoint
from facecore.data.synthetic import make_demo_data, raw_pixel_baseline

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
FACECORE = [sys.executable, "-m", "facecore.cli"]


def facecore(*args: str) -> subprocess.CompletedProcess:
    out = subprocess.run([*FACECORE, *args], capture_output=True, text=True, env=subprocess_env(OMP_NUM_THREADS="2"),
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def test_short_quickstart_learns_writes_its_files_and_resumes(tmp_path: Path) -> None:
    data = tmp_path / "demo"
    make_demo_data(data, train_identities=120, images_per_identity=10, test_identities=30,
                   test_images_per_identity=6, pairs=400, progress=False)
    raw = raw_pixel_baseline(data / "test.bin")
    runs = tmp_path / "runs"
    common = ["--config", str(ROOT / "configs" / "quickstart.yaml"),
              "--set", f"data.root={data / 'train'}", "--set", f"checkpoint.save_dir={runs}",
              "--set", f"logging.log_dir={tmp_path / 'logs'}", "--set", "data.batch_size=32",
              "--set", "training.epochs=4", "--set", "eval.eval_freq=4"]
    facecore("train", *common, "--quiet")

    (run,) = (runs / "fastcontextface").iterdir()
    names = {p.name for p in run.iterdir()}
    assert {"config.yaml", "last.pth", "best.pth", "metrics.jsonl", "train.log"} <= names
    validations = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
                   if json.loads(line)["event"] == "validation"]
    untrained, trained = validations[0], validations[-1]
    assert untrained["step"] == 0 and trained["step"] == 4 * (1200 // 32)
    assert trained["accuracy"] > raw + 0.1, (raw, trained["accuracy"])
    assert trained["accuracy"] > untrained["accuracy"] + 0.1, (untrained["accuracy"], trained["accuracy"])
    assert list((tmp_path / "logs" / "tensorboard").rglob("events.out.tfevents.*"))

    # the config stored in the checkpoint is enough; eval reproduces the trainer's validation
    evaluated = json.loads(facecore("eval", "--checkpoint", str(run / "best.pth"), "--json").stdout)
    assert evaluated["results"]["test"]["accuracy"] == pytest.approx(trained["accuracy"], abs=1e-9)

    facecore("train", *common, "--set", "training.epochs=5", "--resume", "--quiet")
    resumed = load_checkpoint(run / "last.pth")
    assert resumed["epoch"] == 5 and resumed["step"] == 5 * (1200 // 32)
    assert list(runs.rglob("last.pth")) == [run / "last.pth"]  # continued in the same run directory

"""torchrun with 2 CPU processes (gloo) trains the same weights as 1 process with the same global batch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import fake_distribution, make_tiny_data, subprocess_env

from facecore.core.checkpoint import load_checkpoint

pytestmark = pytest.mark.slow

# BatchNorm statistics are per rank (as in arcface_torch), so the equivalence is checked on a
# backbone without it: everything else -- sampler, augmentations, DDP averaging, the sharded
# classifier's gathers and distributed softmax -- is the real code path.
PROBE = """
import torch
from torch import nn
from facecore import hookimpl


class Probe(nn.Module):
    def __init__(self, embedding_size):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(6)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 36, embedding_size)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(self.pool(x))).flatten(1))


@hookimpl
def register_backbones(register):
    register("probe", Probe, description="BN-free test backbone")
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("ddp")
    data = make_tiny_data(root, identities=6, per_identity=8)
    fake_distribution(root, "fc-probe", "fc_probe_plugin", PROBE)
    env = subprocess_env(PYTHONPATH=str(root))
    return data, env


# Augmentations on, so their per-position random numbers are checked across world sizes too.
AUGMENT = ["flip", {"name": "random_crop", "p": 0.5}, {"name": "low_resolution", "p": 0.5},
           {"name": "photometric", "p": 0.5}, {"name": "blur", "p": 0.3}]


def run(tmp: Path, data: Path, env: dict, processes: int, shard: bool, *extra: str, augment: list | None = None) -> dict:
    config = {
        "seed": 3,
        "device": "cpu",
        "model": {"backbone": "probe", "embedding_size": 16},
        "head": {"type": "cosface", "scale": 16.0, "margin": 0.2, "shard": shard},
        "data": {"root": str(data), "batch_size": 16 // processes, "num_workers": 0, "augment": augment or ["flip"]},
        "training": {"epochs": 2, "lr": 0.1, "scheduler": "cosine", "warmup_epochs": 0.5},
        "checkpoint": {"save_dir": str(tmp / "runs")},
        "logging": {"log_dir": str(tmp / "logs"), "tensorboard": False},
    }
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "c.yaml").write_text(yaml.safe_dump(config))
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    cmd = [*launcher, "-m", "facecore.cli"] if processes > 1 else [sys.executable, "-m", "facecore.cli"]
    out = subprocess.run([*cmd, "train", "--config", str(tmp / "c.yaml"), "--quiet", *extra], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    (last,) = (tmp / "runs").rglob("last.pth")
    return load_checkpoint(last)


@pytest.mark.parametrize("shard", [False, True], ids=["replicated-centers", "sharded-centers"])
def test_two_processes_match_one_with_the_same_global_batch(setup, tmp_path: Path, shard: bool) -> None:
    data, env = setup
    one = run(tmp_path / "one", data, env, 1, shard, augment=AUGMENT)
    two = run(tmp_path / "two", data, env, 2, shard, augment=AUGMENT)
    assert one["step"] == two["step"] == 2 * (48 // 16)
    assert two["world_size"] == 2
    for part in ("backbone", "classifier"):
        assert one[part].keys() == two[part].keys()
        for key in one[part]:
            assert torch.allclose(one[part][key], two[part][key], atol=1e-5, rtol=1e-4), (part, key)


def test_sharded_run_resumes_on_another_number_of_processes(setup, tmp_path: Path) -> None:
    """Checkpoints hold whole center matrices and their optimizer statistics, so 2 epochs on 2
    processes + 1 more on 1 process train what 3 epochs on 2 processes train."""
    data, env = setup
    straight = run(tmp_path / "straight", data, env, 2, True, "--set", "training.epochs=3")
    two = run(tmp_path / "moved", data, env, 2, True, "--set", "training.epochs=3", "--set", "training.max_steps=6")
    assert two["step"] == 6 and two["classifier"]["weight"].shape == (6, 16)  # saved whole, not per shard
    one = run(tmp_path / "moved", data, env, 1, True, "--resume", "--set", "training.epochs=3")
    assert one["epoch"] == 3 and one["step"] == straight["step"] == 9 and one["world_size"] == 1
    for part in ("backbone", "classifier"):
        for key in straight[part]:
            assert torch.allclose(one[part][key], straight[part][key], atol=1e-5, rtol=1e-4), (part, key)

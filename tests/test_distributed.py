"""torchrun with 2 CPU processes (gloo) trains the same weights as 1 process with the same global batch,
validates every epoch (best.pth written by every rank's decision), exits 0, and resumes bit-exactly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from helpers import fake_distribution, make_tiny_data, subprocess_env

from facecore.core.checkpoint import load_checkpoint

pytestmark = pytest.mark.slow

# BatchNorm statistics are per rank (as in arcface_torch), so the equivalence is checked on a
# backbone without it: everything else -- sampler, augmentations, DDP averaging, the sharded
# classifier's gathers and distributed softmax -- is the real code path. The head uses every seam a
# head has (HeadBatch randomness and global means, state, its own parameter and loss term).
PROBE = """
import json
import os
import time

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
        if self.training and os.environ.get("FC_PROBE_SLEEP"):
            time.sleep(float(os.environ["FC_PROBE_SLEEP"]))  # room to land a signal mid-run; the numbers stay
        return self.fc(torch.relu(self.conv(self.pool(x))).flatten(1))


class ProbeHead(nn.Module):
    # CosFace plus every seam a head may use: a random margin per row, running state from a global-batch
    # mean, a parameter of its own, a loss term of its own, the class count at build time.

    uses_batch = True

    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1))
        self.register_buffer("t", torch.zeros(1))

    def configure(self, num_classes, sample_rate):
        self.register_buffer("classes", torch.tensor([float(num_classes)]))

    def forward(self, cosine, labels, norms, batch):
        if self.training:
            with torch.no_grad():
                self.t.mul_(0.9).add_(0.1 * batch.global_mean(batch.target_cosine))
        target = torch.zeros_like(cosine).scatter_(1, labels.clamp(min=0).unsqueeze(1), (labels >= 0).unsqueeze(1).float())
        margin = 0.2 + 0.05 * batch.normal(1)
        return 16.0 * (cosine - target * (margin - self.bias) + 0.1 * self.t)

    def extra_terms(self, norms):
        return {"norm": 0.01 * norms.mean()}


@hookimpl
def register_backbones(register):
    register("probe", Probe, description="BN-free test backbone")


@hookimpl
def register_heads(register):
    register("probe-head", ProbeHead, description="test head using every head seam")
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("ddp")
    # 7 identities: an odd class count, so sharded centers split unevenly (4 + 3) over 2 ranks
    data = make_tiny_data(root, identities=7, per_identity=8)
    fake_distribution(root, "fc-probe", "fc_probe_plugin", PROBE)
    env = subprocess_env(PYTHONPATH=str(root))
    return data, env


# Augmentations on, so their per-position random numbers are checked across world sizes too.
AUGMENT = ["flip", {"name": "random_crop", "p": 0.5}, {"name": "low_resolution", "p": 0.5},
           {"name": "photometric", "p": 0.5}, {"name": "blur", "p": 0.3}]


STEPS_PER_EPOCH = 56 // 16  # 7 identities x 8 images, global batch 16


def write_config(tmp: Path, data: Path, processes: int, shard: bool, augment: list | None = None,
                 sample_rate: float = 1.0, save_every_steps: int | None = None, **training) -> Path:
    config = {
        "seed": 3,
        "device": "cpu",
        "model": {"backbone": "probe", "embedding_size": 16},
        "head": {"type": "probe-head", "shard": shard, "sample_rate": sample_rate},
        "data": {"root": str(data), "batch_size": 16 // processes, "num_workers": 0, "augment": augment or ["flip"]},
        "training": {"epochs": 2, "lr": 0.1, "scheduler": "cosine", "warmup_epochs": 0.5, **training},
        "checkpoint": {"save_dir": str(tmp / "runs"), "save_every_steps": save_every_steps},
        "logging": {"log_dir": str(tmp / "logs"), "tensorboard": False},
        "eval": {"bin_file": "val.bin", "eval_freq": 1},  # validated every epoch: best.pth is a collective when sharded
    }
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "c.yaml").write_text(yaml.safe_dump(config))
    return tmp / "c.yaml"


def command(processes: int) -> list[str]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    return [*launcher, "-m", "facecore.cli"] if processes > 1 else [sys.executable, "-m", "facecore.cli"]


def check_exit(out: subprocess.CompletedProcess | subprocess.Popen, stderr: str) -> None:
    """Exit status 0, and no rank died in C++ teardown (the abort that made torchrun exit 1 after a finished run)."""
    assert out.returncode == 0, stderr[-3000:]
    assert "terminate called" not in stderr, stderr[-3000:]


def run(tmp: Path, data: Path, env: dict, processes: int, shard: bool, *extra: str, augment: list | None = None,
        **options) -> dict:
    config = write_config(tmp, data, processes, shard, augment, **options)
    out = subprocess.run([*command(processes), "train", "--config", str(config), "--quiet", *extra], env=env,
                         capture_output=True, text=True, timeout=300)
    check_exit(out, out.stderr)
    (last,) = (tmp / "runs").rglob("last.pth")
    return load_checkpoint(last)


def kill_tree(pid: int, signum: int = signal.SIGKILL) -> None:
    """Send ``signum`` to ``pid`` and every process below it (torchrun's workers run in its process group or their own)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    todo, found = [pid], []
    while todo:
        found.append(todo.pop())
        todo.extend(children.get(found[-1], []))
    for p in found:
        try:
            os.kill(p, signum)
        except ProcessLookupError:
            pass


def assert_close(a: dict, b: dict) -> None:
    for part in ("backbone", "classifier"):
        assert a[part].keys() == b[part].keys()
        for key in a[part]:
            assert torch.allclose(a[part][key], b[part][key], atol=1e-5, rtol=1e-4), (part, key)


@pytest.mark.parametrize("shard", [False, True], ids=["replicated-centers", "sharded-centers"])
def test_two_processes_match_one_with_the_same_global_batch(setup, tmp_path: Path, shard: bool) -> None:
    data, env = setup
    one = run(tmp_path / "one", data, env, 1, shard, augment=AUGMENT)
    two = run(tmp_path / "two", data, env, 2, shard, augment=AUGMENT)
    assert one["step"] == two["step"] == 2 * STEPS_PER_EPOCH
    assert two["world_size"] == 2
    assert_close(one, two)
    assert one["classifier"]["head.bias"].abs().item() > 0 and one["classifier"]["head.t"].abs().item() > 0
    assert one["classifier"]["head.classes"].item() == 7  # told at build time, also when sharded
    # validation ran every epoch on rank 0; every rank took the best.pth decision from its broadcast result
    (best_one,) = (tmp_path / "one" / "runs").rglob("best.pth")
    (best_two,) = (tmp_path / "two" / "runs").rglob("best.pth")
    best_one, best_two = load_checkpoint(best_one), load_checkpoint(best_two)
    assert best_one["step"] == best_two["step"] and best_one["best_metric"] == best_two["best_metric"]
    assert best_two["best_metric"]["value"] >= 0
    assert set(best_two["val_metrics"]) == {"val"}
    assert_close(best_one, best_two)


def test_sharded_run_resumes_on_another_number_of_processes(setup, tmp_path: Path) -> None:
    """Checkpoints hold whole center matrices and their optimizer statistics, so 2 epochs on 2
    processes + 1 more on 1 process train what 3 epochs on 2 processes train."""
    data, env = setup
    straight = run(tmp_path / "straight", data, env, 2, True, "--set", "training.epochs=3")
    two = run(tmp_path / "moved", data, env, 2, True, "--set", "training.epochs=3", "--set", "training.max_steps=6")
    assert two["step"] == 6 and two["classifier"]["weight"].shape == (7, 16)  # saved whole, not per shard
    one = run(tmp_path / "moved", data, env, 1, True, "--resume", "--set", "training.epochs=3")
    assert one["epoch"] == 3 and one["step"] == straight["step"] == 3 * STEPS_PER_EPOCH and one["world_size"] == 1
    assert_close(one, straight)


def test_two_process_run_killed_and_resumed_is_bit_exact_with_sampling_on_uneven_shards(setup, tmp_path: Path) -> None:
    """Shards of 16 and 15 centers draw different amounts of randomness for Partial FC's negatives (12 of
    16 and 11 of 15 sampled, more than a batch's positives): each rank's random state is saved and
    restored, so kill -9 of every process + --resume changes nothing."""
    _, env = setup
    env = {**env, "FC_PROBE_SLEEP": "0.1"}  # room to land the kill mid-run on a busy machine; the numbers stay
    data = make_tiny_data(tmp_path / "data31", identities=31, per_identity=2)  # 62 images: 3 steps of 16
    options = dict(augment=AUGMENT, sample_rate=0.7, epochs=3)
    reference = run(tmp_path / "ref", data, env, 2, True, **options)

    config = write_config(tmp_path / "killed", data, 2, True, save_every_steps=1, **options)
    proc = subprocess.Popen([*command(2), "train", "--config", str(config), "--quiet"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    killed_at, deadline = None, time.time() + 120
    while time.time() < deadline and proc.poll() is None and killed_at is None:
        for found in (tmp_path / "killed" / "runs").rglob("last.pth"):
            try:
                ckpt = torch.load(found, weights_only=True)
            except Exception:  # being replaced right now: try again
                continue
            if ckpt["epoch"] == 1 and 1 <= ckpt["batch_in_epoch"] < STEPS_PER_EPOCH:  # mid-way through epoch 2
                kill_tree(proc.pid)  # torchrun and both workers at once, as a node failure would
                killed_at = (ckpt["epoch"], ckpt["batch_in_epoch"])
        time.sleep(0.01)
    proc.wait()
    assert killed_at is not None, f"the run ended before it could be killed: {proc.stderr.read().decode()[-500:]}"
    (last,) = (tmp_path / "killed" / "runs").rglob("last.pth")
    left = load_checkpoint(last)
    assert left["step"] < 3 * STEPS_PER_EPOCH, f"the workers outlived the kill at {killed_at}: nothing left to resume"

    out = subprocess.run([*command(2), "train", "--config", str(config), "--resume", "--quiet"], env=env,
                         capture_output=True, text=True, timeout=300)
    check_exit(out, out.stderr)
    resumed = load_checkpoint(last)
    assert resumed["step"] == reference["step"] == 3 * STEPS_PER_EPOCH
    assert len(resumed["rng_per_rank"]) == 2
    for part in ("backbone", "classifier"):
        for key in reference[part]:
            assert torch.equal(resumed[part][key], reference[part][key]), (part, key)


# Every bundled head, 1 process against 2, centers replicated and sharded: one launch per world size.
HEADS = {
    "arcface": {"scale": 16.0, "margin": 0.2},
    "cosface": {"scale": 16.0, "margin": 0.2},
    "combined": {"scale": 16.0, "m1": 1.2, "m2": 0.1, "m3": 0.1},
    "adaface": {"scale": 16.0, "margin": 0.2, "t_alpha": 1.0},  # statistics of each batch alone: they matter
    "curricularface": {"scale": 16.0, "margin": 0.2, "t_alpha": 0.5},
    "magface": {"scale": 16.0, "l_a": 0.5, "u_a": 5.0},
    "elasticface": {"scale": 16.0, "margin": 0.2, "plus": True},
    "subcenter_arcface": {"scale": 16.0, "margin": 0.2, "k": 3},  # 3 centers per class, sharded as whole classes
    "sphereface2": {"scale": 16.0, "loss_weight": 10.0},  # a loss of its own, summed over shards; a learned bias
    "uniface": {"scale": 16.0, "margin": 0.2},
}
HEADS_DRIVER = """
import json, os, sys
from pathlib import Path

import torch.distributed as dist

from facecore.core.config import validate_config
from facecore.train.trainer import train

spec, out = json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2])
world = int(os.environ.get("WORLD_SIZE", "1"))
if world > 1:
    dist.init_process_group("gloo")  # one group for every run below: the trainer joins it and leaves it alone
for name, options in spec["heads"].items():
    for shard in (False, True):
        cfg = json.loads(json.dumps(spec["config"]))
        cfg["head"] = {"type": name, **options, "shard": shard}
        cfg["data"]["batch_size"] = 16 // world
        cfg["checkpoint"]["save_dir"] = str(out / f"{name}-{shard}")
        train(validate_config(cfg), verbose=False)
for name, run in spec["runs"].items():  # other features, in the same launch
    cfg = json.loads(json.dumps(spec["config"]))
    cfg["head"], cfg["training"] = run["head"], {**cfg["training"], **run["training"]}
    cfg["data"]["batch_size"] = 16 // world
    cfg["checkpoint"]["save_dir"] = str(out / name)
    train(validate_config(cfg), verbose=False)
if world > 1:
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # as facecore's CLI leaves a torchrun worker: no interpreter teardown of torch.distributed
"""


# Distillation from a frozen probe teacher (embedding 24 against the student's 16: a projection), both
# losses (the relational one over the global batch), a ramp; sharded with a frozen epoch and the backbone's own LR.
DISTILL = {"loss": ["embedding", {"name": "relational", "weight": 2.0}], "weight": 0.5, "warmup_steps": 2,
           "backbone": {"type": "probe", "embedding_size": 24}}
RUNS = {
    "distill-replicated": {"head": {"type": "cosface", "scale": 16.0, "margin": 0.2},
                           "training": {"distill": DISTILL}},
    "distill-sharded": {"head": {"type": "cosface", "scale": 16.0, "margin": 0.2, "shard": True},
                        "training": {"distill": DISTILL, "freeze_backbone_epochs": 1, "backbone_lr_mult": 0.5}},
}


@pytest.fixture(scope="module")
def launches(setup, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every bundled head (centers replicated and sharded) and the RUNS, on 1 process and on 2: one launch each."""
    data, env = setup
    tmp = tmp_path_factory.mktemp("launches")
    g = torch.Generator().manual_seed(4)  # the teacher: a probe's tensors, saved as a bare state dict
    torch.save({"conv.weight": torch.randn(4, 3, 3, 3, generator=g) * 0.3, "conv.bias": torch.zeros(4),
                "fc.weight": torch.randn(24, 144, generator=g) * 0.1, "fc.bias": torch.zeros(24)}, tmp / "teacher.pth")
    runs = json.loads(json.dumps(RUNS))
    for run in runs.values():
        if "distill" in run["training"]:
            run["training"]["distill"]["teacher"] = str(tmp / "teacher.pth")
    config = {
        "seed": 3, "device": "cpu",
        "model": {"backbone": "probe", "embedding_size": 16},
        "data": {"root": str(data), "num_workers": 0, "augment": ["flip"]},
        "training": {"epochs": 2, "lr": 0.1, "warmup_epochs": 0.5},
        "checkpoint": {}, "logging": {"log_dir": str(tmp / "logs"), "tensorboard": False},
    }
    (tmp / "spec.json").write_text(json.dumps({"heads": HEADS, "runs": runs, "config": config}))
    (tmp / "driver.py").write_text(HEADS_DRIVER)
    launchers = {1: [sys.executable], 2: [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]}
    for world, launcher in launchers.items():
        out = subprocess.run([*launcher, str(tmp / "driver.py"), str(tmp / "spec.json"), str(tmp / str(world))],
                             env=env, capture_output=True, text=True, timeout=600)
        check_exit(out, out.stderr)
    return tmp


def one_and_two(launches: Path, name: str) -> tuple[dict, dict]:
    (one,) = (launches / "1" / name).rglob("last.pth")
    (two,) = (launches / "2" / name).rglob("last.pth")
    return load_checkpoint(one), load_checkpoint(two)


def test_every_head_trains_the_same_weights_on_two_processes_as_on_one(launches: Path) -> None:
    for name in HEADS:
        for shard in (False, True):
            one, two = one_and_two(launches, f"{name}-{shard}")
            assert one["step"] == two["step"] == 2 * STEPS_PER_EPOCH, name
            rows = 7 * HEADS[name].get("k", 1)
            assert one["classifier"]["weight"].shape == two["classifier"]["weight"].shape == (rows, 16), name
            try:
                assert_close(one, two)
            except AssertionError as exc:
                raise AssertionError(f"{name}, shard={shard}: {exc}") from None


def test_distillation_trains_the_same_weights_on_two_processes_as_on_one(launches: Path) -> None:
    """The relational loss compares every pair of the global batch (gathered from the ranks, in one process's
    order); the projection is data-parallel with the student; the teacher is frozen on every rank."""
    for name in RUNS:
        one, two = one_and_two(launches, name)
        assert one["step"] == two["step"] == 2 * STEPS_PER_EPOCH, name
        assert one["distill"]["fingerprint"] == two["distill"]["fingerprint"]
        try:
            assert_close(one, two)
            for key, value in one["distill"]["terms"].items():
                assert torch.allclose(value, two["distill"]["terms"][key], atol=1e-5, rtol=1e-4), key
        except AssertionError as exc:
            raise AssertionError(f"{name}: {exc}") from None
    metrics = (launches / "2" / "distill-sharded").rglob("metrics.jsonl")
    lines = [json.loads(x) for x in next(metrics).read_text().splitlines()]
    assert any("loss_distill_relational" in x for x in lines if x["event"] == "train")

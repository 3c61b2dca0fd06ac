"""Fault injection: stop signals, killed processes, killed DataLoader workers, bad records mid-run.

Every test here injects the fault the way the real world does (a signal to the process or its
whole process group, SIGKILL, a corrupt record) and checks what is left: the exit status, the
message, the checkpoint, and that a resumed run ends bit for bit where an uninterrupted one ends.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from helpers import copy_with_broken_image, fake_distribution, make_tiny_data, subprocess_env
from test_distributed import AUGMENT, PROBE, kill_tree
from test_trainer import assert_same_weights, raw_config, tiny_config

from facecore import TrainingError, TrainingStopped, hookimpl
from facecore.core.checkpoint import load_checkpoint
from facecore.train.trainer import train

pytestmark = pytest.mark.fault

FACECORE = [sys.executable, "-m", "facecore.cli"]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_data(tmp_path_factory.mktemp("fault-data"))


class CallbackHead:
    """A head plugin (CosFace-like) that calls ``on_call(n)`` at its n-th training call."""

    def __init__(self, name: str, on_call):
        self.name, self.on_call = name, on_call

    @hookimpl
    def register_heads(self, register):
        plugin = self

        class Head(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.seen = 0

            def forward(self, cosine, labels, norms):
                if self.training:
                    self.seen += 1
                    plugin.on_call(self.seen)
                return 16 * cosine

        register(self.name, Head, description="test head with a callback")


def configured(root: Path, out: Path, **sections: dict) -> dict:
    """``tiny_config`` where ``sections`` may include ``data``."""
    from facecore.core.config import validate_config

    cfg = raw_config(root, out)
    for key, values in sections.items():
        cfg[key].update(values)
    return validate_config(cfg)


def with_head(cfg: dict, name: str) -> dict:
    from facecore.core.config import validate_config

    return validate_config({**cfg, "head": {"type": name}})


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1], ids=lambda s: s.name)
def test_a_stop_signal_finishes_the_step_writes_last_pth_and_resume_is_exact(
        tiny_data: Path, tmp_path: Path, register_plugin, signum: int) -> None:
    at = [None]
    register_plugin(CallbackHead("signalling", lambda n: os.kill(os.getpid(), signum) if n == at[0] else None))
    straight = train(with_head(tiny_config(tiny_data, tmp_path / "straight"), "signalling"), verbose=False)

    before = signal.getsignal(signum)
    at[0] = 8  # during step 8 of 12 (epoch 2, batch 2)
    cfg = with_head(tiny_config(tiny_data, tmp_path / "stopped"), "signalling")
    with pytest.raises(TrainingStopped) as stopped:
        train(cfg, verbose=False)
    message = str(stopped.value)
    assert f"{signal.Signals(signum).name} received" in message and "--resume" in message
    assert "after step 8 (epoch 2, batch 2 of 6)" in message  # the step under way finished, nothing after it
    assert signal.getsignal(signum) == before  # the handlers are given back
    (last,) = (tmp_path / "stopped" / "runs").rglob("last.pth")
    left = load_checkpoint(last)
    assert (left["epoch"], left["batch_in_epoch"], left["step"]) == (1, 2, 8)

    at[0] = None
    resumed = train(cfg, resume=True, verbose=False)
    assert resumed["step"] == straight["step"] == 12
    assert_same_weights(load_checkpoint(last)["backbone"], load_checkpoint(Path(straight["run_dir"]) / "last.pth")["backbone"])


def test_sigterm_to_the_whole_process_group_spares_the_data_workers_until_the_step_is_done(
        tiny_data: Path, tmp_path: Path) -> None:
    """As SLURM or a terminal does: the signal reaches the DataLoader workers too; they ignore it and
    serve the step, the CLI exits 75 with one line saying how to resume, no traceback."""
    cfg = configured(tiny_data, tmp_path, data={"num_workers": 2}, training={"epochs": 40},
                      checkpoint={"save_dir": str(tmp_path / "runs"), "save_every_steps": 1})
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.Popen([*FACECORE, "train", "--config", str(path), "--quiet"], env=subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not list((tmp_path / "runs").rglob("last.pth")):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-2000:]
    assert "Stopped: SIGTERM received" in err and "--resume" in err and "Traceback" not in err
    assert "DataLoader worker" not in err
    (last,) = (tmp_path / "runs").rglob("last.pth")
    assert 0 < load_checkpoint(last)["step"] < 40 * 6


def kill_my_workers(n: int) -> None:
    if n == 3:  # as the OOM killer would
        for child in Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").read_text().split():
            os.kill(int(child), signal.SIGKILL)


def test_a_data_worker_killed_by_the_os_stops_the_run_naming_the_cause_and_the_checkpoint(
        tiny_data: Path, tmp_path: Path, register_plugin) -> None:
    register_plugin(CallbackHead("worker-killer", kill_my_workers))
    cfg = configured(tiny_data, tmp_path, data={"num_workers": 1}, training={"epochs": 3},
                      checkpoint={"save_dir": str(tmp_path / "runs"), "save_every_steps": 1})
    started = time.time()
    with pytest.raises(TrainingError) as failed:
        train(with_head(cfg, "worker-killer"), verbose=False)
    assert time.time() - started < 60  # stopped, not hung
    message = str(failed.value)
    assert "DataLoader worker" in message and "memory" in message and "data.num_workers" in message
    assert "last.pth" in message and "--resume" in message


def test_corrupt_records_are_counted_in_metrics_and_stop_names_the_file_and_key(tiny_data: Path, tmp_path: Path) -> None:
    from facecore import DataError

    data = copy_with_broken_image(tiny_data, tmp_path / "data", key=1)
    skip = configured(data, tmp_path / "skip", data={"on_bad_image": "skip", "num_workers": 1})
    summary = train(skip, verbose=False)
    lines = [json.loads(x) for x in (Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    counts = [(x["skipped_images"], x["skipped_images_total"]) for x in lines if x["event"] == "data"]
    assert counts == [(1, 1), (1, 2)] and summary["skipped_images"] == 2  # once per epoch, in metrics.jsonl

    stop = configured(data, tmp_path / "stop", data={"on_bad_image": "stop", "num_workers": 1})
    with pytest.raises(DataError) as failed:  # raised in a DataLoader worker, told without its traceback
        train(stop, verbose=False)
    message = str(failed.value)
    assert "train.rec: record key 1 at byte offset" in message and "Traceback" not in message
    children = Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").read_text().split()
    assert children == []  # the data worker is shut down although the error's traceback still holds its loader


# -- 2 processes: SIGKILL and SIGTERM at random steps, resumed, end bit for bit as an uninterrupted run ---


def test_two_processes_killed_and_preempted_at_random_steps_resume_bit_exactly(tmp_path: Path) -> None:
    data = make_tiny_data(tmp_path / "data", identities=31, per_identity=2)  # 62 images: 3 steps of 16, uneven shards
    fake_distribution(tmp_path, "fc-probe", "fc_probe_plugin", PROBE)
    env = subprocess_env(PYTHONPATH=str(tmp_path), FC_PROBE_SLEEP="0.15")
    epochs, steps = 4, 4 * 3

    def config(name: str) -> Path:
        cfg = {
            "seed": 5, "device": "cpu",
            "model": {"backbone": "probe", "embedding_size": 16},
            "head": {"type": "cosface", "scale": 16.0, "margin": 0.2, "shard": True, "sample_rate": 0.7},
            "data": {"root": str(data), "batch_size": 8, "num_workers": 0, "augment": AUGMENT},
            "training": {"epochs": epochs, "lr": 0.1, "warmup_epochs": 0.5, "preempt_every": 1},
            "checkpoint": {"save_dir": str(tmp_path / name / "runs"), "save_every_steps": 1},
            "logging": {"log_dir": str(tmp_path / name / "logs"), "tensorboard": False},
            "eval": {"bin_file": "val.bin"},
        }
        (tmp_path / name).mkdir()
        (tmp_path / name / "c.yaml").write_text(yaml.safe_dump(cfg))
        return tmp_path / name / "c.yaml"

    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "facecore.cli",
              "train", "--quiet", "--config"]
    out = subprocess.run([*launch, str(config("straight"))], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "terminate called" not in out.stderr, out.stderr[-3000:]
    (reference,) = (tmp_path / "straight" / "runs").rglob("last.pth")

    cfg = config("faulty")
    rng = random.Random(20)
    faults = [signal.SIGKILL, signal.SIGTERM, signal.SIGKILL, signal.SIGTERM]
    done_at: list[int] = []
    for n, fault in enumerate(faults):
        proc = subprocess.Popen([*launch, str(cfg), *(["--resume"] if n else [])], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        start = done_at[-1] if done_at else 0
        target = rng.randint(start + 1, min(start + 3, steps - len(faults) + n))
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            step = newest_step(tmp_path / "faulty" / "runs")
            if step is not None and step >= target:
                # SIGKILL: a node gone. SIGTERM: as SLURM sends it, to every process of the job at once (torchrun
                # also forwards it to its workers, but a signal that lands inside its own bookkeeping can be lost)
                kill_tree(proc.pid, fault)
                break
            time.sleep(0.01)
        err = proc.communicate(timeout=120)[1]
        assert "terminate called" not in err, err[-3000:]
        if fault == signal.SIGTERM:
            assert "SIGTERM received" in err and "--resume" in err, err[-3000:]
        left = newest_step(tmp_path / "faulty" / "runs")
        assert left is not None and left < steps, f"fault {n} ({fault.name}) came too late: step {left}"
        done_at.append(left)
    out = subprocess.run([*launch, str(cfg), "--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "terminate called" not in out.stderr, out.stderr[-3000:]
    (last,) = (tmp_path / "faulty" / "runs").rglob("last.pth")
    resumed, straight = load_checkpoint(last), load_checkpoint(reference)
    assert resumed["step"] == straight["step"] == steps and done_at == sorted(done_at)
    for part in ("backbone", "classifier"):
        for key in straight[part]:
            assert torch.equal(resumed[part][key], straight[part][key]), (part, key, done_at)


def newest_step(runs: Path) -> int | None:
    for found in runs.rglob("last.pth"):
        try:
            return int(torch.load(found, weights_only=True)["step"])
        except Exception:  # being replaced right now
            return None
    return None

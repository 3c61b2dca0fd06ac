"""The training loop: reproducibility, files written, checks before the first step, NaN stop, resume
(with every bundled augmentation on), the default augmentation list."""

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
from helpers import copy_with_broken_image, former_flip, make_tiny_data, subprocess_env

from facecore import CheckpointError, DataError, TrainingError, hookimpl
from facecore.core.checkpoint import load_checkpoint, save_checkpoint
from facecore.core.config import validate_config
from facecore.train.trainer import train

FACECORE = [sys.executable, "-m", "facecore.cli"]


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6 identities x 8 images packed as RecordIO, and a 40-pair .bin of 5 other identities."""
    return make_tiny_data(tmp_path_factory.mktemp("trainer-data"))


def tiny_config(data: Path, out: Path, **sections: dict) -> dict:
    """A validated config for a seconds-long CPU run; ``sections`` update the defaults here."""
    return validate_config(raw_config(data, out, **sections))


def raw_config(data: Path, out: Path, **sections: dict) -> dict:
    config = {
        "seed": 7,
        "device": "cpu",
        "model": {"backbone": "fastcontextface", "embedding_size": 32, "depths": [1, 1, 1, 1], "dims": [8, 16, 16, 32]},
        "head": {"type": "arcface", "scale": 16.0, "margin": 0.2},
        "data": {"root": str(data), "batch_size": 8, "num_workers": 0},
        "training": {"epochs": 2, "lr": 0.05, "scheduler": "cosine", "warmup_epochs": 0.5, "log_every": 2},
        "checkpoint": {"save_dir": str(out / "runs")},
        "logging": {"log_dir": str(out / "logs"), "tensorboard": False},
        "eval": {"bin_file": "val.bin", "metrics": ["verification"]},
    }
    for key, values in sections.items():
        config[key].update(values)
    return config


def final_weights(run_dir: str | Path, name: str = "last.pth") -> dict:
    return load_checkpoint(Path(run_dir) / name)["backbone"]


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_same_seed_gives_identical_weights_and_another_seed_does_not(tiny_data: Path, tmp_path: Path) -> None:
    first = train(tiny_config(tiny_data, tmp_path / "a"), verbose=False)
    second = train(tiny_config(tiny_data, tmp_path / "b"), verbose=False)
    cfg = tiny_config(tiny_data, tmp_path / "c")
    cfg["seed"] = 8
    other = train(cfg, verbose=False)
    assert_same_weights(final_weights(first["run_dir"]), final_weights(second["run_dir"]))
    a, c = final_weights(first["run_dir"]), final_weights(other["run_dir"])
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())


def test_best_pth_follows_best_metric_and_a_run_without_pair_sets_says_it_writes_none(tiny_data: Path, tmp_path: Path) -> None:
    cfg = tiny_config(tiny_data, tmp_path / "min", eval={"bin_file": "val.bin", "metrics": ["verification", "eer"]},
                      checkpoint={"save_dir": str(tmp_path / "min" / "runs"), "best_metric": {"key": "eer", "mode": "min"}})
    summary = train(cfg, verbose=False)
    lines = [json.loads(x) for x in (Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    eers = [x["eer"] for x in lines if x["event"] == "validation"]
    best = load_checkpoint(Path(summary["run_dir"]) / "best.pth")
    assert best["best_metric"] == {"key": "eer", "mode": "min", "value": min(eers)}
    assert best["step"] == 6 * (1 + eers.index(min(eers)))  # the epoch whose eer was lowest

    cfg = tiny_config(tiny_data, tmp_path / "none", eval={"bin_file": None})
    summary = train(cfg, verbose=False)
    log = (Path(summary["run_dir"]) / "train.log").read_text()
    assert log.count("writes no best.pth") == 1 and not (Path(summary["run_dir"]) / "best.pth").exists()
    assert (Path(summary["run_dir"]) / "last.pth").exists() and summary["best_metric"]["value"] is None


def test_run_directory_holds_config_checkpoints_metrics_and_log(tiny_data: Path, tmp_path: Path) -> None:
    cfg = tiny_config(tiny_data, tmp_path, logging={"log_dir": str(tmp_path / "logs"), "tensorboard": True})
    summary = train(cfg, verbose=False)
    run = Path(summary["run_dir"])
    assert run.parent == tmp_path / "runs" / "fastcontextface"
    assert {"config.yaml", "last.pth", "best.pth", "metrics.jsonl", "train.log"} <= {p.name for p in run.iterdir()}
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["head"]["num_classes"] == 6  # taken from the dataset when not given
    ckpt = load_checkpoint(run / "last.pth")
    steps_per_epoch = 48 // 8
    assert ckpt["step"] == 2 * steps_per_epoch and ckpt["epoch"] == 2 and ckpt["batch_in_epoch"] == 0
    assert ckpt["config"]["model"]["backbone"] == "fastcontextface" and ckpt["facecore_version"]
    assert {"optimizer", "scheduler", "scaler", "rng", "classifier", "val_metrics"} <= ckpt.keys()
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    val = [line for line in lines if line["event"] == "validation"]
    assert [v["epoch"] for v in val] == [1, 2] and all(0 <= v["accuracy"] <= 1 for v in val)
    assert any(line["event"] == "train" and line["loss"] > 0 for line in lines)
    best = load_checkpoint(run / "best.pth")
    assert best["best_metric"] == {"key": "accuracy", "mode": "max", "value": max(v["accuracy"] for v in val)}
    assert list((tmp_path / "logs").glob("train_fastcontextface_*.log"))
    assert list((tmp_path / "logs" / "tensorboard").rglob("events.out.tfevents.*"))


def test_num_classes_mismatch_stops_before_training_with_both_numbers(tiny_data: Path, tmp_path: Path) -> None:
    cfg = tiny_config(tiny_data, tmp_path, head={"num_classes": 10})
    with pytest.raises(DataError, match=r"head.num_classes is 10 .* has 6 identities"):
        train(cfg, verbose=False)
    assert not list((tmp_path / "runs").rglob("*.pth"))


class NaNAfter:
    """A head that behaves like CosFace until its n-th call, then returns NaN logits."""

    def __init__(self, calls: int):
        self.calls = calls

    @hookimpl
    def register_heads(self, register):
        outer = self

        class Head(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.seen = 0

            def forward(self, cosine, labels, norms):
                self.seen += 1
                logits = 16 * cosine
                return logits * float("nan") if self.seen > outer.calls else logits

        register("nan-after", Head, description="test head")


@pytest.mark.parametrize("log_every, save_every, window", [(4, 2, "between step 9 and 10"), (3, None, "between step 7 and 9")],
                         ids=["read-before-a-checkpoint", "read-at-a-log-line"])
def test_nan_loss_stops_naming_the_step_window_and_keeps_last_checkpoint(tiny_data, tmp_path, register_plugin,
                                                                         log_every, save_every, window) -> None:
    register_plugin(NaNAfter(calls=8), name="nan-after-plugin")  # the loss is NaN from step 9 (epoch 2) on
    cfg = raw_config(tiny_data, tmp_path, checkpoint={"save_dir": str(tmp_path / "runs"), "save_every_steps": save_every})
    cfg["training"]["log_every"] = log_every
    cfg = validate_config({**cfg, "head": {"type": "nan-after"}})
    with pytest.raises(TrainingError, match=rf"the loss became nan {window} \(epoch 2\); stopped without saving"):
        train(cfg, verbose=False)
    (last,) = (tmp_path / "runs").rglob("last.pth")
    saved = load_checkpoint(last)
    assert saved["step"] == (8 if save_every else 6)  # the last save before step 9, never one with NaN weights
    ref = validate_config({**cfg, "training": {**cfg["training"], "max_steps": saved["step"]},
                           "checkpoint": {**cfg["checkpoint"], "save_dir": str(tmp_path / "ref")}})
    train(ref, verbose=False)  # the same head never reaches a NaN in fewer steps
    (good,) = (tmp_path / "ref").rglob("last.pth")
    assert_same_weights(saved["backbone"], load_checkpoint(good)["backbone"])


def test_checkpoint_save_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "last.pth"
    save_checkpoint({"step": 1, "w": torch.ones(3)}, path)

    def broken_save(obj, fh, *args, **kwargs):
        fh.write(b"partial garbage")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(CheckpointError, match="OSError: disk full"):
        save_checkpoint({"step": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pth"]  # no temporary file left behind


def test_cuda_on_a_machine_without_it_is_a_clear_cli_error(tiny_data: Path, tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(yaml.safe_dump(tiny_config(tiny_data, tmp_path)))
    out = subprocess.run([*FACECORE, "train", "--config", str(cfg_file), "--device", "cuda"], capture_output=True, text=True)
    assert out.returncode != 0
    assert "no usable CUDA device" in out.stderr and "Traceback" not in out.stderr


def test_resume_flag_without_runs_is_a_clear_error(tiny_data: Path, tmp_path: Path) -> None:
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(yaml.safe_dump(tiny_config(tiny_data, tmp_path)))
    out = subprocess.run([*FACECORE, "train", "--config", str(cfg_file), "--resume"], capture_output=True, text=True)
    assert out.returncode != 0 and "found no run to continue" in out.stderr and "Traceback" not in out.stderr


# Every bundled augmentation, so the kill/resume test also covers their random numbers.
ALL_AUGMENTATIONS = ["flip", {"name": "random_crop", "p": 0.3}, {"name": "random_crop", "p": 0.3, "mode": "pad"},
                     {"name": "low_resolution", "p": 0.3}, {"name": "photometric", "p": 0.3},
                     {"name": "grayscale", "p": 0.2}, {"name": "blur", "p": 0.3}]


def augmented(data: Path, out: Path, augment: list, **sections: dict) -> dict:
    """``tiny_config`` with ``data.augment`` set."""
    config = raw_config(data, out, **sections)
    config["data"]["augment"] = augment
    return validate_config(config)


def test_the_default_augmentation_trains_the_weights_of_the_former_builtin_flip(
        tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import facecore.train.trainer as trainer_module

    default = train(tiny_config(tiny_data, tmp_path / "default", training={"epochs": 1}), verbose=False)
    none = train(augmented(tiny_data, tmp_path / "none", [], training={"epochs": 1}), verbose=False)
    monkeypatch.setattr(trainer_module.Augmenter, "from_config", classmethod(lambda cls, config: former_flip))
    former = train(tiny_config(tiny_data, tmp_path / "former", training={"epochs": 1}), verbose=False)
    assert_same_weights(final_weights(default["run_dir"]), final_weights(former["run_dir"]))
    a, b = final_weights(default["run_dir"]), final_weights(none["run_dir"])
    assert any(not torch.equal(a[k], b[k]) for k in a if a[k].is_floating_point())  # the flips do matter


@pytest.mark.slow
def test_killed_run_resumed_ends_with_the_weights_of_an_uninterrupted_run(tiny_data: Path, tmp_path: Path) -> None:
    def config_file(name: str) -> Path:
        cfg = augmented(tiny_data, tmp_path / name, ALL_AUGMENTATIONS, training={"epochs": 3},
                        checkpoint={"save_dir": str(tmp_path / name / "runs"), "save_every_steps": 1})
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return path

    env = subprocess_env()  # both runs in the same kind of process: same threads, same float rounding
    out = subprocess.run([*FACECORE, "train", "--config", str(config_file("ref")), "--quiet"], env=env,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    (reference,) = (tmp_path / "ref" / "runs").rglob("last.pth")

    cfg_file = config_file("killed")
    proc = subprocess.Popen([*FACECORE, "train", "--config", str(cfg_file), "--quiet"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    killed_at = None
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        found = list((tmp_path / "killed" / "runs").rglob("last.pth"))
        if found:
            try:
                ckpt = torch.load(found[0], weights_only=True)
            except Exception:  # being replaced right now: try again
                ckpt = None
            if ckpt and ckpt["epoch"] == 1 and 2 <= ckpt["batch_in_epoch"] < 6:  # mid-way through epoch 2
                os.kill(proc.pid, signal.SIGKILL)
                killed_at = (ckpt["epoch"], ckpt["batch_in_epoch"])
                break
        time.sleep(0.01)
    proc.wait()
    assert killed_at is not None, f"the run ended before it could be killed: {proc.stderr.read().decode()[-500:]}"
    assert proc.returncode == -signal.SIGKILL

    out = subprocess.run([*FACECORE, "train", "--config", str(cfg_file), "--resume", "--quiet"], env=env,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    (last,) = (tmp_path / "killed" / "runs").rglob("last.pth")
    resumed, uninterrupted = load_checkpoint(last), load_checkpoint(reference)
    assert resumed["epoch"] == 3 and resumed["step"] == uninterrupted["step"] == 18
    assert_same_weights(resumed["backbone"], uninterrupted["backbone"])
    assert_same_weights(resumed["classifier"], uninterrupted["classifier"])


def test_gradient_accumulation_steps_the_optimizer_every_n_batches(tiny_data: Path, tmp_path: Path) -> None:
    plain = train(tiny_config(tiny_data, tmp_path / "a", training={"epochs": 1}), verbose=False)
    accumulated = train(tiny_config(tiny_data, tmp_path / "b", training={"epochs": 1, "accumulate_steps": 2}),
                        verbose=False)
    assert plain["step"] == 6 and accumulated["step"] == 3  # 6 batches of 8 in an epoch
    ckpt = load_checkpoint(Path(accumulated["run_dir"]) / "last.pth")
    assert ckpt["scheduler"]["last_epoch"] == 3 and ckpt["batch_in_epoch"] == 0 and ckpt["epoch"] == 1
    a, b = final_weights(plain["run_dir"]), final_weights(accumulated["run_dir"])
    assert any(not torch.equal(a[k], b[k]) for k in a if a[k].is_floating_point())


class _Trap:
    """Unpickling this would create a file: a checkpoint load must refuse it without running it."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (Path.touch, (self.target,))


def test_checkpoint_with_pickled_code_is_refused_and_never_run(tmp_path: Path) -> None:
    target = tmp_path / "pwned"
    torch.save({"backbone": {"w": torch.ones(1)}, "trap": _Trap(target)}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match=r"evil.pth holds pickled Python objects .*will not run pickled code"):
        load_checkpoint(tmp_path / "evil.pth")
    assert not target.exists()
    (tmp_path / "notes.pth").write_text("seed: 1\n")
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        load_checkpoint(tmp_path / "notes.pth")


def test_undecodable_images_stop_the_run_or_are_skipped_and_counted(tiny_data: Path, tmp_path: Path) -> None:
    data = copy_with_broken_image(tiny_data, tmp_path / "data", key=1)
    with pytest.raises(DataError, match=r"train.rec: record key 1 at byte offset"):
        train(tiny_config(data, tmp_path / "stop", training={"epochs": 1}), verbose=False)
    cfg = raw_config(data, tmp_path / "skip", training={"epochs": 2})
    cfg["data"]["on_bad_image"] = "skip"
    summary = train(validate_config(cfg), verbose=False)
    assert summary["skipped_images"] == 2 and summary["step"] == 12  # once per epoch
    log = (Path(summary["run_dir"]) / "train.log").read_text()
    assert "epoch 1: 1 undecodable image(s) were skipped" in log and "epoch 2: 1 undecodable" in log

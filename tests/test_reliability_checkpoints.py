"""Checkpoints and start-up under faults: a write failing at any stage of a save keeps the previous
checkpoint and stops with one message (on every rank), checkpoint.keep, a damaged last.pth at --resume,
folders that cannot be written and a missing data.root reported before the first step."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest
import torch
import yaml
from helpers import make_tiny_data, subprocess_env

import facecore.core.checkpoint as checkpoint_module
from facecore import CheckpointError, FacecoreError
from facecore.core.checkpoint import load_checkpoint, save_checkpoint, save_numbered
from facecore.core.config import validate_config
from facecore.train.runs import check_writable, newest_checkpoint
from facecore.train.trainer import train

pytestmark = pytest.mark.fault

FACECORE = [sys.executable, "-m", "facecore.cli"]
MiB = 1 << 20


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_data(tmp_path_factory.mktemp("reliability-data"), pairs=10)


def config(data: Path, out: Path, **sections: dict) -> dict:
    """A seconds-long CPU run of 6 steps per epoch, without validation (so only last.pth is written)."""
    raw = {
        "seed": 3, "device": "cpu",
        "model": {"backbone": "fastcontextface", "embedding_size": 16, "depths": [1, 1, 1, 1], "dims": [8, 8, 16, 16]},
        "head": {"type": "arcface", "scale": 16.0, "margin": 0.2},
        "data": {"root": str(data), "batch_size": 8, "num_workers": 0},
        "training": {"epochs": 2, "lr": 0.05, "log_every": 1},
        "checkpoint": {"save_dir": str(out / "runs")},
        "logging": {"log_dir": str(out / "logs"), "tensorboard": False},
        "eval": {"bin_file": None},
    }
    for key, values in sections.items():
        raw[key].update(values)
    return validate_config(raw)


def write_config(cfg: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


# ----------------------------------------------------------------------------------- a failing save
def state(step: int) -> dict:
    """A checkpoint-like dict whose tensor data is exactly 1 MiB."""
    return {"step": step, "optimizer": {}, "backbone": {"w": torch.full((MiB // 4,), float(step))}}


class FullAfter:
    """A file whose writes fail with ENOSPC once ``budget`` bytes went through (a disk filling up)."""

    def __init__(self, fh, budget: int):
        self.fh, self.budget = fh, budget

    def write(self, data) -> int:
        if self.budget < len(data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.budget -= len(data)
        return self.fh.write(data)

    def __getattr__(self, name):
        return getattr(self.fh, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.fh.close()


def fail_on_call(real: Callable, calls: set[int], error: Callable[[], BaseException]) -> Callable:
    """``real`` except on the given 1-based calls, which raise ``error()``."""
    count = [0]

    def patched(*args, **kwargs):
        count[0] += 1
        if count[0] in calls:
            raise error()
        return real(*args, **kwargs)

    return patched


def os_error(code: int) -> Callable[[], OSError]:
    return lambda: OSError(code, os.strerror(code))


def full_disk_on_open(n: int) -> Callable:
    """os.fdopen whose n-th file fills the disk after 64 KiB (the zip writer has started on the tensors)."""
    real, count = os.fdopen, [0]

    def fdopen(*args, **kwargs):
        count[0] += 1
        fh = real(*args, **kwargs)
        return FullAfter(fh, 64 * 1024) if count[0] == n else fh

    return fdopen


# stage -> (what to patch on the os / tempfile modules, the error named). For keep > 1 the first
# write is the numbered file; "link" makes the hard link fail and then the copy that replaces it.
STAGES = {
    "open-temp-file": lambda mp, n: mp.setattr(checkpoint_module.tempfile, "mkstemp",
                                                fail_on_call(checkpoint_module.tempfile.mkstemp, {n}, os_error(errno.ENOSPC))),
    "torch-save-midway": lambda mp, n: mp.setattr(os, "fdopen", full_disk_on_open(n)),
    "fsync": lambda mp, n: mp.setattr(os, "fsync", fail_on_call(os.fsync, {n}, os_error(errno.EIO))),
    "rename": lambda mp, n: mp.setattr(os, "replace", fail_on_call(os.replace, {n}, os_error(errno.EIO))),
}
ERRORS = {"open-temp-file": "ENOSPC", "torch-save-midway": "ENOSPC", "fsync": "EIO", "rename": "EIO"}


def previous_run(folder: Path, keep: int) -> dict[str, bytes]:
    """Three saves (steps 1-3) as the trainer makes them; returns every file's bytes."""
    for step in (1, 2, 3):
        if keep > 1:
            save_numbered(state(step), folder / "last.pth", step, keep)
        else:
            save_checkpoint(state(step), folder / "last.pth")
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def assert_untouched(folder: Path, before: dict[str, bytes]) -> None:
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # no temporary file, nothing pruned
    last = load_checkpoint(folder / "last.pth")
    assert last["step"] == 3 and torch.equal(last["backbone"]["w"], state(3)["backbone"]["w"])


@pytest.mark.parametrize("keep", [1, 3], ids=["keep-1", "keep-3"])
@pytest.mark.parametrize("stage", list(STAGES))
def test_a_write_failing_at_any_stage_keeps_the_previous_checkpoint_and_names_path_and_space(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stage: str, keep: int) -> None:
    before = previous_run(tmp_path, keep)
    assert len(before) == (1 if keep == 1 else 4)
    STAGES[stage](monkeypatch, 1)
    with pytest.raises(CheckpointError) as caught:
        if keep > 1:
            save_numbered(state(4), tmp_path / "last.pth", 4, keep)
        else:
            save_checkpoint(state(4), tmp_path / "last.pth")
    monkeypatch.undo()
    message = str(caught.value)
    target = tmp_path / ("ckpt-step00000004.pth" if keep > 1 else "last.pth")
    assert f"could not write checkpoint {target}: {ERRORS[stage]}" in message
    assert "needs about 1.0 MiB" in message and " free on its filesystem" in message
    assert "the previous last.pth is unchanged" in message
    assert_untouched(tmp_path, before)


@pytest.mark.parametrize("stage", ["hard-link-and-copy-write", "hard-link-rename-and-copy-rename"])
def test_keep_above_1_a_failing_link_step_keeps_the_previous_last_pth(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                      stage: str) -> None:
    before = previous_run(tmp_path, keep=3)
    if stage == "hard-link-and-copy-write":
        monkeypatch.setattr(os, "link", fail_on_call(os.link, {1}, os_error(errno.EMLINK)))
        monkeypatch.setattr(os, "fdopen", full_disk_on_open(2))  # 1: the numbered file, 2: the copy
        error = "EMLINK"
    else:
        monkeypatch.setattr(os, "replace", fail_on_call(os.replace, {2, 3}, os_error(errno.EIO)))  # 1: numbered
        error = "EIO"
    with pytest.raises(CheckpointError) as caught:
        save_numbered(state(4), tmp_path / "last.pth", 4, keep=3)
    monkeypatch.undo()
    message = str(caught.value)
    assert f"could not write checkpoint {tmp_path / 'last.pth'}: a hard link to ckpt-step00000004.pth failed ({error}" in message
    assert "needs about 1.0 MiB" in message and "the previous last.pth is unchanged" in message
    assert_untouched(tmp_path, before)  # the new numbered file is gone again, the old ones all stay


def test_where_hard_links_fail_last_pth_is_a_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "link", fail_on_call(os.link, {1, 2}, os_error(errno.EPERM)))
    save_numbered(state(1), tmp_path / "last.pth", 1, keep=2)
    save_numbered(state(2), tmp_path / "last.pth", 2, keep=2)
    numbered = tmp_path / "ckpt-step00000002.pth"
    assert not os.path.samefile(tmp_path / "last.pth", numbered)
    assert (tmp_path / "last.pth").read_bytes() == numbered.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-step00000001.pth", "ckpt-step00000002.pth", "last.pth"]


# ---------------------------------------------------------------------- every rank, through the CLI
RANKS = """
import errno, logging, os, sys
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from facecore.core.runtime import DistInfo
from facecore.errors import CheckpointError
from facecore.train.checkpointing import TrainingCheckpoint, TrainState
from facecore.train.classifier import MarginClassifier


class Scaled(nn.Module):
    def forward(self, cosine, labels, norms):
        return 8.0 * cosine


def full_disk(fd):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def rank_main(rank, out):
    dist.init_process_group("gloo", init_method=f"file://{out}/rendezvous", rank=rank, world_size=2)
    backbone, classifier = nn.Linear(4, 4), MarginClassifier(4, 5, Scaled())
    optimizer = torch.optim.SGD([*backbone.parameters(), *classifier.parameters()], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    config = {"checkpoint": {"keep": 1, "best_metric": {"key": "accuracy", "mode": "max"}}}
    ckpt = TrainingCheckpoint(config, backbone, classifier, optimizer, scheduler, torch.amp.GradScaler("cpu", enabled=False),
                              DistInfo(rank, 2, rank), False, logging.getLogger("t"))
    ckpt.save(TrainState(step=1), out / "last.pth")
    if rank == 0:  # the disk fills up on the process that writes
        os.fsync = full_disk
    try:
        ckpt.save(TrainState(step=2), out / "last.pth")
        (out / f"rank{rank}.txt").write_text("saved")
    except CheckpointError as exc:
        (out / f"rank{rank}.txt").write_text(str(exc))
    dist.destroy_process_group()


if __name__ == "__main__":
    from pathlib import Path
    mp.spawn(rank_main, args=(Path(sys.argv[1]),), nprocs=2)
"""


def test_a_failed_write_on_rank_0_raises_the_same_error_on_every_rank(tmp_path: Path) -> None:
    script = tmp_path / "ranks.py"
    script.write_text(RANKS)
    out = subprocess.run([sys.executable, str(script), str(tmp_path)], env=subprocess_env(), capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    messages = [(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)]
    assert messages[0] == messages[1]  # rank 1 wrote nothing, yet it stops with rank 0's error
    assert f"could not write checkpoint {tmp_path / 'last.pth'}: ENOSPC" in messages[0]
    assert load_checkpoint(tmp_path / "last.pth")["step"] == 1
    assert not list(tmp_path.glob(".last.pth.*"))


FAIL_SECOND_SAVE = """
import errno, os, stat, sys

real_fsync, saves = os.fsync, [0]


def fsync(fd):  # the disk is full when the second checkpoint is flushed
    if stat.S_ISREG(os.fstat(fd).st_mode):
        saves[0] += 1
        if saves[0] == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return real_fsync(fd)


os.fsync = fsync
from facecore.cli import main

main(sys.argv[1:], prog_name="facecore")
"""


def test_a_run_whose_second_save_fails_stops_with_one_message_and_keeps_the_first(tiny_data: Path, tmp_path: Path) -> None:
    cfg_file = write_config(config(tiny_data, tmp_path), tmp_path / "c.yaml")
    driver = tmp_path / "full_disk.py"
    driver.write_text(FAIL_SECOND_SAVE)
    out = subprocess.run([sys.executable, str(driver), "train", "--config", str(cfg_file), "--quiet"],
                         env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 1, out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    (run,) = (tmp_path / "runs" / "fastcontextface").iterdir()
    errors = [line for line in out.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, out.stderr[-2000:]
    assert errors[0].startswith(f"Error: could not write checkpoint {run / 'last.pth'}: ENOSPC: No space left on device; ")
    assert "the checkpoint needs about" in errors[0] and "the previous last.pth is unchanged" in errors[0]
    saved = load_checkpoint(run / "last.pth")
    assert (saved["epoch"], saved["step"]) == (1, 6)  # the first save: after epoch 1
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml", "last.pth", "metrics.jsonl", "train.log"]


# ------------------------------------------------------------------------------------ checkpoint.keep
@pytest.fixture(scope="module")
def kept_run(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """keep: 3 with a save every 2 steps over 12 steps: saves at steps 2, 4, 6, 8, 10, 12."""
    out = tmp_path_factory.mktemp("kept")
    summary = train(config(tiny_data, out, checkpoint={"save_dir": str(out / "runs"), "keep": 3, "save_every_steps": 2}),
                    verbose=False)
    return Path(summary["run_dir"])


def test_keep_3_over_6_saves_leaves_the_3_newest_and_last_pth_is_the_newest(kept_run: Path) -> None:
    names = sorted(p.name for p in kept_run.glob("*.pth"))
    assert names == ["ckpt-step00000008.pth", "ckpt-step00000010.pth", "ckpt-step00000012.pth", "last.pth"]
    assert os.path.samefile(kept_run / "last.pth", kept_run / "ckpt-step00000012.pth")  # written once
    steps = [load_checkpoint(kept_run / name)["step"] for name in names]
    assert steps == [8, 10, 12, 12]


def test_keep_1_writes_last_pth_only(tiny_data: Path, tmp_path: Path) -> None:
    summary = train(config(tiny_data, tmp_path, training={"epochs": 1}), verbose=False)
    assert sorted(p.name for p in Path(summary["run_dir"]).glob("*.pth")) == ["last.pth"]


# ------------------------------------------------------------------------------- a damaged last.pth
def copy_run(run: Path, out: Path) -> Path:
    """The run under ``out/runs`` (modification times kept), with last.pth a hard link to the newest numbered file again."""
    copy = out / "runs" / run.parent.name / run.name
    shutil.copytree(run, copy)
    (copy / "last.pth").unlink()
    os.link(copy / "ckpt-step00000012.pth", copy / "last.pth")
    return copy


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # in place: the numbered file it is linked to breaks too


def garbage(path: Path) -> None:
    path.write_bytes(os.urandom(2000))


@pytest.mark.parametrize("damage", [truncate, garbage], ids=["truncated", "garbage"])
def test_resume_from_a_damaged_last_pth_takes_the_newest_intact_checkpoint_and_says_so(
        tiny_data: Path, kept_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture, damage) -> None:
    run = copy_run(kept_run, tmp_path)
    damage(run / "last.pth")
    cfg = config(tiny_data, tmp_path, checkpoint={"save_dir": str(tmp_path / "runs"), "keep": 3, "save_every_steps": 2})
    summary = train(cfg, resume=True, verbose=True)
    err = capsys.readouterr().err
    assert f"WARNING --resume skips {run / 'last.pth'}" in err
    assert f"WARNING --resume skips {run / 'ckpt-step00000012.pth'}: the same file as last.pth" in err
    assert f"resumed from {run / 'ckpt-step00000010.pth'} at epoch 1, batch 4, step 10" in err
    assert f"--resume skips {run / 'last.pth'}" in (run / "train.log").read_text()  # kept in the run's own log too
    assert summary["run_dir"] == str(run) and summary["step"] == 12  # steps 11 and 12 trained again
    assert load_checkpoint(run / "last.pth")["step"] == 12


def test_resume_falls_back_to_best_pth_and_lists_everything_when_nothing_is_intact(tmp_path: Path) -> None:
    run = tmp_path / "fastcontextface" / "20250101-000000"
    save_numbered(state(1), run / "last.pth", 1, keep=2)
    save_checkpoint(state(1), run / "best.pth")
    save_numbered(state(2), run / "last.pth", 2, keep=2)
    truncate(run / "last.pth")  # and with it ckpt-step2
    truncate(run / "ckpt-step00000001.pth")
    messages: list[str] = []

    class Recorder:
        def warning(self, msg, *args):
            messages.append(msg % args)

    assert newest_checkpoint(tmp_path, Recorder()) == run / "best.pth"
    for message, name in zip(messages, ("last.pth", "ckpt-step00000002.pth", "ckpt-step00000001.pth")):
        assert message.startswith(f"--resume skips {run / name} is truncated or damaged") or \
            message == f"--resume skips {run / name}: the same file as last.pth (a hard link)"
    assert messages[3] == f"--resume continues from best.pth, the newest intact checkpoint of {run}"
    garbage(run / "best.pth")
    with pytest.raises(CheckpointError) as caught:
        newest_checkpoint(tmp_path, Recorder())
    message = str(caught.value)
    assert message.startswith(f"--resume found no intact checkpoint in {run}; tried:")
    for name in ("last.pth", "ckpt-step00000002.pth", "ckpt-step00000001.pth", "best.pth"):
        assert f"  - {run / name}" in message


def test_resume_from_a_damaged_file_named_on_the_command_line_is_an_error_naming_it(tiny_data: Path, kept_run: Path,
                                                                                      tmp_path: Path) -> None:
    broken = tmp_path / "broken.pth"
    broken.write_bytes((kept_run / "last.pth").read_bytes()[:5000])
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(broken))} is not a readable checkpoint"):
        train(config(tiny_data, tmp_path), resume=str(broken), verbose=False)


# ------------------------------------------------------------------------- checks before the first step
def no_step_ran(out: Path) -> bool:
    lines = [json.loads(line) for p in out.rglob("metrics.jsonl") for line in p.read_text().splitlines()]
    return not any(line["event"] == "train" for line in lines) and not list(out.rglob("*.pth"))


def test_a_save_dir_under_a_regular_file_stops_before_training(tiny_data: Path, tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    target = tmp_path / "a-file" / "runs"
    with pytest.raises(FacecoreError) as caught:
        train(config(tiny_data, tmp_path, checkpoint={"save_dir": str(target)}), verbose=False)
    assert str(caught.value).startswith(f"checkpoint.save_dir: cannot write to {target} ({tmp_path / 'a-file'} is a "
                                        "file, not a folder)")
    assert no_step_ran(tmp_path)


def test_a_log_dir_under_a_regular_file_is_one_cli_message_before_training(tiny_data: Path, tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    target = tmp_path / "a-file" / "logs"
    cfg_file = write_config(config(tiny_data, tmp_path, logging={"log_dir": str(target), "tensorboard": False}),
                            tmp_path / "c.yaml")
    out = subprocess.run([*FACECORE, "train", "--config", str(cfg_file)], env=subprocess_env(), capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1] == (f"Error: logging.log_dir: cannot write to {target} ({tmp_path / 'a-file'} "
                                                   "is a file, not a folder); set logging.log_dir to a folder you can "
                                                   "write to (in the config or with --set logging.log_dir=PATH)")
    assert no_step_ran(tmp_path)


def test_check_writable_leaves_nothing_behind_and_refuses_a_file(tmp_path: Path) -> None:
    check_writable(tmp_path / "new" / "folder", "checkpoint.save_dir")  # not there yet: the run makes it
    check_writable(tmp_path, "logging.log_dir")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "a-file").write_text("")
    with pytest.raises(FacecoreError, match=r"^logging.log_dir: cannot write to .*a-file \(.*a-file is a file, not a folder\)"):
        check_writable(tmp_path / "a-file", "logging.log_dir")


def test_a_missing_data_root_is_one_cli_message_naming_it(tiny_data: Path, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-data"
    cfg_file = write_config(config(missing, tmp_path), tmp_path / "c.yaml")
    out = subprocess.run([*FACECORE, "train", "--config", str(cfg_file), "--quiet"], env=subprocess_env(),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines() == [f"Error: data.root {missing} is not a folder; it must hold train.rec, "
                                               "train.idx and property"]
    assert no_step_ran(tmp_path)

"""The loggers group: what a logger gets from a training run and from facecore eval, that a slow, failing or
full logger never holds training up and is reported once, the resume ledger (each step logged once),
the config keys (logging.loggers, the older logging.tensorboard, plugin options, a missing package)."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import make_tiny_data
from test_trainer import tiny_config

from facecore import ConfigError, TrainingStopped, hookimpl
from facecore.core import loggers
from facecore.core.config import validate_config
from facecore.core.loggers import Record, RunInfo, Trackers
from facecore.train.trainer import train

BASE = {"model": {"backbone": "resnet18"}, "data": {"root": "/d"}}


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_data(tmp_path_factory.mktemp("loggers-data"))


class Recorder:
    """A logger that keeps every call it gets, in order."""

    def __init__(self, calls: list, on_scalars=None):
        self.calls, self.on_scalars = calls, on_scalars

    def start(self, run):
        self.calls.append(("start", run))
        return {"run_id": f"rec-{len(self.calls)}"}

    def scalars(self, prefix, values, step):
        self.calls.append(("scalars", prefix, dict(values), step))
        if self.on_scalars:
            self.on_scalars(prefix, step)

    def artifact(self, name, path, kind, step):
        self.calls.append(("artifact", name, Path(path), kind, step))

    def finish(self, status):
        self.calls.append(("finish", status))


class Blocked:
    """A logger whose scalars() never returns until ``release`` is set: a tracker that hangs."""

    def __init__(self, release: threading.Event):
        self.release, self.got = release, 0

    def scalars(self, prefix, values, step):
        self.got += 1
        self.release.wait()

    def finish(self, status):
        self.release.wait()


class LoggerPlugin:
    """Registers ``name`` -> ``factory`` in the loggers group."""

    def __init__(self, name: str, factory):
        self.name, self.factory = name, factory

    @hookimpl
    def register_loggers(self, register):
        register(self.name, self.factory, description="test logger",
                 schema={"type": "object", "additionalProperties": False, "properties": {}})


def run_info(tmp_path: Path, step: int = 0) -> RunInfo:
    return RunInfo("train", "t/run", tmp_path, tmp_path, {"logging": {}}, step=step)


# -- the dispatcher ------------------------------------------------------------------------------------

def test_a_hanging_logger_is_reported_once_and_neither_records_nor_finish_wait_for_it(tmp_path: Path) -> None:
    release, lines = threading.Event(), []
    calls: list = []
    trackers = Trackers([("stuck", Blocked(release)), ("rec", Recorder(calls))], timeout=0.3, report=lines.append)
    try:
        trackers.start(run_info(tmp_path))
        trackers.scalars("train", {"loss": 1.0}, 1)
        time.sleep(0.4)  # the first call has now hung longer than the timeout
        for step in range(2, 50):
            trackers.scalars("train", {"loss": 1.0, "lr": 0.1, "not a number": "x", "nan": float("nan")}, step)
        trackers.finish("finished")  # waits at most the timeout for the stuck one
    finally:
        release.set()
    slow = [line for line in lines if "'stuck'" in line]
    assert len(slow) == 1 and "scalars() has not returned for 0.3 s" in slow[0], lines
    assert not [line for line in lines if "'rec'" in line]
    got = [c for c in calls if c[0] == "scalars"]
    assert [c[3] for c in got] == list(range(1, 50)) and got[-1][2] == {"loss": 1.0, "lr": 0.1}  # finite numbers only
    assert calls[-1] == ("finish", "finished")


def test_a_failing_logger_is_reported_once_and_a_full_queue_drops_with_one_note(tmp_path: Path, monkeypatch) -> None:
    class Failing:
        def scalars(self, prefix, values, step):
            raise ConnectionError("tracker down\nsecond line")

    lines: list[str] = []
    trackers = Trackers([("down", Failing())], timeout=5, report=lines.append)
    trackers.start(run_info(tmp_path))
    for step in range(5):
        trackers.scalars("train", {"loss": 1.0}, step)
    trackers.finish("failed")
    assert lines[0] == ("logger 'down': scalars() failed (ConnectionError: tracker down); later failures are counted, "
                        "not shown, and the run goes on")
    assert lines[1:] == ["logger 'down': 5 call(s) failed and 0 record(s) were dropped in this run"]

    monkeypatch.setattr(loggers, "QUEUE_SIZE", 3)
    release, lines = threading.Event(), []
    trackers = Trackers([("stuck", stuck := Blocked(release))], timeout=0.2, report=lines.append)
    try:
        trackers.start(run_info(tmp_path))
        trackers.scalars("train", {"loss": 1.0}, 0)
        while stuck.got == 0:  # the logger now hangs in its first call
            time.sleep(0.01)
        for step in range(1, 10):
            trackers.scalars("train", {"loss": 1.0}, step)
        full = [line for line in lines if "records are waiting" in line]
        assert len(full) == 1 and full[0].startswith("logger 'stuck': 3 records are waiting"), lines
        trackers.finish("finished")
    finally:
        release.set()
    assert "logger 'stuck': 0 call(s) failed and 6 record(s) were dropped in this run" in lines


def test_a_resumed_run_sends_what_a_logger_missed_and_skips_what_it_has(tmp_path: Path) -> None:
    """Killed after metrics.jsonl line 7 (step 8), the logger had lines 0-5; the checkpoint is at step 6."""
    history = [Record(i, "train", {"loss": float(i)}, i + 1) for i in range(8)]  # steps 1..8
    history.insert(6, Record(6, "val/lfw", {"accuracy": 0.5}, 6))
    history = [Record(i, r.prefix, r.values, r.step) for i, r in enumerate(history)]  # lines 0..8
    ledger = tmp_path / loggers.LEDGER
    ledger.write_text(json.dumps({"rec": 7}))  # lines 0-7 delivered: up to train step 7
    calls: list = []
    trackers = Trackers([("rec", Recorder(calls)), ("new", Recorder(new := []))], timeout=5)
    states = trackers.start(run_info(tmp_path, step=6), {"rec": {"run_id": "old"}}, history, ledger=ledger)
    assert calls[0][1].resume == {"run_id": "old"} and new[0][1].resume is None
    assert states == {"rec": {"run_id": "rec-1"}, "new": {"run_id": "rec-1"}}
    assert [c for c in calls if c[0] == "scalars"] == []  # everything up to the checkpoint was delivered
    for step in (7, 8):  # the resumed run redoes steps 7 and 8
        trackers.scalars("train", {"loss": 0.0}, step, seq=9 + step - 7)
    trackers.finish("finished")
    assert [c[3] for c in calls if c[0] == "scalars"] == [8]  # step 7: the first copy wins
    assert [(c[1], c[3]) for c in new if c[0] == "scalars"] == [  # a logger new to the run gets the history
        ("train", 1), ("train", 2), ("train", 3), ("train", 4), ("train", 5), ("train", 6), ("val/lfw", 6),
        ("train", 7), ("train", 8)]
    assert json.loads(ledger.read_text()) == {"rec": 10, "new": 10}


# -- the config ----------------------------------------------------------------------------------------

def test_loggers_default_to_tensorboard_and_the_older_switch_still_turns_it_off() -> None:
    assert validate_config(BASE)["logging"]["loggers"] == ["tensorboard"]
    off = validate_config({**BASE, "logging": {"tensorboard": False}})["logging"]
    assert off["loggers"] == [] and off["tensorboard"] is False
    both = validate_config({**BASE, "logging": {"tensorboard": False, "loggers": ["tensorboard", {"name": "wandb"}]}})
    assert [e["name"] for e in both["logging"]["loggers"]] == ["wandb"]
    assert both["logging"]["loggers"][0]["mode"] == "online"  # the plugin's defaults are filled in


def test_logger_names_and_options_are_checked_by_the_schema() -> None:
    with pytest.raises(ConfigError) as err:
        validate_config({**BASE, "logging": {"loggers": ["tensorbord", {"name": "wandb", "mode": "ofline"}]}})
    errors = err.value.errors
    assert any(e.startswith("logging.loggers[0]: unknown logger 'tensorbord'") and "did you mean 'tensorboard'" in e
               for e in errors), errors
    assert any(e.startswith("logging.loggers[1].mode:") for e in errors), errors
    with pytest.raises(ConfigError) as err:
        validate_config({**BASE, "logging": {"logger_timeout": 0}})
    assert err.value.errors[0].startswith("logging.logger_timeout:")


@pytest.mark.parametrize("name, package", [("wandb", "wandb"), ("mlflow", "mlflow")])
def test_a_missing_tracker_package_is_one_config_error_naming_the_key_and_the_extra(
        tiny_data: Path, tmp_path: Path, monkeypatch, name: str, package: str) -> None:
    monkeypatch.setitem(sys.modules, package, None)  # as if not installed
    cfg = tiny_config(tiny_data, tmp_path, logging={"log_dir": str(tmp_path / "logs"), "loggers": [name]})
    with pytest.raises(ConfigError) as err:
        train(cfg, verbose=False)
    assert len(err.value.errors) == 1
    message = err.value.errors[0]
    assert message.startswith(f"logging.loggers: logger '{name}' needs {package}") and \
        f"pip install 'facecore[{name}]'" in message
    assert not (tmp_path / "runs").exists()  # stopped before the run folder was made


# -- a training run and facecore eval as a logger sees them --------------------------------------------

def test_a_logger_gets_the_config_scalars_best_checkpoint_and_end_and_eval_continues_its_run(
        tiny_data: Path, tmp_path: Path, register_plugin) -> None:
    from facecore.eval.run import evaluate

    calls: list = []
    register_plugin(LoggerPlugin("t-recorder", lambda: Recorder(calls)))
    cfg = tiny_config(tiny_data, tmp_path, logging={"log_dir": str(tmp_path / "logs"), "loggers": ["t-recorder"]})
    summary = train(cfg, verbose=False)
    run_dir = Path(summary["run_dir"])
    kind, run = calls[0]
    assert kind == "start" and run.kind == "train" and run.run_dir == run_dir and run.step == 0
    assert run.config["head"]["num_classes"] == 6 and run.config["logging"]["loggers"] == ["t-recorder"]
    assert run.name == f"fastcontextface/{run_dir.name}" and run.resume is None
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_steps = [x["step"] for x in lines if x["event"] == "train"]
    got = [c for c in calls if c[0] == "scalars"]
    assert [c[3] for c in got if c[1] == "train"] == train_steps
    assert {"loss", "lr", "images_per_s"} <= set(got[0][2])
    validations = [(x["step"], x["accuracy"]) for x in lines if x["event"] == "validation"]
    assert [(c[3], c[2]["accuracy"]) for c in got if c[1] == "val/val"] == validations
    best = [c for c in calls if c[0] == "artifact"]
    assert best and best[-1][1:4] == ("best_checkpoint", run_dir / "best.pth", "checkpoint")
    assert calls[-1] == ("finish", "finished")
    from facecore.core.checkpoint import load_checkpoint

    assert load_checkpoint(run_dir / "last.pth")["loggers"] == {"t-recorder": {"run_id": "rec-1"}}

    calls.clear()
    result = evaluate(run_dir / "best.pth")
    result.write()
    kind, run = calls[0]
    assert kind == "start" and run.kind == "eval" and run.resume == {"run_id": "rec-1"} and run.run_dir == run_dir
    (scalars,) = [c for c in calls if c[0] == "scalars"]
    assert scalars[1] == "eval/val" and scalars[2]["accuracy"] == result.results["val"]["accuracy"]
    assert [(c[1], c[3]) for c in calls if c[0] == "artifact"] == [("roc/val", "image"), ("eval/result", "file")]
    assert calls[-1] == ("finish", "finished")


def test_a_run_stopped_by_a_signal_says_so_and_a_hanging_logger_does_not_hold_it(
        tiny_data: Path, tmp_path: Path, register_plugin) -> None:
    calls: list = []
    release = threading.Event()

    def stop_at_step_2(prefix, step):
        if prefix == "train" and step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    register_plugin(LoggerPlugin("t-stopper", lambda: Recorder(calls, stop_at_step_2)))
    register_plugin(LoggerPlugin("t-stuck", lambda: Blocked(release)))
    cfg = tiny_config(tiny_data, tmp_path, training={"log_every": 1, "epochs": 20},
                      logging={"log_dir": str(tmp_path / "logs"), "loggers": ["t-stopper", "t-stuck"],
                               "logger_timeout": 0.5})
    try:
        with pytest.raises(TrainingStopped):
            train(cfg, verbose=False)
    finally:
        release.set()
    assert calls[-1] == ("finish", "stopped")
    (log,) = (tmp_path / "runs").rglob("train.log")
    stuck = [line for line in log.read_text().splitlines() if "logger 't-stuck'" in line]
    assert len(stuck) == 1 and "has not returned" in stuck[0], stuck


def test_a_logger_that_knows_its_last_step_gets_what_its_files_lack(tmp_path: Path) -> None:
    """W&B's offline file is written every few seconds, so it may hold less than it was given: such a logger
    says in start() which step its files end at, and that decides instead of the ledger."""

    class Knows(Recorder):
        def __init__(self, calls, through):
            super().__init__(calls)
            self.through = through

        def start(self, run):
            self.logged_through = self.through
            return super().start(run)

    history = [Record(i, "train", {"loss": float(i)}, i + 1) for i in range(8)]  # steps 1..8, lines 0..7
    ledger = tmp_path / loggers.LEDGER
    ledger.write_text(json.dumps({"behind": 7, "ahead": 0}))  # the ledger is overruled either way
    behind, ahead = [], []
    trackers = Trackers([("behind", Knows(behind, 3)), ("ahead", Knows(ahead, 7))], timeout=5)
    trackers.start(run_info(tmp_path, step=6), {}, history, ledger=ledger)
    for step in (7, 8):
        trackers.scalars("train", {"loss": 0.0}, step, seq=8 + step - 7)
    trackers.finish("finished")
    assert [c[3] for c in behind if c[0] == "scalars"] == [4, 5, 6, 7, 8]
    assert [c[3] for c in ahead if c[0] == "scalars"] == [8]


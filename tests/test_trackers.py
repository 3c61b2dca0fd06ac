"""W&B (offline) and MLflow (local SQLite store) as a user runs them: a run killed with SIGKILL mid-epoch and
resumed under torchrun on 2 processes (sharded centers, validation on: only rank 0 logs), then ``facecore
eval`` of its best.pth; what the trackers hold is read back from their files (params/config, metric history,
artifacts) and checked against metrics.jsonl: every step once, one W&B run id in contiguous offline folders,
one MLflow run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import make_tiny_data, subprocess_env
from test_trainer import raw_config

pytest.importorskip("wandb", reason="W&B is the optional extra 'wandb' (pip install 'facecore[wandb]')")
pytest.importorskip("mlflow", reason="MLflow is the optional extra 'mlflow' (pip install 'facecore[mlflow]')")
pytest.importorskip("sqlalchemy", reason="MLflow's SQLite store needs SQLAlchemy (pip install 'facecore[mlflow]')")

pytestmark = [pytest.mark.slow,  # MLflow's store, read back here, uses an SQLAlchemy 2.1 deprecation
              pytest.mark.filterwarnings("ignore::sqlalchemy.exc.SADeprecationWarning")]

# The CLI with one more head, which kills its own process (SIGKILL, as the OOM killer or a lost node would) at
# training call FC_KILL_AT, once W&B has flushed some rows to its offline file, so both trackers held data.
DRIVER = """
import glob, os, signal, sys, time
import torch
from facecore import hookimpl
from facecore.core import plugins
from facecore_plugins.wandb_logger import offline_history


class Head(torch.nn.Module):
    calls = 0

    def forward(self, cosine, labels, norms):
        if self.training:
            Head.calls += 1
            if Head.calls == int(os.environ.get("FC_KILL_AT", "0")):
                deadline = time.time() + 60
                while time.time() < deadline:
                    found = glob.glob(os.environ["FC_RUNS"] + "/*/*/wandb/offline-run-*")
                    if found and offline_history(os.path.dirname(os.path.dirname(found[0])), found[0].rsplit("-", 1)[1]):
                        break
                    time.sleep(0.2)
                os.kill(os.getpid(), signal.SIGKILL)
        return 16 * cosine


class Plugin:
    @hookimpl
    def register_heads(self, register):
        register("killer", Head, description="kills its process at a given training call")


plugins.pm.register(Plugin(), name="killer")
from facecore.cli import main

main(sys.argv[1:], prog_name="facecore")
"""


def test_wandb_offline_and_mlflow_across_kill_9_resume_and_eval(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    from facecore_plugins.wandb_logger import read_run_file

    data = make_tiny_data(tmp_path)
    config = raw_config(data, tmp_path,
                        training={"epochs": 2, "log_every": 1, "lr": 0.05},  # 6 steps an epoch
                        checkpoint={"save_dir": str(tmp_path / "runs"), "save_every_steps": 5},
                        logging={"log_dir": str(tmp_path / "logs"), "logger_timeout": 300,
                                 "loggers": [{"name": "wandb", "mode": "offline", "project": "t"}, "mlflow"]})
    config["head"] = {"type": "killer", "shard": True}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    (tmp_path / "driver.py").write_text(DRIVER)
    cli = [sys.executable, str(tmp_path / "driver.py")]
    env = subprocess_env(FC_RUNS=str(tmp_path / "runs"), WANDB_SILENT="true")

    killed = subprocess.run([*cli, "train", "--config", str(tmp_path / "c.yaml"), "--quiet"], capture_output=True,
                            text=True, timeout=300, env={**env, "FC_KILL_AT": "9"})
    assert killed.returncode == -9, killed.stderr[-3000:]
    (run,) = (tmp_path / "runs" / "fastcontextface").iterdir()
    first_lines = (run / "metrics.jsonl").read_text().splitlines()
    assert json.loads(first_lines[-1])["step"] == 8  # killed in step 9; last.pth is from step 6 (epoch 1's end)

    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", cli[1]]
    resumed = subprocess.run([*torchrun, "train", "--config", str(tmp_path / "c.yaml"), "--resume", "--quiet",
                              "--set", "data.batch_size=4"],  # the same global batch: 6 steps an epoch
                             capture_output=True, text=True, timeout=300, env=env)
    assert resumed.returncode == 0 and "terminate called" not in resumed.stderr, resumed.stderr[-3000:]
    assert "logger '" not in resumed.stderr  # no tracker trouble reported
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train_lines = [x for x in lines if x["event"] == "train"]
    assert [x["step"] for x in train_lines] == [1, 2, 3, 4, 5, 6, 7, 8, 7, 8, 9, 10, 11, 12]  # 7 and 8 redone
    copies: dict[int, list[dict]] = {}
    for x in train_lines:
        copies.setdefault(x["step"], []).append(x)

    # -- W&B: the offline folders of one run id, each step once, contiguous --------------------------------
    folders = sorted((run / "wandb").glob("offline-run-*"))
    assert len(folders) == 2
    run_id = folders[0].name.rsplit("-", 1)[1]
    assert folders[1].name.endswith(f"-{run_id}")
    steps_per_folder = []
    for folder in folders:
        records = list(read_run_file(folder / f"run-{run_id}.wandb"))
        rows = [row for kind, row in records if kind == "history" and "train/loss" in row]
        steps_per_folder.append([row["step"] for row in rows])
        for row in rows:
            assert row["train/loss"] in [c["loss"] for c in copies[row["step"]]]
        (config_row,) = [row for kind, row in records if kind == "run"]
        assert config_row["training"]["lr"] == 0.05 and config_row["model"]["backbone"] == "fastcontextface"
    first, second = steps_per_folder
    assert first and first == list(range(1, len(first) + 1)), steps_per_folder  # the kill cut the first short
    assert second == list(range(len(first) + 1, 13)), steps_per_folder  # the resumed one goes on after it

    # -- MLflow: one run in the run folder's store, each step once --------------------------------------
    client = MlflowClient(tracking_uri=f"sqlite:///{run / 'mlflow.db'}")
    (experiment,) = [e for e in client.search_experiments() if e.name == "facecore"]
    (mlrun,) = client.search_runs([experiment.experiment_id])
    assert mlrun.info.status == "FINISHED"
    assert mlrun.data.params["training.lr"] == "0.05" and mlrun.data.params["model.backbone"] == "fastcontextface"
    assert mlrun.data.params["data.batch_size"] == "8" and mlrun.data.tags["changed_at_step_6.data.batch_size"] == "4"
    history = client.get_metric_history(mlrun.info.run_id, "train/loss")
    assert sorted(m.step for m in history) == list(range(1, 13))
    for m in history:
        assert m.value in [c["loss"] for c in copies[m.step]]
    speeds = {m.step: m.value for m in client.get_metric_history(mlrun.info.run_id, "train/images_per_s")}
    assert all(speeds[s] in [c["images_per_s"] for c in copies[s]] for s in range(1, 13))
    val = [(m.step, m.value) for m in client.get_metric_history(mlrun.info.run_id, "val/val/accuracy")]
    assert sorted(val) == [(x["step"], x["accuracy"]) for x in lines if x["event"] == "validation"]
    assert mlrun.data.tags["best_checkpoint"] == str(run / "best.pth")

    # -- facecore eval logs into the run its checkpoint came from ----------------------------------------
    evaluated = subprocess.run([*cli, "eval", "--checkpoint", str(run / "best.pth"), "--json"], capture_output=True,
                               text=True, timeout=300, env=env)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    result = json.loads(evaluated.stdout)
    best_step = result["step"]
    eval_metric = client.get_metric_history(mlrun.info.run_id, "eval/val/accuracy")
    assert [(m.step, m.value) for m in eval_metric] == [(best_step, result["results"]["val"]["accuracy"])]
    artifacts = {a.path for a in client.list_artifacts(mlrun.info.run_id)}
    assert artifacts == {"roc", "eval"}
    (roc,) = client.list_artifacts(mlrun.info.run_id, "roc")
    assert roc.path == f"roc/{Path(result['roc_plots']['val']).name}"
    (report,) = client.list_artifacts(mlrun.info.run_id, "eval")
    assert report.path.startswith("eval/test_result_fastcontextface_") and report.path.endswith(".json")
    assert client.get_run(mlrun.info.run_id).info.status == "FINISHED"  # eval leaves the training run's status

    folders = sorted((run / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(folders) == 3  # eval's rows sit in a third folder of the same run
    rows = [row for kind, row in read_run_file(folders[2] / f"run-{run_id}.wandb") if kind == "history"]
    assert [(r["step"], r["eval/val/accuracy"]) for r in rows if "eval/val/accuracy" in r] == [
        (best_step, result["results"]["val"]["accuracy"])]
    assert (folders[2] / "files" / Path(result["roc_plots"]["val"]).name).exists()

"""The ``mlflow`` logger: MLflow tracking, by default in a local SQLite store in the run directory.

``logging.loggers: [{name: mlflow, tracking_uri: http://host:5000}]`` logs to a server; without
``tracking_uri`` the store is ``sqlite:///<run dir>/mlflow.db`` and artifacts go to
``<run dir>/mlartifacts`` (``mlflow ui --backend-store-uri sqlite:///<run dir>/mlflow.db`` shows it).
The config goes in as params (dotted keys), scalars as metrics (``train/loss``, ``val/lfw/accuracy``),
ROC plots and result files as artifacts, the best checkpoint's path as a tag. The MLflow run id is kept
in checkpoints, so ``--resume`` continues the same MLflow run and ``facecore eval`` of a checkpoint
logs into the run it came from.

mlflow is an optional dependency (``pip install 'facecore[mlflow]'``, the smaller mlflow-skinny plus
SQLAlchemy for the SQLite store); it is imported when the run starts.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

from facecore import hookimpl
from facecore.errors import ConfigError

from facecore_plugins.tracker_support import installed

INSTALL_HINT = "pip install 'facecore[mlflow]'"
NEEDS = ("mlflow", "sqlalchemy", "alembic")  # mlflow-skinny leaves the SQL store's packages out

SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "tracking_uri": {
            "type": ["string", "null"],
            "default": None,
            "description": "MLflow tracking URI (a server, or sqlite:///path); default: sqlite:///<run dir>/mlflow.db.",
        },
        "experiment": {"type": "string", "minLength": 1, "default": "facecore", "description": "MLflow experiment name."},
        "run_name": {
            "type": ["string", "null"],
            "default": None,
            "description": "Name of the MLflow run; default: <backbone>/<run folder>.",
        },
        "tags": {
            "type": "object",
            "additionalProperties": {"type": "string"},
            "default": {},
            "description": "Tags set on the MLflow run.",
        },
    },
}

STATUS = {"finished": "FINISHED", "stopped": "KILLED", "failed": "FAILED"}


def metric_key(key: str) -> str:
    """A facecore result key as an MLflow metric name (letters, digits, _ - . / and space): tar@far=1e-4 -> tar_at_far_1e-4."""
    return re.sub(r"[^\w\-./ ]", "_", key.replace("@", "_at_").replace("=", "_"))


def flatten(config: Any, prefix: str = "") -> dict[str, str]:
    """The config as MLflow params: dotted keys, lists and null as JSON text."""
    if isinstance(config, dict) and config:
        out: dict[str, str] = {}
        for key, value in config.items():
            out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    text = config if isinstance(config, str) else json.dumps(config)
    return {metric_key(prefix): text[:6000]}


class MlflowLogger:
    """One MLflow run, through MlflowClient (no global active run, so it is safe on the logger's thread)."""

    def __init__(self, tracking_uri: str | None = None, experiment: str = "facecore", run_name: str | None = None,
                 tags: Mapping[str, str] = MappingProxyType({})):
        missing = [name for name in NEEDS if not installed(name)]
        if missing:
            raise ConfigError([f"logging.loggers: logger 'mlflow' needs {', '.join(missing)}, which "
                               f"{'is' if len(missing) == 1 else 'are'} not installed; install with: {INSTALL_HINT}"])
        self.tracking_uri, self.experiment, self.run_name = tracking_uri, experiment, run_name
        self.tags = dict(tags)
        self.client: Any = None
        self.run_id: str | None = None
        self.owns_status = True

    def start(self, run: Any) -> dict:
        from mlflow.tracking import MlflowClient

        run_dir = Path(run.run_dir).resolve()
        uri = self.tracking_uri or f"sqlite:///{run_dir / 'mlflow.db'}"
        self.client = MlflowClient(tracking_uri=uri)
        previous = (run.resume or {}).get("run_id")
        if previous and self._exists(previous):
            self.run_id = previous
            self.owns_status = run.kind == "train"  # eval adds to a finished run and leaves its status alone
            if self.owns_status:
                self.client.update_run(previous, status="RUNNING")
            self._log_params(run, resumed=True)
        else:
            experiment = self.client.get_experiment_by_name(self.experiment)
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(
                self.experiment, artifact_location=None if self.tracking_uri else (run_dir / "mlartifacts").as_uri())
            tags = {"facecore.kind": run.kind, "facecore.run_dir": str(run.run_dir), **self.tags}
            self.run_id = self.client.create_run(experiment_id, run_name=self.run_name or run.name, tags=tags).info.run_id
            self._log_params(run, resumed=False)
        return {"run_id": self.run_id}

    def _exists(self, run_id: str) -> bool:
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_run(run_id).info.lifecycle_stage == "active"
        except MlflowException:
            return False

    def _log_params(self, run: Any, resumed: bool) -> None:
        """The config as params; on resume only keys the run lacks (MLflow params cannot change: changes become tags)."""
        from mlflow.entities import Param

        params = flatten(dict(run.config))
        if resumed:
            have = self.client.get_run(self.run_id).data.params
            for key, value in params.items():
                if key in have and have[key] != value:
                    self.client.set_tag(self.run_id, f"changed_at_step_{run.step}.{key}", value)
            params = {k: v for k, v in params.items() if k not in have}
        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), 100):  # log_batch takes at most 100 params
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def scalars(self, prefix: str, values: dict, step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(metric_key(f"{prefix}/{k}"), float(v), now, step) for k, v in values.items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def artifact(self, name: str, path: Path, kind: str, step: int) -> None:
        if kind == "checkpoint":
            self.client.set_tag(self.run_id, metric_key(name), str(path))
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path=name.rpartition("/")[0] or None)

    def finish(self, status: str) -> None:
        if self.run_id is None:
            return
        if self.owns_status:
            self.client.set_terminated(self.run_id, status=STATUS[status])


@hookimpl
def register_loggers(register):
    register("mlflow", MlflowLogger, schema=SCHEMA,
             description=f"MLflow tracking: a local SQLite store in the run folder, or tracking_uri ({INSTALL_HINT})")

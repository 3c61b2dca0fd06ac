"""facecore compare: two runs' validation curves and ROC curves in one PNG each, and their best numbers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import make_tiny_data
from test_trainer import tiny_config

from facecore.train.trainer import train


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_data(tmp_path_factory.mktemp("compare-data"))


def test_compare_draws_both_runs_and_tables_their_best_numbers(tiny_data: Path, tmp_path: Path) -> None:
    from click.testing import CliRunner
    from PIL import Image

    from facecore import cli
    from facecore.eval.evaluation import roc_auc
    from facecore.eval.roc_plot import COLORS
    from facecore.eval.run import evaluate

    runs = []
    for lr in (0.05, 0.2):
        cfg = tiny_config(tiny_data, tmp_path / str(lr), training={"lr": lr}, eval={"eval_freq": 1},
                          logging={"log_dir": str(tmp_path / "logs"), "loggers": []})
        runs.append(Path(train(cfg, verbose=False)["run_dir"]))
    out = tmp_path / "cmp"
    result = CliRunner().invoke(cli.main, ["compare", *map(str, runs), "--out", str(out)])
    assert result.exit_code == 0, result.output
    accuracy, roc = Image.open(out / "compare_accuracy.png"), Image.open(out / "compare_roc.png")
    for image in (accuracy, roc):
        colors = {c for _, c in image.getcolors(1 << 20)}
        assert COLORS[0] in colors and COLORS[1] in colors and COLORS[2] not in colors  # two runs, two lines
    rows = [line.split() for line in result.stdout.strip().splitlines()]
    assert rows[0] == ["run", "steps", "best", "accuracy", "at", "step", "val", "accuracy", "val", "AUC"]
    for run, row in zip(runs, rows[2:]):
        lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        val = [(x["accuracy"], x["step"]) for x in lines if x["event"] == "validation"]
        best = max(val, key=lambda v: v[0])  # the first of equal ones, as compare ranks them
        auc = roc_auc(evaluate(run / "best.pth", overrides=["logging.loggers=[]"]).sets[0].roc)
        assert row == [f"fastcontextface/{run.name}", "12", f"{best[0]:.4f}", str(best[1]), f"{best[0]:.4f}", f"{auc:.4f}"]

    missing = CliRunner().invoke(cli.main, ["compare", str(tmp_path / "nowhere")])
    assert missing.exit_code == 1 and "nowhere is not a folder: pass run folders of facecore train" in missing.output

"""Several training runs side by side (``facecore compare``): a validation metric against the step, the ROC
curves of their checkpoints overlaid, and a table of their best numbers.

The curves come from each run's metrics.jsonl (validation lines; of a step logged twice after a
kill -9 and ``--resume``, the first line counts, as in the trackers). The ROC curves come from
evaluating each run's best.pth (last.pth where there is none) on the same pair sets.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from ..errors import DataError, FacecoreError

Say = Callable[[str], None]


@dataclass
class RunRecord:
    """What one run folder holds: its label, config, validation results per set and step, checkpoint."""

    path: Path
    label: str
    config: dict
    validation: dict[str, dict[int, dict[str, float]]]  # set -> step -> results
    last_step: int
    checkpoint: Path | None
    roc: dict[str, Any] = field(default_factory=dict)  # set -> RocCurve of the checkpoint

    def curve(self, set_name: str, key: str) -> tuple[list[int], list[float]]:
        steps = sorted(self.validation.get(set_name, {}))
        values = [self.validation[set_name][s].get(key) for s in steps]
        pairs = [(s, float(v)) for s, v in zip(steps, values) if isinstance(v, (int, float)) and not isinstance(v, bool)]
        return [s for s, _ in pairs], [v for _, v in pairs]

    def best(self, key: str) -> tuple[float | None, int | None, str]:
        """The best mean of ``key`` over the pair sets, its step, and the mode (the run's best_metric mode for its key)."""
        wanted = self.config.get("checkpoint", {}).get("best_metric", {})
        mode = wanted.get("mode", "max") if wanted.get("key") == key else "max"
        by_step: dict[int, list[float]] = {}
        for results in self.validation.values():
            for step, values in results.items():
                v = values.get(key)
                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                    by_step.setdefault(step, []).append(float(v))
        means = {s: sum(v) / len(v) for s, v in by_step.items() if len(v) == len(self.validation)}
        if not means:
            return None, None, mode
        step = (max if mode == "max" else min)(sorted(means), key=lambda s: means[s])
        return means[step], step, mode


def read_run(path: str | Path) -> RunRecord:
    """A run folder of ``facecore train``: config.yaml and metrics.jsonl (DataError naming what is missing)."""
    from ..core.config import read_yaml

    folder = Path(path)
    metrics = folder / "metrics.jsonl"
    if not folder.is_dir() or not metrics.is_file():
        what = "is not a folder" if not folder.is_dir() else "has no metrics.jsonl"
        raise DataError(f"{folder} {what}: pass run folders of facecore train (checkpoint.save_dir/<backbone>/<time>/)")
    config = read_yaml(folder / "config.yaml") if (folder / "config.yaml").is_file() else {}
    validation: dict[str, dict[int, dict[str, float]]] = {}
    last = 0
    for number, text in enumerate(metrics.read_text().splitlines(), start=1):
        try:
            line = json.loads(text)
        except ValueError:
            continue  # a line cut short by a kill: the run's other lines still count
        if not isinstance(line, dict) or not isinstance(line.get("step"), int):
            continue
        last = max(last, line["step"])
        if line.get("event") == "validation":
            per_set = validation.setdefault(str(line.get("set")), {})
            per_set.setdefault(line["step"], {k: v for k, v in line.items()
                                              if k not in ("event", "epoch", "step", "time", "set")})
    checkpoint = next((folder / n for n in ("best.pth", "last.pth") if (folder / n).is_file()), None)
    backbone = (config.get("model") or {}).get("backbone") or folder.parent.name
    return RunRecord(folder, f"{backbone}/{folder.name}", config, validation, last, checkpoint)


def add_rocs(runs: Sequence[RunRecord], bins: Sequence[str], device: str | None, batch_size: int | None,
             say: Say) -> None:
    """Evaluate each run's checkpoint on ``bins`` (default: the run's eval.bin_file) and keep the ROC per set."""
    from .run import evaluate

    for run in runs:
        if run.checkpoint is None:
            say(f"{run.path}: no best.pth or last.pth: no ROC curve for this run")
            continue
        try:
            result = evaluate(run.checkpoint, bins=list(bins), device=device, batch_size=batch_size,
                              overrides=["logging.loggers=[]"])
        except FacecoreError as exc:  # one run's missing data leaves the others' curves
            say(f"{run.path}: no ROC curve ({str(exc).splitlines()[-1].strip(' -')})")
            continue
        run.roc = {s.name: s.roc for s in result.sets if s.roc is not None}


def best_table(runs: Sequence[RunRecord], key: str) -> str:
    """One row per run: its last step, the best mean ``key`` over its pair sets and the step, each set there, AUC."""
    from .evaluation import roc_auc

    sets = list(dict.fromkeys(s for run in runs for s in [*run.validation, *run.roc]))
    header = ["run", "steps", f"best {key}", "at step", *(f"{s} {key}" for s in sets), *(f"{s} AUC" for s in sets)]
    rows = []
    for run in runs:
        value, step, _ = run.best(key)
        row = [run.label, str(run.last_step), "-" if value is None else f"{value:.4f}", "-" if step is None else str(step)]
        for s in sets:
            v = run.validation.get(s, {}).get(step, {}).get(key) if step is not None else None
            row.append(f"{v:.4f}" if isinstance(v, (int, float)) and math.isfinite(v) else "-")
        for s in sets:
            row.append(f"{roc_auc(run.roc[s]):.4f}" if s in run.roc else "-")
        rows.append(row)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def compare(paths: Sequence[str | Path], out: str | Path, key: str = "accuracy", bins: Sequence[str] = (),
            roc: bool = True, device: str | None = None, batch_size: int | None = None,
            say: Say | None = None) -> tuple[list[RunRecord], list[Path], str]:
    """Read the runs, draw ``out/compare_<key>.png`` and ``out/compare_roc[_<set>].png``; returns runs, PNGs, table."""
    from .curve_plot import plot_curves
    from .roc_plot import plot_roc

    say = say or (lambda _: None)
    runs = [read_run(p) for p in paths]
    labels = [r.label for r in runs]
    for r in runs:  # two folders of one name (another save_dir): tell them apart by their parent folders
        if labels.count(r.label) > 1:
            r.label = str(Path(*r.path.resolve().parts[-3:]))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    curves = {}
    for r in runs:
        for s in r.validation:
            steps, values = r.curve(s, key)
            if steps:
                curves[f"{r.label} {s}" if len(r.validation) > 1 else r.label] = (steps, values)
        if not r.validation:
            say(f"{r.path}: no validation in metrics.jsonl (no eval.bin_file): no {key} curve for this run")
    if curves:
        written.append(out / f"compare_{key.replace('/', '_')}.png")
        plot_curves(curves, written[-1], title=f"validation {key} by step", y_label=key)
    if roc:
        add_rocs(runs, bins, device, batch_size, say)
        sets = list(dict.fromkeys(s for r in runs for s in r.roc))
        for s in sets:
            path = out / ("compare_roc.png" if len(sets) == 1 else f"compare_roc_{s}.png")
            plot_roc({r.label: r.roc[s] for r in runs if s in r.roc}, path, title=f"ROC on {s}")
            written.append(path)
    return runs, written, best_table(runs, key)


__all__ = ["RunRecord", "best_table", "compare", "read_run"]

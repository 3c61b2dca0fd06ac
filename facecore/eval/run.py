"""Evaluation as a library: a checkpoint on .bin pair sets and IJB-B/C template sets, as a result object.

``evaluate(...)`` (``facecore.evaluate``) embeds and scores every set and returns an
:class:`Evaluation`: per set its metrics, its ROC and where its files go. ``Evaluation.write()``
writes the result files (``test_result_<name>_<time>.txt/.json``, one ROC PNG per set) and hands
them to the loggers of ``logging.loggers``; ``facecore eval`` is ``evaluate`` + ``write`` + printing.

No torch import at module level (``facecore --help`` imports the eval command).
"""

from __future__ import annotations

import json
import math
import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from ..errors import ConfigError, DataError

Say = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


@dataclass
class SetResult:
    """One evaluated set: its metrics, its ROC (None without both kinds of pairs) and its ROC plot's path."""

    name: str
    kind: str  # "pairs" (.bin) or "ijb" (template set)
    metrics: dict[str, float]
    roc: Any = None  # evaluation.RocCurve
    plot: Path | None = None  # written by Evaluation.write()
    ijb: Any = None  # ijb.IJBResult for template sets
    warnings: list[str] = field(default_factory=list)


@dataclass
class Evaluation:
    """What ``evaluate`` found, and where ``write`` puts it."""

    name: str
    checkpoint: str
    config_source: str
    config: dict
    device: str
    timestamp: str
    step: int | None
    sets: list[SetResult]
    log_dir: Path
    features: list[str] = field(default_factory=list)  # .npy files written with save_features
    trackers: Any = None  # core.loggers.Trackers of logging.loggers (None: none)
    tracked: dict = field(default_factory=dict)  # the loggers' states stored in the checkpoint (its tracker runs)
    run_dir: Path | None = None  # the training run the checkpoint came from (where its loggers keep files)

    @property
    def results(self) -> dict[str, dict[str, float]]:
        """``{set name: {key: value}}`` for every set, in order."""
        return {s.name: s.metrics for s in self.sets}

    @property
    def base(self) -> Path:
        """The result files' path without suffix: ``log_dir/test_result_<name>_<time>``."""
        return self.log_dir / f"test_result_{self.name}_{self.timestamp}"

    def report(self) -> dict:
        """The JSON report (NaN kept; :func:`json_safe` makes it strict JSON)."""
        out = {
            "name": self.name,
            "checkpoint": self.checkpoint,
            "config": self.config_source,
            "backbone": self.config["model"]["backbone"],
            "device": self.device,
            "timestamp": self.timestamp,
            "step": self.step,
            "results": self.results,
            "roc_plots": {s.name: str(s.plot) for s in self.sets if s.plot is not None},
        }
        ijb = [s for s in self.sets if s.ijb is not None]
        if ijb:
            out["ijb"] = {s.name: ijb_report(s.ijb, self.config["eval"]["ijb"]) for s in ijb}
        return out

    def table(self) -> str:
        """The printed result: one table of the pair sets, one per IJB set."""
        pairs = {s.name: s.metrics for s in self.sets if s.ijb is None}
        tables = ([format_table(pairs)] if pairs else []) + [format_ijb_table(s.ijb) for s in self.sets if s.ijb]
        return "\n\n".join(tables)

    def write(self) -> list[Path]:
        """Write the ROC PNGs, the .txt table and the .json report, and give them to the loggers."""
        from .roc_plot import plot_roc

        self.log_dir.mkdir(parents=True, exist_ok=True)
        for s in self.sets:
            if s.roc is None:
                continue
            s.plot = self.log_dir / f"roc_{self.name}_{s.name}_{self.timestamp}.png"
            plot_roc({s.name: s.roc}, s.plot, title=f"ROC of {self.name} on {s.name}")
        header = (f"# facecore eval of {self.checkpoint} ({self.config['model']['backbone']}) on {self.device}, "
                  f"{self.timestamp}: {', '.join(self.results)}")
        txt, js = Path(f"{self.base}.txt"), Path(f"{self.base}.json")
        txt.write_text("\n".join([header, self.table(), ""]))
        js.write_text(json.dumps(json_safe(self.report()), indent=2) + "\n")
        self.log_to_trackers(js)
        return [txt, js, *(s.plot for s in self.sets if s.plot is not None)]

    def log_to_trackers(self, report: Path) -> None:
        """The results, ROC plots and report to each logger, in the tracker run the checkpoint came from when
        its checkpoint names one (a training run's ids), else in a new one; bounded by logging.logger_timeout."""
        from ..core.loggers import RunInfo

        if not self.trackers:
            return
        step = self.step or 0
        run = RunInfo("eval", f"{self.name}/eval_{self.timestamp}", self.run_dir or self.log_dir, self.log_dir,
                      self.config, step=step)
        self.trackers.start(run, self.tracked)
        for s in self.sets:
            self.trackers.scalars(f"eval/{s.name}", s.metrics, step)
            if s.plot is not None:
                self.trackers.artifact(f"roc/{s.name}", s.plot, "image", step)
        self.trackers.artifact("eval/result", report, "file", step)
        self.trackers.finish("finished")


def evaluate(
    checkpoint: str | Path,
    config: str | Path | None = None,
    *,
    bins: Sequence[str | Path] = (),
    ijb_root: str | Path | None = None,
    ijb_target: str | None = None,
    overrides: Sequence[str] = (),
    name: str | None = None,
    batch_size: int | None = None,
    device: str | None = None,
    num_workers: int | None = None,
    save_features: str | Path | None = None,
    say: Say | None = None,
    warn: Say | None = None,
) -> Evaluation:
    """Evaluate a checkpoint: verification metrics on .bin pair sets, the IJB 1:1 protocol on template sets.

    With ``bins`` or ``ijb_root`` only those sets; with neither, ``eval.bin_file`` and
    ``eval.ijb.root`` of the config (``config``, a YAML path, defaults to the one stored in the
    checkpoint). ``save_features`` writes the IJB image and template features and pair scores as
    .npy files. ``say`` gets progress lines, ``warn`` warnings and notes (both silent by default).
    Nothing else is written: call ``.write()`` on the result for the result files.
    """
    from ..core.build import build_metrics, pair_set_names, pair_set_paths
    from ..core.loggers import Trackers
    from .evaluation import load_trained_backbone, resolve_device

    say, warn = say or _quiet, warn or _quiet
    if device:
        resolve_device(device)  # a bad device fails before the checkpoint is read
    backbone, cfg, ckpt = load_trained_backbone(checkpoint, config, overrides)
    explicit = bool(bins or ijb_root)
    paths = [str(b) for b in bins] if explicit else pair_set_paths(cfg)
    ijb_root = ijb_root or (None if explicit else cfg["eval"]["ijb"]["root"])
    if not paths and not ijb_root:
        raise ConfigError(["nothing to evaluate: pass --bin FILE.bin or --ijb ROOT, or set eval.bin_file "
                           "(or eval.ijb.root) in the config"])
    if save_features and not ijb_root:
        raise ConfigError(["--save-features writes IJB features: pass --ijb ROOT (or set eval.ijb.root) too"])
    for p in paths:
        if not Path(p).is_file():
            raise DataError(f"pair set not found: {p} (from {'--bin' if bins else 'eval.bin_file'})")
    dev = resolve_device(device or cfg["device"])
    backbone.to(dev)
    batch = batch_size or cfg["eval"]["test_batch_size"]
    result = Evaluation(
        name=re.sub(r"[^\w.-]+", "_", name or cfg["model"]["backbone"]),  # safe in a file name
        checkpoint=str(checkpoint), config_source=str(config) if config else "stored in the checkpoint",
        config=cfg, device=str(dev), timestamp=time.strftime("%Y%m%d-%H%M%S"),
        step=ckpt.get("step") if isinstance(ckpt, dict) and isinstance(ckpt.get("step"), int) else None,
        sets=[], log_dir=Path(cfg["logging"]["log_dir"]),
        trackers=Trackers.from_config(cfg), run_dir=_run_dir_of(checkpoint, ckpt),
        tracked=dict(ckpt.get("loggers") or {}) if isinstance(ckpt, dict) else {},
    )
    if paths:
        metrics = build_metrics(cfg)
        for set_name, path in zip(pair_set_names(paths), paths):
            result.sets.append(evaluate_bin(backbone, cfg, set_name, path, metrics, batch, dev, num_workers or 0,
                                            say, warn))
    if ijb_root:
        workers = cfg["data"]["num_workers"] if num_workers is None else num_workers
        result.sets.append(evaluate_ijb(backbone, cfg, str(ijb_root), ijb_target or cfg["eval"]["ijb"]["target"],
                                        batch, dev, workers, save_features, result.features, say, warn))
    return result


def _run_dir_of(checkpoint: str | Path, ckpt: Any) -> Path | None:
    """The training run folder a checkpoint lies in (one with its config.yaml or metrics.jsonl), else None."""
    folder = Path(checkpoint).resolve().parent
    if isinstance(ckpt, dict) and "optimizer" in ckpt and any((folder / f).exists() for f in ("config.yaml", "metrics.jsonl")):
        return folder
    return None


def evaluate_bin(backbone: Any, config: dict, set_name: str, path: str, metrics: list, batch: int, dev: Any,
                 num_workers: int, say: Say = _quiet, warn: Say = _quiet) -> SetResult:
    """One .bin pair set: the metrics, and the cosine ROC of the embeddings the ROC metrics use."""
    from ..core.build import build_pair_set, roc_flip
    from .evaluation import embed, evaluate_embeddings, l2_normalize, roc_curve_points

    dataset = build_pair_set(config, path)
    say(f"evaluating {set_name} ({len(dataset.issame)} pairs) on {dev}...")
    plain, mirrored = embed(backbone, dataset, batch, dev, progress=True, num_workers=num_workers)
    with warnings.catch_warnings(record=True) as caught:  # shown once per set, naming it
        warnings.simplefilter("always")
        values = evaluate_embeddings(plain, mirrored, dataset.issame, metrics)
    out = SetResult(set_name, "pairs", values, warnings=[str(w.message) for w in caught])
    for message in out.warnings:
        warn(f"warning [{set_name}]: {message}")
    issame = list(map(bool, dataset.issame))
    if any(issame) and not all(issame):  # no ROC without both kinds of pairs (the metrics already warned)
        flip = roc_flip(config, metrics)
        out.roc = roc_curve_points(l2_normalize(plain + mirrored if flip else plain), issame)
    return out


def evaluate_ijb(backbone: Any, config: dict, root: str, target: str, batch: int, dev: Any, num_workers: int,
                 save_features: str | Path | None, saved: list[str], say: Say = _quiet,
                 warn: Say = _quiet) -> SetResult:
    """The IJB protocol on one template set; .npy files into ``save_features`` (their paths into ``saved``)."""
    from ..core.build import build_template_set
    from .ijb import TemplateSet, embed_images, evaluate_templates, save_arrays

    options = config["eval"]["ijb"]
    dataset = build_template_set(config, root, target)
    data = TemplateSet.of(dataset, options["dataset"])
    say(f"evaluating {data.name} ({len(dataset):,} images, {len(data.labels):,} template pairs) on {dev} "
        f"with {num_workers} worker(s)...")
    features = embed_images(backbone, dataset, batch, dev, flip=options["flip"], num_workers=num_workers,
                            progress=True)
    files = []
    if save_features:
        files += save_arrays(save_features, data.name, {"image_features": features})
    result = evaluate_templates(features, data, targets=options["far_targets"], norm_score=options["norm_score"],
                                detector_score=options["detector_score"])
    if save_features:
        files += save_arrays(save_features, data.name, {
            "template_ids": result.template_ids, "template_features": result.template_features,
            "pair_scores": result.scores, "pair_labels": data.labels.astype("int8"),
        })
        warn(f"wrote {len(files)} .npy files in {save_features}")
    saved += files
    return SetResult(data.name, "ijb", result.results(), roc=result.roc, ijb=result)


# --- presentation ---------------------------------------------------------------------------

def _fmt(value: Any, digits: int = 4) -> str:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return str(value)
    return "n/a" if not math.isfinite(value) else f"{value:.{digits}f}"


def result_columns(results: dict[str, dict[str, float]]) -> list[str]:
    """Result keys in table order: accuracy, threshold, TAR@FAR (high FAR first), AUC, EER, the rest."""
    keys: list[str] = []
    for values in results.values():
        keys += [k for k in values if k not in keys]
    tars = sorted((k for k in keys if k.startswith("tar@far=")), key=lambda k: -float(k.split("=", 1)[1]))
    fixed = ["accuracy", "best_threshold", *tars, "auc", "eer"]
    return [k for k in fixed if k in keys] + [k for k in keys if k not in fixed and k != "accuracy_std"]


def format_table(results: dict[str, dict[str, float]]) -> str:
    """A plain-text table: one row per pair set; accuracy as percent ± std."""
    columns = result_columns(results)
    titles = {"accuracy": "accuracy (%)", "best_threshold": "threshold", "auc": "AUC", "eer": "EER"}
    header = ["set"] + [titles.get(c, c.replace("tar@far=", "TAR@FAR=")) for c in columns]
    rows = []
    for name, values in results.items():
        row = [name]
        for c in columns:
            v = values.get(c, math.nan)
            if c == "accuracy" and isinstance(v, float) and math.isfinite(v):
                std = values.get("accuracy_std", math.nan)
                row.append(f"{100 * v:.2f} ± {100 * std:.2f}")
            else:
                row.append(_fmt(v, 2 if c == "best_threshold" else 4))
        rows.append(row)
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(v).ljust(w) for v, w in zip(r, widths)).rstrip() for r in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_ijb_table(result: Any) -> str:
    """TAR (%) at each FAR target of an IJB result: the nearest-FPR row (published) and the FPR <= target row."""
    from .ijb import far_label

    header = [f"{result.name} TAR (%) at FAR"] + [far_label(t) for t in result.targets]
    rows = [
        ["nearest FPR (published)"] + [_fmt(100 * v, 2) for v in result.tar],
        ["FPR <= target"] + [_fmt(100 * v, 2) for v in result.tar_strict],
    ]
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(v).rjust(w) if i else str(v).ljust(w) for i, (v, w) in enumerate(zip(r, widths))).rstrip()
             for r in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    summary = (f"{result.images:,} images, {result.templates:,} templates, {result.pairs:,} pairs "
               f"({result.genuine:,} genuine); AUC {_fmt(result.auc)}")
    return "\n".join([*lines, summary])


def json_safe(value: Any) -> Any:
    """NaN/inf become null so the output is strict JSON."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def ijb_report(result: Any, options: dict) -> dict:
    """The JSON block of an IJB result: sizes, options, both TAR readings, timings."""
    from .ijb import far_label

    return {
        "images": result.images, "templates": result.templates, "pairs": result.pairs, "genuine": result.genuine,
        "options": {k: options[k] for k in ("flip", "detector_score", "norm_score")},
        "far_targets": [far_label(t) for t in result.targets],
        "tar_nearest_fpr": result.tar, "fpr_used": result.fpr, "tar_fpr_at_most_target": result.tar_strict,
        "auc": result.auc,
        "convention": "tar_nearest_fpr: TPR at the ROC point whose FPR is nearest each target (largest TPR among "
                      "equally near points), as InsightFace's IJB script and the published tables; "
                      "tar_fpr_at_most_target: the largest TPR with FPR <= target",
        "seconds": {k: round(v, 3) for k, v in result.seconds.items()},
    }


__all__ = ["Evaluation", "SetResult", "evaluate", "format_ijb_table", "format_table", "json_safe", "result_columns"]

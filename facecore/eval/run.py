"""Evaluation as a library: a checkpoint on .bin pair sets, IJB-B/C template sets (1:1 and 1:N) and folder
galleries (1:N), as a result object.

``evaluate(...)`` (``facecore.evaluate``) embeds and scores every set and returns an
:class:`Evaluation`: per set its metrics, its ROC and where its files go. ``Evaluation.write()``
writes the result files (``test_result_<name>_<time>.txt/.json``, one ROC PNG per verification
set, a CMC and a TPIR-vs-FPIR PNG per identification set) and hands them to the loggers of
``logging.loggers``; ``facecore eval`` is ``evaluate`` + ``write`` + printing.

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
    kind: str  # "pairs" (.bin), "ijb" (template set, 1:1) or "identification" (IJB 1:N, folder galleries)
    metrics: dict[str, float]
    roc: Any = None  # evaluation.RocCurve
    plot: Path | None = None  # written by Evaluation.write()
    ijb: Any = None  # ijb.IJBResult for template sets
    warnings: list[str] = field(default_factory=list)
    identification: Any = None  # identification_report.IdentificationResult
    plots: list[Path] = field(default_factory=list)  # the CMC and TPIR PNGs, written by Evaluation.write()


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
    runtime: str = "torch"  # what embedded: "torch", or "onnxruntime (float32|int8 ...)" for --onnx
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
            "runtime": self.runtime,
            "timestamp": self.timestamp,
            "step": self.step,
            "results": self.results,
            "roc_plots": {s.name: str(s.plot) for s in self.sets if s.plot is not None},
        }
        ijb = [s for s in self.sets if s.ijb is not None]
        if ijb:
            out["ijb"] = {s.name: ijb_report(s.ijb, self.config["eval"]["ijb"]) for s in ijb}
        found = [s for s in self.sets if s.identification is not None]
        if found:
            out["identification"] = {s.name: s.identification.report() for s in found}
            out["identification_plots"] = {s.name: [str(p) for p in s.plots] for s in found if s.plots}
        return out

    def table(self) -> str:
        """The printed result: one table of the pair sets, one per IJB set."""
        pairs = {s.name: s.metrics for s in self.sets if s.kind == "pairs"}
        tables = ([format_table(pairs)] if pairs else []) + [format_ijb_table(s.ijb) for s in self.sets if s.ijb]
        tables += [s.identification.table() for s in self.sets if s.identification is not None]
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
        for s in self.sets:
            if s.identification is not None:
                s.plots = s.identification.plot(self.log_dir, f"{self.name}_{s.name}_{self.timestamp}")
        header = (f"# facecore eval of {self.checkpoint} ({self.config['model']['backbone']}) on {self.device} "
                  f"with {self.runtime}, "
                  f"{self.timestamp}: {', '.join(self.results)}")
        txt, js = Path(f"{self.base}.txt"), Path(f"{self.base}.json")
        txt.write_text("\n".join([header, self.table(), ""]))
        js.write_text(json.dumps(json_safe(self.report()), indent=2) + "\n")
        self.log_to_trackers(js)
        return [txt, js, *(s.plot for s in self.sets if s.plot is not None), *(p for s in self.sets for p in s.plots)]

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
            for plot in s.plots:  # 1:N: the CMC and TPIR-vs-FPIR curves
                self.trackers.artifact(f"identification/{plot.stem}", plot, "image", step)
        self.trackers.artifact("eval/result", report, "file", step)
        self.trackers.finish("finished")


def evaluate(
    checkpoint: str | Path | None = None,
    config: str | Path | None = None,
    *,
    onnx: str | Path | None = None,
    bins: Sequence[str | Path] = (),
    ijb_root: str | Path | None = None,
    ijb_target: str | None = None,
    ijb_protocol: str | None = None,
    gallery: str | Path | None = None,
    probe: str | Path | None = None,
    distractors: str | Path | None = None,
    per_image: bool = False,
    overrides: Sequence[str] = (),
    name: str | None = None,
    batch_size: int | None = None,
    device: str | None = None,
    num_workers: int | None = None,
    save_features: str | Path | None = None,
    say: Say | None = None,
    warn: Say | None = None,
) -> Evaluation:
    """Evaluate a checkpoint: verification on .bin pair sets, IJB 1:1 and 1:N on template sets, 1:N on folders.

    With ``bins``, ``ijb_root`` or ``gallery`` only those sets; with none, ``eval.bin_file`` and
    ``eval.ijb.root`` of the config (``config``, a YAML path, defaults to the one stored in the
    checkpoint). ``ijb_protocol`` (default ``eval.ijb.protocol``): 1:1, 1:N, both, or auto (1:1,
    and 1:N when its meta files are there). ``gallery``/``probe`` (both or neither) and
    ``distractors`` are image folders (facecore.eval.gallery); ``per_image`` keeps one gallery
    entry and one probe per image instead of one template per identity. ``save_features`` writes
    features, scores and ranks as .npy files. ``say`` gets progress lines, ``warn`` warnings and
    notes (both silent by default). Nothing else is written: call ``.write()`` on the result.

    ``onnx`` instead of ``checkpoint``: a facecore ONNX export (float32 or int8), embedded with
    ONNX Runtime on the CPU through the same pass, with the config stored in it unless ``config``.
    """
    from ..core.build import build_metrics, pair_set_names, pair_set_paths
    from ..core.loggers import Trackers
    from .evaluation import load_trained_backbone, resolve_device

    say, warn = say or _quiet, warn or _quiet
    if (checkpoint is None) == (onnx is None):
        raise ConfigError(["pass either a checkpoint (--checkpoint) or an ONNX export (--onnx), not "
                           + ("both" if onnx is not None else "neither")])
    if device:
        resolve_device(device)  # a bad device fails before the checkpoint is read
    runtime = "torch"
    if onnx is not None:
        backbone, cfg, ckpt = load_onnx_model(onnx, config, overrides, device)
        runtime = f"onnxruntime {backbone.precision}"
        say(f"model: {backbone.describe}")
        device = "cpu"
    else:
        backbone, cfg, ckpt = load_trained_backbone(checkpoint, config, overrides)
    if bool(gallery) != bool(probe):
        raise ConfigError(["--gallery and --probe go together: pass both folders (and --distractors DIR if any)"])
    if (distractors or per_image) and not gallery:
        raise ConfigError(["--distractors and --per-image belong to a folder gallery: pass --gallery DIR and "
                           "--probe DIR too"])
    explicit = bool(bins or ijb_root or gallery)
    paths = [str(b) for b in bins] if explicit else pair_set_paths(cfg)
    ijb_root = ijb_root or (None if explicit else cfg["eval"]["ijb"]["root"])
    if not paths and not ijb_root and not gallery:
        raise ConfigError(["nothing to evaluate: pass --bin FILE.bin, --ijb ROOT or --gallery DIR --probe DIR, "
                           "or set eval.bin_file (or eval.ijb.root) in the config"])
    if save_features and not (ijb_root or gallery):
        raise ConfigError(["--save-features writes IJB or gallery features: pass --ijb ROOT (or set eval.ijb.root) "
                           "or --gallery DIR --probe DIR too"])
    protocol = ijb_protocol or cfg["eval"]["ijb"]["protocol"]
    for p in paths:
        if not Path(p).is_file():
            raise DataError(f"pair set not found: {p} (from {'--bin' if bins else 'eval.bin_file'})")
    dev = resolve_device(device or cfg["device"])
    if onnx is None:
        backbone.to(dev)
    batch = batch_size or cfg["eval"]["test_batch_size"]
    result = Evaluation(
        name=re.sub(r"[^\w.-]+", "_", name or cfg["model"]["backbone"]),  # safe in a file name
        checkpoint=str(checkpoint if onnx is None else onnx),
        config_source=str(config) if config else f"stored in the {'checkpoint' if onnx is None else 'ONNX model'}",
        config=cfg, device=str(dev), timestamp=time.strftime("%Y%m%d-%H%M%S"),
        step=ckpt.get("step") if isinstance(ckpt, dict) and isinstance(ckpt.get("step"), int) else None,
        sets=[], log_dir=Path(cfg["logging"]["log_dir"]), runtime=runtime,
        trackers=Trackers.from_config(cfg), run_dir=None if onnx is not None else _run_dir_of(checkpoint, ckpt),
        tracked=dict(ckpt.get("loggers") or {}) if isinstance(ckpt, dict) else {},
    )
    if paths:
        metrics = build_metrics(cfg)
        for set_name, path in zip(pair_set_names(paths), paths):
            result.sets.append(evaluate_bin(backbone, cfg, set_name, path, metrics, batch, dev, num_workers or 0,
                                            say, warn))
    workers = cfg["data"]["num_workers"] if num_workers is None else num_workers
    if ijb_root:
        result.sets += evaluate_ijb(backbone, cfg, str(ijb_root), ijb_target or cfg["eval"]["ijb"]["target"],
                                    batch, dev, workers, save_features, result.features, say, warn, protocol=protocol)
    if gallery:
        result.sets.append(evaluate_gallery(backbone, cfg, gallery, probe, distractors, per_image, batch, dev,
                                            workers, save_features, result.features, say, warn))
    return result


def load_onnx_model(path: str | Path, config: str | Path | None, overrides: Sequence[str],
                    device: str | None) -> tuple[Any, dict, dict]:
    """``(OnnxModel, effective config, {})`` for ``evaluate(onnx=...)``: the config given, else the one stored in it."""
    from ..core.config import apply_overrides, load_config, validate_config
    from .onnx_runtime import OnnxModel

    if device not in (None, "cpu", "auto"):
        raise ConfigError([f"--device {device}: an ONNX model runs on ONNX Runtime's CPU provider; "
                           "leave --device out or pass cpu"])
    model = OnnxModel(path)
    if config is not None:
        cfg = load_config(str(config), list(overrides))
    elif model.config is not None:
        cfg = validate_config(apply_overrides(model.config, overrides), f"{path} (stored config)")
    else:
        raise DataError(f"{path} holds no facecore config: pass --config with the data and eval sections to use")
    if cfg["data"]["img_size"] != model.img_size:
        raise DataError(f"{path} takes {model.img_size}x{model.img_size} images but data.img_size is "
                        f"{cfg['data']['img_size']}: set data.img_size: {model.img_size}")
    return model, cfg, {}


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
                 warn: Say = _quiet, *, protocol: str = "auto") -> list[SetResult]:
    """The IJB protocols on one template set: 1:1 (set ``<target>``) and/or 1:N (set ``<target>-1N``), as
    ``protocol`` asks; one embedding pass and one pooling serve both. .npy files into ``save_features``
    (their paths into ``saved``)."""
    from ..core.build import build_template_set
    from ..errors import PluginError
    from .ijb import TemplateSet, embed_images, evaluate_templates, pool_templates, save_arrays, weight_features
    from .ijb_1n import identification

    options = config["eval"]["ijb"]
    dataset = build_template_set(config, root, target, protocol)
    data = TemplateSet.of(dataset, options["dataset"])
    galleries, probes = getattr(dataset, "galleries", None), getattr(dataset, "probes", None)
    one_to_n = galleries is not None and probes is not None
    if protocol in ("1:N", "both") and not one_to_n:
        raise PluginError(f"eval.ijb.protocol is {protocol} but the template set '{options['dataset']}' provides no "
                          "1:N galleries and probes (attributes 'galleries' and 'probes'; see docs/writing-plugins.md)")
    one_to_one = protocol != "1:N" and len(data.labels) > 0
    what = [f"{len(data.labels):,} template pairs"] if one_to_one else []
    if one_to_n:
        what.append(f"1:N: {len(probes):,} probes, galleries " + ", ".join(f"{g} {len(t):,}" for g, t in galleries.items()))
    say(f"evaluating {data.name} ({len(dataset):,} images; {'; '.join(what)}) on {dev} with {num_workers} worker(s)...")
    features = embed_images(backbone, dataset, batch, dev, flip=options["flip"], num_workers=num_workers,
                            progress=True)
    files, out = [], []
    if save_features:
        files += save_arrays(save_features, data.name, {"image_features": features})
    if one_to_one:
        result = evaluate_templates(features, data, targets=options["far_targets"], norm_score=options["norm_score"],
                                    detector_score=options["detector_score"])
        template_ids, template_features = result.template_ids, result.template_features
        if save_features:
            files += save_arrays(save_features, data.name, {
                "template_ids": result.template_ids, "template_features": result.template_features,
                "pair_scores": result.scores, "pair_labels": data.labels.astype("int8"),
            })
        out.append(SetResult(data.name, "ijb", result.results(), roc=result.roc, ijb=result))
    else:
        weighted = weight_features(features, data.scores, norm_score=options["norm_score"],
                                   detector_score=options["detector_score"])
        template_ids, template_features = pool_templates(weighted, data.templates, data.medias)
    if one_to_n:
        found = identification(template_ids, template_features, galleries, probes, f"{data.name} 1:N")
        name = f"{data.name}-1N"
        if save_features:
            more, notes = found.save(save_features, name)
            files += more
            for note in notes:
                warn(note)
        out.append(SetResult(name, "identification", found.results(), identification=found))
    if save_features:
        warn(f"wrote {len(files)} .npy files in {save_features}")
    saved += files
    return out


def evaluate_gallery(backbone: Any, config: dict, gallery: str | Path, probe: str | Path, distractors: Any,
                     per_image: bool, batch: int, dev: Any, num_workers: int, save_features: str | Path | None,
                     saved: list[str], say: Say = _quiet, warn: Say = _quiet) -> SetResult:
    """1:N on folders of aligned images (facecore.eval.gallery); .npy files into ``save_features``."""
    from .gallery import evaluate_folders

    found = evaluate_folders(backbone, config, gallery, probe, distractors, per_image=per_image, batch_size=batch,
                             device=dev, num_workers=num_workers, say=say)
    name = re.sub(r"[^\w.-]+", "_", found.name)
    if save_features:
        files, notes = found.save(save_features, name)
        for note in notes:
            warn(note)
        warn(f"wrote {len(files)} .npy files in {save_features}")
        saved += files
    return SetResult(name, "identification", found.results(), identification=found)


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
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
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


__all__ = ["Evaluation", "SetResult", "evaluate", "load_onnx_model", "format_ijb_table", "format_table", "json_safe", "result_columns"]

"""``facecore eval``: verification results of a checkpoint on .bin pair sets and IJB-B/C template sets,
as tables, files and ROC plots.

No torch/numpy import at module level (keeps ``facecore --help`` fast).
"""

from __future__ import annotations

import json
import math
import re
import time
import warnings
from pathlib import Path
from typing import Any

import click

from . import set_option, user_errors


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
    from ..eval.ijb import far_label

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




@click.command("eval")
@click.option("--config", "config_path", type=click.Path(dir_okay=False),
              help="YAML config; defaults to the config stored in the checkpoint.")
@click.option("--checkpoint", "checkpoint_path", required=True, type=click.Path(dir_okay=False),
              help="best.pth / last.pth of 'facecore train', or a bare backbone state dict (needs --config).")
@click.option("--bin", "bins", multiple=True, type=click.Path(dir_okay=False),
              help="A .bin pair set (repeatable); defaults to eval.bin_file of the config.")
@click.option("--ijb", "ijb_root", type=click.Path(file_okay=False), metavar="ROOT",
              help="An IJB release folder (IJBC/meta, IJBC/loose_crop): run the IJB 1:1 protocol on it "
                   "(defaults to eval.ijb.root of the config).")
@click.option("--ijb-target", type=click.Choice(["IJBC", "IJBB"]), help="IJBC or IJBB (default: eval.ijb.target).")
@click.option("--save-features", type=click.Path(file_okay=False),
              help="Write the IJB image features, template features and pair scores as .npy files here.")
@click.option("--name", help="Name in the result file names; defaults to the backbone name.")
@click.option("--batch-size", type=click.IntRange(min=1), help="Images per forward pass (default: eval.test_batch_size).")
@click.option("--device", help="auto, cpu, cuda or cuda:N (default: the config's device).")
@click.option("--num-workers", type=click.IntRange(min=0),
              help="DataLoader workers (default: 0 for .bin sets, data.num_workers for IJB).")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON on stdout instead of a table.")
@set_option
@user_errors
def eval_command(config_path: str | None, checkpoint_path: str, bins: tuple[str, ...], ijb_root: str | None,
                 ijb_target: str | None, save_features: str | None, name: str | None, batch_size: int | None,
                 device: str | None, num_workers: int | None, as_json: bool, overrides: tuple[str, ...]) -> None:
    """Evaluate a checkpoint on .bin pair sets and IJB-B/C: accuracy, TAR@FAR, AUC, EER and ROC plots.

    With --bin or --ijb only those sets are evaluated; with neither, eval.bin_file and
    eval.ijb.root of the config. Writes test_result_<name>_<time>.txt/.json and one ROC PNG
    per set into logging.log_dir, and adds them to TensorBoard when logging.tensorboard is on.
    IJB TAR@FAR is read at the ROC point whose FPR is nearest each target (the convention of
    the published tables), with the FPR <= target value beside it.
    """
    from ..core.build import build_metrics, pair_set_paths
    from ..errors import ConfigError, DataError
    from ..eval.evaluation import load_trained_backbone, resolve_device

    if device:
        resolve_device(device)  # a bad --device fails before the checkpoint is read
    backbone, config, ckpt = load_trained_backbone(checkpoint_path, config_path, overrides)
    explicit = bool(bins or ijb_root)
    paths = list(bins) if explicit else pair_set_paths(config)
    ijb_cfg = config["eval"]["ijb"]
    ijb_root = ijb_root or (None if explicit else ijb_cfg["root"])
    if not paths and not ijb_root:
        raise ConfigError(["nothing to evaluate: pass --bin FILE.bin or --ijb ROOT, or set eval.bin_file "
                           "(or eval.ijb.root) in the config"])
    if save_features and not ijb_root:
        raise ConfigError(["--save-features writes IJB features: pass --ijb ROOT (or set eval.ijb.root) too"])
    for p in paths:
        if not Path(p).is_file():
            source = "--bin" if bins else "eval.bin_file"
            raise DataError(f"pair set not found: {p} (from {source})")
    dev = resolve_device(device or config["device"])
    backbone.to(dev)
    batch = batch_size or config["eval"]["test_batch_size"]
    name = re.sub(r"[^\w.-]+", "_", name or config["model"]["backbone"])  # safe in a file name
    stamp = time.strftime("%Y%m%d-%H%M%S")
    log_dir = Path(config["logging"]["log_dir"])
    log_dir.mkdir(parents=True, exist_ok=True)

    results: dict[str, dict[str, float]] = {}
    plots: dict[str, str] = {}
    images: dict[str, Any] = {}
    if paths:
        metrics = build_metrics(config)
        _evaluate_bins(backbone, config, paths, metrics, batch, dev, num_workers or 0, name, stamp, log_dir,
                       as_json, results, plots, images)
    ijb_results = []
    if ijb_root:
        target = ijb_target or ijb_cfg["target"]
        workers = config["data"]["num_workers"] if num_workers is None else num_workers
        ijb_results.append(_evaluate_ijb(backbone, config, ijb_root, target, batch, dev, workers, name, stamp,
                                          log_dir, save_features, as_json, results, plots, images))

    report = {
        "name": name,
        "checkpoint": str(checkpoint_path),
        "config": str(config_path) if config_path else "stored in the checkpoint",
        "backbone": config["model"]["backbone"],
        "device": str(dev),
        "timestamp": stamp,
        "step": ckpt.get("step") if isinstance(ckpt, dict) and isinstance(ckpt.get("step"), int) else None,
        "results": results,
        "roc_plots": plots,
    }
    if ijb_results:
        report["ijb"] = {r.name: _ijb_report(r, ijb_cfg) for r in ijb_results}
    bin_results = {k: v for k, v in results.items() if k not in report.get("ijb", {})}
    tables = ([format_table(bin_results)] if bin_results else []) + [format_ijb_table(r) for r in ijb_results]
    table = "\n\n".join(tables)
    base = log_dir / f"test_result_{name}_{stamp}"
    sets = ", ".join(results)
    header = [f"# facecore eval of {checkpoint_path} ({config['model']['backbone']}) on {dev}, {stamp}: {sets}"]
    Path(f"{base}.txt").write_text("\n".join(header + [table, ""]))
    Path(f"{base}.json").write_text(json.dumps(json_safe(report), indent=2) + "\n")
    if config["logging"]["tensorboard"]:
        _to_tensorboard(log_dir / "tensorboard" / name / f"eval_{stamp}", results, images, report["step"] or 0)

    if as_json:
        click.echo(json.dumps(json_safe(report), indent=2))
    else:
        click.echo(table)
        click.echo(f"\nwrote {base}.txt, {base}.json and {len(plots)} ROC plot(s) in {log_dir}", err=True)


def _evaluate_bins(backbone: Any, config: dict, paths: list[str], metrics: list, batch: int, dev: Any,
                   num_workers: int, name: str, stamp: str, log_dir: Path, as_json: bool,
                   results: dict, plots: dict, images: dict) -> None:
    """Each .bin pair set: metrics into ``results``, a ROC PNG into ``plots`` / ``images``."""
    from ..core.build import build_pair_set
    from ..eval.evaluation import embed, evaluate_embeddings, l2_normalize, pair_set_names, roc_curve_points
    from ..eval.roc_plot import plot_roc

    flip = next((bool(getattr(m, "flip", True)) for n, m in metrics if n == "tar_at_far"), True)
    for set_name, path in zip(pair_set_names(paths), paths):
        dataset = build_pair_set(config, path)
        if not as_json:
            click.echo(f"evaluating {set_name} ({len(dataset.issame)} pairs) on {dev}...", err=True)
        plain, mirrored = embed(backbone, dataset, batch, dev, progress=True, num_workers=num_workers)
        with warnings.catch_warnings(record=True) as caught:  # shown once per set, naming it
            warnings.simplefilter("always")
            results[set_name] = evaluate_embeddings(plain, mirrored, dataset.issame, metrics)
        for w in caught:
            click.echo(f"warning [{set_name}]: {w.message}", err=True)
        issame = list(map(bool, dataset.issame))
        if all(issame) or not any(issame):
            continue  # no ROC without both kinds of pairs (the metrics already warned)
        roc = roc_curve_points(l2_normalize(plain + mirrored if flip else plain), issame)
        png = log_dir / f"roc_{name}_{set_name}_{stamp}.png"
        images[set_name] = plot_roc({set_name: roc}, png, title=f"ROC of {name} on {set_name}")
        plots[set_name] = str(png)


def _evaluate_ijb(backbone: Any, config: dict, root: str, target: str, batch: int, dev: Any, num_workers: int,
                  name: str, stamp: str, log_dir: Path, save_features: str | None, as_json: bool,
                  results: dict, plots: dict, images: dict) -> Any:
    """The IJB protocol on one template set: numbers into ``results``, its ROC PNG, optional .npy files."""
    from ..core.build import build_template_set
    from ..eval.ijb import TemplateSet, embed_images, evaluate_templates, save_arrays
    from ..eval.roc_plot import plot_roc

    options = config["eval"]["ijb"]
    dataset = build_template_set(config, root, target)
    data = TemplateSet.of(dataset, config["eval"]["ijb"]["dataset"])
    if not as_json:
        click.echo(f"evaluating {data.name} ({len(dataset):,} images, {len(data.labels):,} template pairs) on {dev} "
                   f"with {num_workers} worker(s)...", err=True)
    features = embed_images(backbone, dataset, batch, dev, flip=options["flip"], num_workers=num_workers,
                            progress=True)
    saved = []
    if save_features:
        saved += save_arrays(save_features, data.name, {"image_features": features})
    result = evaluate_templates(features, data, targets=options["far_targets"], norm_score=options["norm_score"],
                                detector_score=options["detector_score"])
    if save_features:
        saved += save_arrays(save_features, data.name, {
            "template_ids": result.template_ids, "template_features": result.template_features,
            "pair_scores": result.scores, "pair_labels": data.labels.astype("int8"),
        })
        click.echo(f"wrote {len(saved)} .npy files in {save_features}", err=True)
    results[data.name] = result.results()
    png = log_dir / f"roc_{name}_{data.name}_{stamp}.png"
    images[data.name] = plot_roc({data.name: result.roc}, png, title=f"ROC of {name} on {data.name}")
    plots[data.name] = str(png)
    return result


def _ijb_report(result: Any, options: dict) -> dict:
    """The JSON block of an IJB result: sizes, options, both TAR readings, timings."""
    from ..eval.ijb import far_label

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


def _to_tensorboard(tb_dir: Path, results: dict, images: dict, step: int) -> None:
    """Scalars per set and metric, and the ROC images."""
    import numpy as np
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tb_dir))
    try:
        for set_name, values in results.items():
            for key, value in values.items():
                if math.isfinite(value):
                    writer.add_scalar(f"eval/{set_name}/{key}", value, step)
        for set_name, img in images.items():
            writer.add_image(f"roc/{set_name}", np.asarray(img), step, dataformats="HWC")
    finally:
        writer.close()

"""``facecore eval``: verification results of a checkpoint on .bin pair sets, as a table, files and ROC plots.

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


def json_safe(value: Any) -> Any:
    """NaN/inf become null so the output is strict JSON."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _set_names(paths: list[str]) -> list[str]:
    names: list[str] = []
    for p in paths:
        stem, n = Path(p).stem, 2
        name = stem
        while name in names:
            name, n = f"{stem}-{n}", n + 1
        names.append(name)
    return names


@click.command("eval")
@click.option("--config", "config_path", type=click.Path(dir_okay=False),
              help="YAML config; defaults to the config stored in the checkpoint.")
@click.option("--checkpoint", "checkpoint_path", required=True, type=click.Path(dir_okay=False),
              help="best.pth / last.pth of 'facecore train', or a bare backbone state dict (needs --config).")
@click.option("--bin", "bins", multiple=True, type=click.Path(dir_okay=False),
              help="A .bin pair set (repeatable); defaults to eval.bin_file of the config.")
@click.option("--name", help="Name in the result file names; defaults to the backbone name.")
@click.option("--batch-size", type=click.IntRange(min=1), help="Images per forward pass (default: eval.test_batch_size).")
@click.option("--device", help="auto, cpu, cuda or cuda:N (default: the config's device).")
@click.option("--num-workers", type=click.IntRange(min=0), default=0, show_default=True, help="DataLoader workers.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON on stdout instead of a table.")
@set_option
@user_errors
def eval_command(config_path: str | None, checkpoint_path: str, bins: tuple[str, ...], name: str | None,
                 batch_size: int | None, device: str | None, num_workers: int, as_json: bool,
                 overrides: tuple[str, ...]) -> None:
    """Evaluate a checkpoint on .bin pair sets: 10-fold accuracy, TAR@FAR, AUC, EER and ROC plots.

    Writes test_result_<name>_<time>.txt/.json and one ROC PNG per set into logging.log_dir,
    and adds them to TensorBoard when logging.tensorboard is on.
    """
    from ..core.build import build_metrics, build_pair_set, pair_set_paths
    from ..errors import ConfigError, DataError
    from ..eval.evaluation import (
        embed,
        evaluate_embeddings,
        l2_normalize,
        load_trained_backbone,
        resolve_device,
        roc_curve_points,
    )
    from ..eval.roc_plot import plot_roc

    if device:
        resolve_device(device)  # a bad --device fails before the checkpoint is read
    backbone, config, ckpt = load_trained_backbone(checkpoint_path, config_path, overrides)
    paths = list(bins) or pair_set_paths(config)
    if not paths:
        raise ConfigError(["no pair sets to evaluate: pass --bin FILE.bin or set eval.bin_file in the config"])
    for p in paths:
        if not Path(p).is_file():
            source = "--bin" if bins else "eval.bin_file"
            raise DataError(f"pair set not found: {p} (from {source})")
    dev = resolve_device(device or config["device"])
    backbone.to(dev)
    metrics = build_metrics(config)
    batch = batch_size or config["eval"]["test_batch_size"]
    name = re.sub(r"[^\w.-]+", "_", name or config["model"]["backbone"])  # safe in a file name
    stamp = time.strftime("%Y%m%d-%H%M%S")
    log_dir = Path(config["logging"]["log_dir"])
    log_dir.mkdir(parents=True, exist_ok=True)
    flip = next((bool(getattr(m, "flip", True)) for n, m in metrics if n == "tar_at_far"), True)

    results: dict[str, dict[str, float]] = {}
    plots: dict[str, str] = {}
    images = {}
    for set_name, path in zip(_set_names(paths), paths):
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
    table = format_table(results)
    base = log_dir / f"test_result_{name}_{stamp}"
    header = [f"# facecore eval of {checkpoint_path} ({config['model']['backbone']}) on {dev}, {stamp}"]
    Path(f"{base}.txt").write_text("\n".join(header + [table, ""]))
    Path(f"{base}.json").write_text(json.dumps(json_safe(report), indent=2) + "\n")
    if config["logging"]["tensorboard"]:
        _to_tensorboard(log_dir / "tensorboard" / name / f"eval_{stamp}", results, images, report["step"] or 0)

    if as_json:
        click.echo(json.dumps(json_safe(report), indent=2))
    else:
        click.echo(table)
        click.echo(f"\nwrote {base}.txt, {base}.json and {len(plots)} ROC plot(s) in {log_dir}", err=True)


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

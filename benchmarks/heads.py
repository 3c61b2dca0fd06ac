"""Every margin head on the quick start: held-out accuracy on clean and degraded pairs, time per step vs arcface.

Quality: the quick start (configs/quickstart.yaml: the small fastcontextface, 2 epochs, same seed,
optimizer, schedule and data) with only the head changed. The authors' defaults (s 64, m 0.5 and
the like) are made for ResNets trained for days; at this scale each head gets 2-3 candidate
settings (CANDIDATES: the plugin's defaults, which are the authors', and scaled-down ones) and the
one with the best mean accuracy on a *validation* pair set (clean and degraded) of other identities
(identity stream VALIDATION_STREAM, never trained or tested on) is chosen; only the chosen run is
then evaluated on the held-out pairs of `facecore demo-data` (test.bin, test_degraded.bin).

Cost: one training step (forward, backward, AdamW; batch 64, random images, 500 classes) of the
quick-start model with each head, all heads in turn within each round so that the machine's load
is the same for all; the ratio to arcface's step in the same round, median over the rounds. The
classifier-and-head part alone (fixed embeddings) is timed the same way, since the backbone is
most of a step.

Torch runs on one thread (--threads): on a shared 2-core machine two threads spend much of their
time waiting for each other (a quick-start step took 2-3x longer with 2 threads at load 14).

    facecore demo-data data/quickstart --pairs 2000 --degraded
    python benchmarks/heads.py                           # every registered head (elasticface as 3 variants)
    python benchmarks/heads.py --heads arcface magface   # some of them
    python benchmarks/heads.py --part cost               # only the timing
    python benchmarks/heads.py --candidates 2            # the first 2 candidates of each head only

Runs are kept under --out (one JSON each) and reused, so a second call adds what is missing. Copies
started at once share the runs (a marker file per run says who trains it); each prints the rows
whose runs are all done, so the last one to finish, or a later call, prints the whole table:

    for i in 1 2; do python benchmarks/heads.py --part quality > heads-$i.log & done; wait
    python benchmarks/heads.py
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

import facecore
from facecore.core.build import build_backbone, build_head
from facecore.core.config import apply_overrides, read_yaml, validate_config
from facecore.data.degrade import degrade_folder
from facecore.data.packing import pack_bin
from facecore.data.synthetic import generate_identity_folder, write_pairs
from facecore.train.classifier import MarginClassifier

ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = ROOT / "configs" / "quickstart.yaml"
VALIDATION_STREAM = 5  # identities of their own: demo-data uses 0 (train) and 1 (test), finetune.py 2-4
# A row of the table: a registered head with fixed options. A head not named here is one row with no fixed options.
VARIANTS = {
    "elasticface": {"type": "elasticface", "kind": "arc"},
    "elasticface-cos": {"type": "elasticface", "kind": "cos"},
    "elasticface-cos+": {"type": "elasticface", "kind": "cos", "plus": True},
}
# Candidate settings per row, in the order they are tried: the first that is tried is a guess for this scale
# (the quick start's cosface has s 16, m 0.1), then the plugin's defaults (the authors', {}), then a middle one.
# A head missing here gets its defaults only.
SMALL_ARC, MID_ARC = {"scale": 16.0, "margin": 0.2}, {"scale": 32.0, "margin": 0.3}
SMALL_COS, MID_COS = {"scale": 16.0, "margin": 0.1}, {"scale": 32.0, "margin": 0.2}
CANDIDATES = {
    "arcface": [SMALL_ARC, {}, MID_ARC],
    "cosface": [SMALL_COS, {}, MID_COS],
    "combined": [{"scale": 16.0, "m2": 0.1, "m3": 0.05}, {}, {"scale": 32.0, "m2": 0.2, "m3": 0.1}],
    "adaface": [SMALL_ARC, {}, MID_ARC],
    "curricularface": [SMALL_ARC, {}, MID_ARC],
    "magface": [{"scale": 16.0, "l_m": 0.1, "u_m": 0.3}, {}, {"scale": 32.0, "l_m": 0.2, "u_m": 0.5}],
    "subcenter_arcface": [SMALL_ARC, {}, MID_ARC],
    "elasticface": [SMALL_ARC, {}, MID_ARC],
    "elasticface-cos": [SMALL_COS, {}, MID_COS],
    "elasticface-cos+": [SMALL_COS, {}, MID_COS],
    "sphereface2": [SMALL_ARC, {}, MID_ARC],  # its m acts on the adjusted cosine; r (scale) 40 by default
    "uniface": [SMALL_COS, {}, MID_COS],
}


def rows(names: list[str] | None) -> dict[str, dict]:
    """Table rows (name -> head section without num_classes) for the given names, or for every registered head."""
    registered = facecore.available("heads")
    expanded = {}
    for head in registered:
        variants = {k: v for k, v in VARIANTS.items() if v["type"] == head}
        expanded.update(variants or {head: {"type": head}})
    if not names:
        return expanded
    unknown = [n for n in names if n not in expanded]
    if unknown:
        raise SystemExit(f"--heads: unknown {', '.join(unknown)}; known: {', '.join(expanded)}")
    return {n: expanded[n] for n in names}


def claim(marker: Path) -> bool:
    """Take ``marker`` for this process (False while another live process holds it): copies share the work."""
    marker.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                os.kill(int(marker.read_text() or 0), 0)
                return False
            except (ProcessLookupError, ValueError):  # its process is gone: take it over
                marker.unlink(missing_ok=True)
            except FileNotFoundError:
                pass
            continue
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        return True
    return False


def validation_pairs(work: Path, seed: int, identities: int, pairs: int) -> Path:
    """val.bin and val_degraded.bin: pairs of ``identities`` identities no demo-data set holds."""
    done = work / "done"
    while not done.exists() and not claim(work / "running"):
        time.sleep(5)  # another copy is writing them
    if not done.exists():
        generate_identity_folder(work / "val_images", identities, 10, seed=seed, stream=VALIDATION_STREAM, progress=False)
        degrade_folder(work / "val_images", work / "val_degraded_images", seed=seed)
        for name in ("val", "val_degraded"):
            write_pairs(work / f"{name}_images", work / f"{name}_pairs.txt", pairs, seed=seed)
            pack_bin(work / f"{name}_pairs.txt", work / f"{name}.bin", progress=False)
        done.write_text("ok\n")
        (work / "running").unlink()
    return work


def head_config(head: dict, data: Path, val: Path, out: Path, epochs: int | None) -> dict:
    """The quick start with ``head`` as its head section, validated at its end on the validation pairs."""
    raw = read_yaml(QUICKSTART)
    raw["head"] = dict(head)
    bins = [val / "val.bin", val / "val_degraded.bin"]
    overrides = [f"data.root={data / 'train'}", f"eval.bin_file=[{', '.join(map(str, bins))}]", "eval.at_start=false",
                 f"checkpoint.save_dir={out}", f"logging.log_dir={out / 'logs'}", "logging.tensorboard=false"]
    if epochs:
        overrides += [f"training.epochs={epochs}", f"eval.eval_freq={epochs}"]
    return validate_config(apply_overrides(raw, overrides))


def setting_text(options: dict) -> str:
    return ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in options.items()) or "defaults"


def train_one(row: str, head: dict, options: dict, data: Path, val: Path, out: Path, epochs: int | None) -> dict | None:
    """One training run (or its saved result): accuracy on the validation pairs; None while another copy runs it."""
    key = f"{row}__{f'{epochs}ep' if epochs else 'config-epochs'}__{setting_text(options).replace(' ', '').replace(',', '_')}"
    result_file = out / f"{key}.json"
    if result_file.exists():
        return json.loads(result_file.read_text())
    if not claim(out / f"{key}.running"):
        return None
    from facecore.train.trainer import train

    cfg = head_config({**head, **options}, data, val, out / key, epochs)
    start, load = time.perf_counter(), os.getloadavg()[0]
    try:
        summary = train(cfg, verbose=False)
    finally:
        (out / f"{key}.running").unlink()
    metrics = summary["val_metrics"]
    result = {"row": row, "head": head, "options": options, "epochs": cfg["training"]["epochs"],
              "steps": summary["step"], "minutes": (time.perf_counter() - start) / 60, "load": [load, os.getloadavg()[0]],
              "checkpoint": str(Path(summary["run_dir"]) / "last.pth"), "file": str(result_file),
              **{s: (metrics[s]["accuracy"], metrics[s]["accuracy_std"]) for s in ("val", "val_degraded")}}
    result_file.write_text(json.dumps(result, indent=2) + "\n")
    return result


def held_out(run: dict, data: Path) -> dict:
    """Accuracy of a run's last checkpoint on test.bin and test_degraded.bin (saved in the run's result file)."""
    if "test" not in run:
        evaluation = facecore.evaluate(run["checkpoint"], bins=[data / "test.bin", data / "test_degraded.bin"])
        for name, values in evaluation.results.items():
            run[name] = (values["accuracy"], values["accuracy_std"])
        Path(run["file"]).write_text(json.dumps(run, indent=2) + "\n")
    return run


def quality(names: dict[str, dict], data: Path, test: Path, val: Path, out: Path, epochs: int | None, candidates: int) -> dict:
    """Train every row's candidates (each row's first, then each row's second...), choose on val, test the choice."""
    runs: dict[str, list[dict]] = {row: [] for row in names}
    for i in range(candidates):
        for row, head in names.items():
            options = CANDIDATES.get(row, [{}])
            if i >= len(options):
                continue
            r = train_one(row, head, options[i], data, val, out, epochs)
            runs[row].append(r)
            if r is None:
                print(f"  {row:18s} {setting_text(options[i]):34s} another copy is training it", flush=True)
                continue
            print(f"  {row:18s} {setting_text(options[i]):34s} validation: clean {100 * r['val'][0]:5.1f}%  degraded "
                  f"{100 * r['val_degraded'][0]:5.1f}%   ({r['steps']} steps, {r['minutes']:.1f} min, load "
                  f"{r['load'][0]:.1f}-{r['load'][1]:.1f})", flush=True)
    chosen = {}
    for row, tried in runs.items():
        if None in tried:
            continue
        best = held_out(max(tried, key=lambda r: (r["val"][0] + r["val_degraded"][0]) / 2), test)
        chosen[row] = {"options": best["options"], "setting": setting_text(best["options"]),
                       "tried": [setting_text(r["options"]) for r in tried],
                       "val": best["val"], "val_degraded": best["val_degraded"],
                       "clean": best["test"], "degraded": best["test_degraded"]}
    print("\nheld-out pairs (test.bin / test_degraded.bin), 10-fold accuracy, with the setting chosen on validation:")
    for row in [r for r in runs if r not in chosen]:
        print(f"  {row:18s} pending: another copy is still training one of its candidates")
    for row, c in chosen.items():
        print(f"  {row:18s} {c['setting']:34s} clean {100 * c['clean'][0]:5.1f}% ± {100 * c['clean'][1]:.1f}   "
              f"degraded {100 * c['degraded'][0]:5.1f}% ± {100 * c['degraded'][1]:.1f}", flush=True)
    return chosen


def cost(names: dict[str, dict], settings: dict[str, dict], rounds: int, head_rounds: int) -> dict:
    """Median ratio to arcface of a full training step and of the classifier-and-head part, all rows in turn."""
    base = read_yaml(QUICKSTART)
    batch, classes = base["data"]["batch_size"], 500
    g = torch.Generator().manual_seed(0)
    images = torch.rand(batch, 3, 112, 112, generator=g) * 2 - 1
    labels = torch.randint(0, classes, (batch,), generator=g)
    embeddings = torch.randn(batch, base["model"]["embedding_size"], generator=g)
    timed = {"arcface": {"type": "arcface", **settings.get("arcface", {})}}
    timed.update({row: {**head, **settings.get(row, {})} for row, head in names.items() if row != "arcface"})
    models = {}
    for row, head in timed.items():
        raw = {**base, "head": {**head, "num_classes": classes}}
        cfg = validate_config(apply_overrides(raw, ["data.root=unused"]))
        torch.manual_seed(0)
        backbone = build_backbone(cfg)
        classifier = MarginClassifier(cfg["model"]["embedding_size"], classes, build_head(cfg))
        params = list(backbone.parameters()) + list(classifier.parameters())
        optimizer = torch.optim.AdamW(params, lr=cfg["training"]["lr"], weight_decay=cfg["training"]["weight_decay"])
        models[row] = (backbone, classifier, optimizer)

    def step(row: str, i: int, full: bool) -> float:
        backbone, classifier, optimizer = models[row]
        classifier.draw_key = (0, 0, i)  # heads that draw random numbers (elasticface) need a key, as in training
        start = time.perf_counter()
        x = backbone(images) if full else embeddings.clone().requires_grad_()
        loss = classifier(x, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if full:
            optimizer.step()
        return time.perf_counter() - start

    out = {"threads": torch.get_num_threads(), "batch": batch, "classes": classes, "load_start": os.getloadavg()}
    for part, n, full in (("step", rounds, True), ("head", head_rounds, False)):
        for row in timed:  # warm-up
            step(row, 0, full)
        times = {row: [] for row in timed}
        for i in range(n):
            for row in timed:
                times[row].append(step(row, i + 1, full))
        out[part] = {row: {"median_s": statistics.median(t),
                           "ratio": statistics.median(a / b for a, b in zip(t, times["arcface"]))}
                     for row, t in times.items()}
    out["load_end"] = os.getloadavg()
    print(f"time per step vs arcface (batch {batch}, {classes} classes, {out['threads']} threads, median over "
          f"{rounds} / {head_rounds} interleaved rounds; load {out['load_start'][0]:.1f} -> {out['load_end'][0]:.1f}):")
    for row in timed:
        s, h = out["step"][row], out["head"][row]
        print(f"  {row:18s} step {1000 * s['median_s']:6.0f} ms  x{s['ratio']:.3f}   classifier+head "
              f"{1000 * h['median_s']:6.2f} ms  x{h['ratio']:.2f}", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "quickstart",
                        help="output folder of `facecore demo-data --degraded`")
    parser.add_argument("--test-data", type=Path, help="demo-data folder whose test.bin and test_degraded.bin are "
                        "the held-out pairs (default: --data; a folder made with fewer --pairs evaluates faster)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-heads", help="runs and their results")
    parser.add_argument("--heads", nargs="+", help="rows to run (default: every registered head; elasticface as "
                        f"{', '.join(VARIANTS)})")
    parser.add_argument("--epochs", type=int, help="training epochs (default: the quick start's, 2)")
    parser.add_argument("--candidates", type=int, default=3, help="how many of each head's candidate settings to train")
    parser.add_argument("--val-identities", type=int, default=100, help="identities of the validation pairs")
    parser.add_argument("--val-pairs", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=20, help="interleaved rounds of full steps for the cost part")
    parser.add_argument("--head-rounds", type=int, default=200, help="rounds of classifier+head steps")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (see above)")
    parser.add_argument("--part", choices=["both", "quality", "cost"], default="both")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    names = rows(args.heads)
    print(f"rows: {', '.join(names)}; load average {os.getloadavg()[0]:.1f}", flush=True)
    results: dict = {}
    if args.part in ("both", "quality"):
        if not (args.data / "test_degraded.bin").exists():
            raise SystemExit(f"{args.data / 'test_degraded.bin'} is missing: run "
                             f"`facecore demo-data {args.data} --pairs 2000 --degraded` first")
        val = validation_pairs(args.out / f"validation-{args.val_identities}x{args.val_pairs}", 0, args.val_identities, args.val_pairs)
        print("quality (10-fold verification accuracy at the end of training):", flush=True)
        results["quality"] = quality(names, args.data, args.test_data or args.data, val, args.out, args.epochs,
                                     args.candidates)
    if args.part in ("both", "cost"):
        settings = {row: c["options"] for row, c in results.get("quality", {}).items()}
        results["cost"] = cost(names, settings, args.rounds, args.head_rounds)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()

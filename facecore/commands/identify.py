"""``facecore identify``: who is in a photo, searched in a gallery index, or "unknown".

No torch/numpy import at module level (keeps ``facecore --help`` fast).
"""

from __future__ import annotations

import json

import click

from . import set_option, user_errors


@click.command("identify")
@click.argument("images", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--index", "index_path", required=True, type=click.Path(dir_okay=False),
              help="Gallery index written by 'facecore index build'.")
@click.option("--checkpoint", "checkpoint_path", required=True, type=click.Path(dir_okay=False),
              help="The checkpoint the index was built with (another model is refused).")
@click.option("--config", "config_path", type=click.Path(dir_okay=False),
              help="YAML config; defaults to the config stored in the checkpoint.")
@click.option("--fpir", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=1e-3, show_default=True,
              help="Open-set false positive identification rate: the share of people outside the gallery "
                   "taken for someone in it; sets the threshold below which a face is 'unknown'.")
@click.option("--top-k", type=click.IntRange(min=1), default=5, show_default=True, help="Matches shown per image.")
@click.option("--device", help="auto, cpu, cuda or cuda:N (default: the config's device).")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@set_option
@user_errors
def identify(images: tuple[str, ...], index_path: str, checkpoint_path: str, config_path: str | None, fpir: float,
             top_k: int, device: str | None, as_json: bool, overrides: tuple[str, ...]) -> None:
    """Find each aligned face image (112x112) in a gallery index: top-k names with cosine scores, or 'unknown'.

    The search is exact (every gallery row scored); docs/deployment-search.md gives its speed by gallery size.
    """
    from ..eval.gallery_index import fpir_label, load_index
    from ..eval.predictor import Predictor

    index = load_index(index_path)  # a damaged index fails before the model is loaded
    predictor = Predictor(config_path, checkpoint_path, device=device, overrides=overrides)
    results = predictor.identify(list(images), index, fpir=fpir, top_k=top_k)
    if as_json:
        out = [{"image": image, "identity": r.identity, "known": r.known, "fpir": fpir, "threshold": r.threshold,
                "note": r.note or None, "matches": [m.__dict__ for m in r.matches]}
               for image, r in zip(images, results)]
        click.echo(json.dumps(out, indent=1))
        return
    if results and results[0].note:
        click.echo(f"Note: {results[0].note}", err=True)
    at = f"at FPIR {fpir_label(fpir)}"
    for image, r in zip(images, results):
        best = r.matches[0]
        if r.known is None:
            click.echo(f"{image}: best match {best.name} ({best.score:.4f}); no threshold {at}, not decided")
        elif r.known:
            click.echo(f"{image}: {best.name} ({best.score:.4f} > threshold {r.threshold:.4f} {at})")
        else:
            click.echo(f"{image}: unknown (best {best.name} {best.score:.4f} <= threshold {r.threshold:.4f} {at})")
        width = max(len(m.name) for m in r.matches)
        for rank, m in enumerate(r.matches, 1):
            where = f"  {m.image}" if m.image else ""
            click.echo(f"  {rank}. {m.name.ljust(width)}  {m.score:.4f}{where}")

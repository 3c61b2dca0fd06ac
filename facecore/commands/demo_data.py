"""``facecore demo-data``: generate the synthetic quick-start data set (train .rec, test .bin) and a synthetic IJB-C."""

from __future__ import annotations

import click

from . import user_errors


@click.command("demo-data")
@click.argument("out_dir", type=click.Path(file_okay=False), required=False)
@click.option("--train-identities", default=500, show_default=True, type=click.IntRange(min=2),
              help="Identities (classes) in the training set.")
@click.option("--images-per-identity", default=20, show_default=True, type=click.IntRange(min=1),
              help="Training images per identity.")
@click.option("--test-identities", default=100, show_default=True, type=click.IntRange(min=2),
              help="Held-out identities for the verification pairs (never in the training set).")
@click.option("--test-images-per-identity", default=10, show_default=True, type=click.IntRange(min=2),
              help="Images per held-out identity.")
@click.option("--pairs", default=3000, show_default=True, type=click.IntRange(min=20),
              help="Verification pairs, half same-identity, half different.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed; the same seed gives the same files.")
@click.option("--degraded", is_flag=True, help="Also write test_degraded.bin: the same pairs with low-resolution, "
              "off-centre, badly lit images (docs/synthetic-data.md).")
@click.option("--label-noise", default=0.0, show_default=True, type=click.FloatRange(0, 1, max_open=True),
              metavar="FRACTION", help="Give this fraction of the training images a wrong identity (the same images "
              "for the same seed) and list them in train/label_noise.tsv: key, given_label, true_label "
              "(for 'facecore clean'; docs/synthetic-data.md).")
@click.option("--force", is_flag=True, help="Regenerate even when OUT_DIR already holds this data, "
              "or write into a non-empty folder.")
@click.option("--ijb", "ijb_dir", type=click.Path(file_okay=False), metavar="IJB_DIR",
              help="Also (or, without OUT_DIR, only) write a small synthetic IJB-C set in the published layout "
                   "into IJB_DIR/IJBC (loose crops, landmarks, detector scores, template pairs, 1:N galleries G1/G2 and "
                   "probes) for 'facecore eval --ijb'.")
@user_errors
def demo_data(out_dir: str | None, train_identities: int, images_per_identity: int, test_identities: int,
              test_images_per_identity: int, pairs: int, seed: int, degraded: bool, label_noise: float,
              force: bool, ijb_dir: str | None) -> None:
    """Generate synthetic face identities for the quick start into OUT_DIR.

    Writes train/ (train.rec, train.idx, property: data.root for training), test.bin
    (held-out identities: eval.bin_file), the image folders they were packed from, and
    prints the raw-pixel verification baseline that a trained model should beat. With
    --ijb, also (or only) a small IJB-C-layout set for 'facecore eval --ijb IJB_DIR'.
    """
    if out_dir is None and ijb_dir is None:
        raise click.UsageError("give OUT_DIR (the quick-start data), --ijb IJB_DIR, or both")
    if ijb_dir is not None:
        from ..data.synthetic_ijb import make_ijb_data

        ijb = make_ijb_data(ijb_dir, seed=seed, force=force)
        click.echo(f"  IJB-C layout  {ijb['folder']}/  {ijb['images']} loose crops of {ijb['identities']} identities, "
                   f"{ijb['templates']} templates, {ijb['pairs']} pairs ({ijb['genuine']} genuine); 1:N: "
                   f"{ijb['gallery_templates']} gallery templates (G1 + G2), {ijb['probe_templates']} probes")
    if out_dir is None:
        return
    from ..data.synthetic import make_demo_data

    summary = make_demo_data(
        out_dir, train_identities=train_identities, images_per_identity=images_per_identity,
        test_identities=test_identities, test_images_per_identity=test_images_per_identity,
        pairs=pairs, seed=seed, force=force, degraded=degraded, label_noise=label_noise,
    )
    if summary["reused"]:
        click.echo(f"{out_dir} already holds this demo data (same settings); nothing regenerated (--force to redo).")
    else:
        click.echo(f"Generated in {summary['seconds']:.0f} s:")
    click.echo(f"  training set  {summary['train_rec']}/  {summary['train_images']} images of "
               f"{summary['train_identities']} identities (train.rec, train.idx, property)")
    click.echo(f"  test pairs    {summary['test_bin']}  {summary['pairs']} pairs from {summary['test_images']} images "
               f"of {summary['test_identities']} held-out identities (list: {summary['test_pairs']})")
    if label_noise:
        click.echo(f"  label noise   {summary['label_noise_images']} of {summary['train_images']} training images "
                   f"carry another identity's label (truth: {summary['label_noise_file']})")
    if degraded:
        click.echo(f"  degraded pairs {summary['test_degraded_bin']}  the same pairs, images degraded "
                   f"(raw-pixel baseline {100 * summary['raw_pixel_accuracy_degraded']:.1f}%)")
    click.echo(f"  raw-pixel baseline: {100 * summary['raw_pixel_accuracy']:.1f}% 10-fold verification accuracy "
               "(cosine of the pixels; a trained model should be far above it)")

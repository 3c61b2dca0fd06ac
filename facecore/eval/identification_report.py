"""The result of a 1:N evaluation (IJB 1:N or folder galleries): flat numbers, table, JSON, plots, saved arrays.

Open-set numbers come per gallery (and their mean for IJB's two galleries); the closed-set
numbers of older tables are labelled as such. A TPIR whose FPIR target lies below
1 / (non-mated probes) is not measurable: NaN in the flat results, null in JSON, "n/m" in tables.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .identification import ClosedSet, OpenSet, Search

SCORE_MATRIX_LIMIT = 1 << 28  # probes x gallery entries up to which --save-features writes the full score matrix (1 GiB)
NOT_MEASURABLE = "n/m"


def target_label(target: float) -> str:
    """``1e-03`` for 0.001, as in the 1:1 tables."""
    from .ijb import far_label

    return far_label(target)


def _nan(value: float | None) -> float:
    return math.nan if value is None else float(value)


def _pct(value: float | None) -> str:
    return NOT_MEASURABLE if value is None or not math.isfinite(value) else f"{100 * value:.2f}"


def _mean(values: list[float | None]) -> float | None:
    return None if any(v is None or not math.isfinite(v) for v in values) else float(np.mean(values))


def _grid(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(r, widths))).rstrip()
             for r in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


@dataclass
class IdentificationResult:
    """Open-set results per gallery, the closed-set result on ``closed_gallery``, and what to save."""

    name: str
    open_sets: dict[str, OpenSet]
    closed: ClosedSet | None
    closed_gallery: str
    probes: int
    sizes: dict[str, int]  # gallery name -> entries
    searches: dict[str, Search]
    gallery_features: dict[str, Any]  # gallery name -> torch (G, D); the merged closed-set gallery is not kept
    probe_features: Any
    arrays: dict[str, np.ndarray]
    seconds: dict[str, float] = field(default_factory=dict)
    mean_of: tuple[str, ...] = ()  # galleries whose open-set numbers are averaged (IJB's G1 and G2)
    notes: list[str] = field(default_factory=list)

    # --- numbers ---------------------------------------------------------------------------
    def _mean_row(self) -> tuple[dict[int, float | None], list[float | None]] | None:
        if len(self.mean_of) < 2:
            return None
        sets = [self.open_sets[g] for g in self.mean_of]
        ranks = {r: _mean([s.ranks[r] for s in sets]) for r in sets[0].ranks}
        tpir = [_mean([s.tpir[i] for s in sets]) for i in range(len(sets[0].tpir))]
        return ranks, tpir

    def results(self) -> dict[str, float]:
        """Flat numbers: ``G1/rank-1``, ``G1/tpir@fpir=1e-03``, ``mean/...``, ``closed/rank-1``, ``closed/tpir@far=1e-03``."""
        out: dict[str, float] = {}
        rows: list[tuple[str, dict[int, Any], list[Any], list[float]]] = [
            (g, s.ranks, s.tpir, s.fpir_targets) for g, s in self.open_sets.items()]
        mean = self._mean_row()
        if mean is not None:
            rows.append(("mean", mean[0], mean[1], self.open_sets[self.mean_of[0]].fpir_targets))
        for g, ranks, tpir, targets in rows:
            out.update({f"{g}/rank-{r}": _nan(v) for r, v in ranks.items()})
            out.update({f"{g}/tpir@fpir={target_label(t)}": _nan(v) for t, v in zip(targets, tpir)})
        if self.closed is not None:
            out.update({f"closed/rank-{r}": _nan(v) for r, v in self.closed.ranks.items()})
            out.update({f"closed/tpir@far={target_label(t)}": _nan(v)
                        for t, v in zip(self.closed.far_targets, self.closed.tpir)})
        return out

    def table(self) -> str:
        """The printed result: the open-set table (one row per gallery, the mean) and the closed-set line."""
        lines: list[str] = []
        if self.open_sets:
            first = next(iter(self.open_sets.values()))
            header = [f"{self.name} open set", "gallery", "mated", "non-mated"] + \
                     [f"rank-{r}" for r in first.ranks] + [f"TPIR@{target_label(t)}" for t in first.fpir_targets]
            rows = [[g, f"{s.gallery:,}", f"{s.mated:,}", f"{s.nonmated:,}"] + [_pct(v) for v in s.ranks.values()]
                    + [_pct(v) for v in s.tpir] for g, s in self.open_sets.items()]
            mean = self._mean_row()
            if mean is not None:
                rows.append([f"mean of {', '.join(self.mean_of)}", "", "", ""] + [_pct(v) for v in mean[0].values()]
                            + [_pct(v) for v in mean[1]])
            lines += _grid(header, rows)
            lines.append("open set, in %: rank-N over mated probes; TPIR at each FPIR: rank-1 mate scoring above the "
                         "threshold set on the non-mated probes' top scores (> threshold);")
            limits = ", ".join(f"{g} {1 / s.nonmated:.1e}" if s.nonmated else f"{g} none (no non-mated probes)"
                               for g, s in self.open_sets.items())
            lines.append(f"{NOT_MEASURABLE}: FPIR below 1 / non-mated probes, not measurable (smallest FPIR: {limits})")
        if self.closed is not None:
            c = self.closed
            header = [f"{self.name} closed set", "gallery", "probes", "left out"] + \
                     [f"rank-{r}" for r in c.ranks] + [f"TPIR@FAR={target_label(t)}" for t in c.far_targets]
            rows = [[self.closed_gallery, f"{c.gallery:,}", f"{c.probes:,}", f"{c.excluded:,}"]
                    + [_pct(v) for v in c.ranks.values()] + [_pct(v) for v in c.tpir]]
            lines += [""] + _grid(header, rows)
            lines.append(f"closed set as in older published tables ({self.closed_gallery} as one gallery, probes "
                         "without a mate left out): TPIR@FAR = mate score above the ceil(probes x FAR)-th largest "
                         "non-mated pair score (InsightFace's ijb_1n.py), not open-set FPIR")
        lines += self.notes
        return "\n".join(lines)

    def report(self) -> dict:
        """The JSON block: sizes, per-gallery open-set numbers with thresholds, the closed set, conventions."""
        def open_block(s: OpenSet) -> dict:
            return {"gallery": s.gallery, "mated": s.mated, "nonmated": s.nonmated,
                    "ranks": {f"rank-{r}": v for r, v in s.ranks.items()},
                    "fpir_targets": [target_label(t) for t in s.fpir_targets], "tpir": s.tpir,
                    "thresholds": s.thresholds,
                    "smallest_measurable_fpir": 1 / s.nonmated if s.nonmated else None}

        out: dict[str, Any] = {"probes": self.probes, "galleries": self.sizes,
                               "open_set": {g: open_block(s) for g, s in self.open_sets.items()}}
        mean = self._mean_row()
        if mean is not None:
            out["open_set_mean"] = {"of": list(self.mean_of), "ranks": {f"rank-{r}": v for r, v in mean[0].items()},
                                    "tpir": mean[1]}
        if self.closed is not None:
            c = self.closed
            out["closed_set"] = {"gallery": self.closed_gallery, "entries": c.gallery, "probes": c.probes,
                                 "left_out": c.excluded, "ranks": {f"rank-{r}": v for r, v in c.ranks.items()},
                                 "far_targets": [target_label(t) for t in c.far_targets],
                                 "pair_ranks": c.pair_ranks, "tpir": c.tpir, "thresholds": c.thresholds}
        out["convention"] = (
            "open set per gallery: mated probes have their identity in the gallery; TPIR(FPIR) counts a mated probe "
            "when its rank-1 gallery entry is a mate with a score > the threshold, the threshold being the lowest "
            "non-mated top score t with share(non-mated top score > t) <= FPIR; null: FPIR < 1/non-mated probes. "
            "closed set (older tables): galleries merged, probes without a mate left out, TPIR@FAR: mate score > the "
            "ceil(probes x FAR)-th largest non-mated pair score. docs/identification.md")
        out["seconds"] = {k: round(v, 3) for k, v in self.seconds.items()}
        return out

    # --- files -----------------------------------------------------------------------------
    def plot(self, folder: str | Path, stem: str) -> list[Path]:
        """``cmc_<stem>.png`` and, when there are non-mated probes, ``tpir_<stem>.png`` in ``folder``."""
        from .identification_plot import plot_cmc, plot_tpir

        folder = Path(folder)
        curves = {g: s.cmc for g, s in self.open_sets.items()}
        if self.closed is not None:
            curves[f"{self.closed_gallery} (closed set)"] = self.closed.cmc
        paths = [folder / f"cmc_{stem}.png"]
        plot_cmc(curves, paths[0], title=f"CMC of {self.name}")
        det = {g: (s.curve_fpir, s.curve_tpir) for g, s in self.open_sets.items() if s.curve_fpir.size}
        if det:
            paths.append(folder / f"tpir_{stem}.png")
            plot_tpir(det, paths[1], title=f"TPIR vs FPIR of {self.name} (open set)")
        return paths

    def save(self, folder: str | Path, prefix: str) -> tuple[list[str], list[str]]:
        """``--save-features``: ids, template features, each gallery's top-k and score matrix as .npy.

        Returns ``(paths, notes)``; a score matrix above SCORE_MATRIX_LIMIT entries is left out
        (the top-k files hold the ranks), with a note saying so.
        """
        from .ijb import save_arrays

        arrays = dict(self.arrays)
        arrays["probe_template_features"] = np.asarray(self.probe_features)
        notes = []
        for g, feats in self.gallery_features.items():
            key = g.lower()
            arrays[f"{key}_template_features"] = np.asarray(feats)
            search = self.searches[g]
            arrays[f"{key}_top_scores"] = search.scores.cpu().numpy()
            arrays[f"{key}_top_indices"] = search.indices.cpu().numpy()
        paths = save_arrays(folder, prefix, arrays)
        for g, feats in self.gallery_features.items():
            n = self.probes * feats.shape[0]
            path = Path(folder) / f"{prefix.lower()}_{g.lower()}_scores.npy"
            if n > SCORE_MATRIX_LIMIT:
                notes.append(f"{path.name} not written: {self.probes:,} x {feats.shape[0]:,} scores exceed "
                             f"{SCORE_MATRIX_LIMIT:,}; {prefix.lower()}_{g.lower()}_top_scores.npy holds the top k")
                continue
            write_scores(path, self.probe_features, feats)
            paths.append(str(path))
        return paths, notes


def write_scores(path: Path, probes: Any, gallery: Any, rows: int = 4096) -> None:
    """The (P, G) float32 score matrix ``probes @ gallery.T`` written block by block into a .npy file."""
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(probes.shape[0], gallery.shape[0]))
    for p0 in range(0, probes.shape[0], rows):
        out[p0 : p0 + rows] = (probes[p0 : p0 + rows] @ gallery.T).numpy()
    out.flush()
    del out


__all__ = ["IdentificationResult", "NOT_MEASURABLE", "SCORE_MATRIX_LIMIT", "target_label", "write_scores"]

"""``cryoscape evaluate``: evaluation against a simulated truth, its figures and HTML page.

:func:`run_evaluation` runs :func:`cryoscape.analysis.evaluate.evaluate_against_truth` and adds
``report.html`` with one section per part that could be computed (per-image FSC, latents vs
the true coordinate, clusters vs the true classes, poses).  A new part of the evaluation adds
one entry to ``_SECTIONS``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np

from cryoscape.analysis.evaluate import Evaluation, evaluate_against_truth
from cryoscape.report.html import Figure, Section, Table, write_html_report

__all__ = ["plot_evaluation", "write_evaluation_report", "run_evaluation"]

log = logging.getLogger(__name__)


def _save(fig, path: Path) -> Path:
    from cryoscape.io.writers import atomic_write

    fig.tight_layout()
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png")
    return path.resolve()  # the report takes relative figure paths as relative to itself


def plot_evaluation(ev: Evaluation, folder: str | os.PathLike) -> dict[str, Path]:
    """Figures of the evaluation into ``folder``; returns name -> PNG path."""
    folder = Path(folder)
    out: dict[str, Path] = {}
    for name, file, draw in (("fsc_curves", "per_image_fsc.png", _plot_fsc_curves),
                             ("auc_by_truth", "auc_by_truth.png", _plot_auc_by_truth),
                             ("latent_vs_truth", "latent_vs_truth.png", _plot_latent_vs_truth),
                             ("clusters", "clusters_vs_truth.png", _plot_clusters),
                             ("poses", "pose_errors.png", _plot_pose_errors)):
        fig = draw(ev)
        if fig is not None:
            out[name] = _save(fig, folder / file)
    return out


def _plot_fsc_curves(ev: Evaluation):
    """Every evaluated image's FSC with its true map and their mean; None without maps."""
    from matplotlib.figure import Figure as MplFigure

    if ev.fsc is None:
        return None
    f = ev.fsc
    fig = MplFigure(figsize=(5.0, 3.6), dpi=120)
    ax = fig.add_subplot(1, 1, 1)
    x = f.freqs / f.pixel_size_angstrom
    for curve in f.curves:
        ax.plot(x, curve, color="0.6", linewidth=0.5, alpha=0.5)
    ax.plot(x, f.curves.mean(0), color="tab:blue", linewidth=2, label=f"mean of {len(f.curves)} images")
    for t in (0.5, 0.143):
        ax.axhline(t, color="k", linestyle="--", linewidth=0.7)
    ax.set_xlabel("spatial frequency (1/Å)")
    ax.set_ylabel("FSC with the true map")
    ax.set_ylim(min(-0.1, float(f.curves.min()) - 0.05), 1.05)
    ax.set_title(f"per-image FSC: AUC {f.auc.mean():.3f} (mean)", fontsize="small")
    ax.legend(fontsize="small")
    return fig


def _plot_auc_by_truth(ev: Evaluation):
    """Per-image AUC against the true coordinate (or the true state, jittered); None without maps."""
    from matplotlib.figure import Figure as MplFigure

    if ev.fsc is None:
        return None
    gt = ev.truth
    rows = ev.rows[ev.fsc_positions]
    coord = gt.coordinate[rows]
    fig = MplFigure(figsize=(5.0, 3.4), dpi=120)
    ax = fig.add_subplot(1, 1, 1)
    if np.isfinite(coord).all() and np.ptp(coord) > 0:
        ax.scatter(coord, ev.fsc.auc, s=10, color="tab:blue")
        ax.set_xlabel(f"true {gt.coordinate_name}")
    else:
        states = gt.state_index[rows]
        jitter = np.random.default_rng(0).uniform(-0.15, 0.15, len(states))
        ax.scatter(states + jitter, ev.fsc.auc, s=10, color="tab:blue")
        ax.set_xlabel("true state")
        ax.set_xticks(np.unique(states))
    ax.set_ylabel("FSC AUC")
    return fig


def _plot_latent_vs_truth(ev: Evaluation):
    """Latent PC1 against the true coordinate (at most 20,000 particles); None without latents."""
    from matplotlib.figure import Figure as MplFigure

    from cryoscape.analysis.selection import pca_embedding

    if ev.latent is None or ev.z is None:
        return None
    gt = ev.truth
    coord = gt.coordinate[ev.rows]
    ok = np.isfinite(coord)
    pick = np.flatnonzero(ok)
    if len(pick) > 20000:
        pick = np.random.default_rng(0).choice(pick, 20000, replace=False)
    pc1_all = np.full(len(coord), np.nan)
    pc1_all[ok] = pca_embedding(ev.z[ok], 1)[0][:, 0]
    fig = MplFigure(figsize=(4.8, 3.6), dpi=120)
    ax = fig.add_subplot(1, 1, 1)
    ax.scatter(coord[pick], pc1_all[pick], s=3, alpha=0.5, color="tab:blue", rasterized=True)
    ax.set_xlabel(f"true {gt.coordinate_name}")
    ax.set_ylabel("latent PC1")
    ax.set_title(f"|Spearman ρ| = {ev.latent['spearman_pc1']:.3f}", fontsize="small")
    return fig


def _plot_clusters(ev: Evaluation):
    """Contingency table of predicted clusters against true classes, with the ARI; None without clusters."""
    from matplotlib.figure import Figure as MplFigure

    if ev.clusters is None:
        return None
    table = np.asarray(ev.clusters["contingency"], dtype=np.float64)
    fig = MplFigure(figsize=(1.2 + 0.45 * table.shape[1], 1.0 + 0.4 * table.shape[0]), dpi=120)
    ax = fig.add_subplot(1, 1, 1)
    ax.imshow(table, cmap="Blues", aspect="auto")
    for (i, j), v in np.ndenumerate(table):
        ax.text(j, i, f"{int(v)}", ha="center", va="center", fontsize="x-small",
                color="white" if v > table.max() / 2 else "black")
    ax.set_xticks(range(table.shape[1]), [str(v) for v in ev.clusters["predicted_labels"]], fontsize="x-small")
    ax.set_yticks(range(table.shape[0]), [str(v) for v in ev.clusters["true_labels"]], fontsize="x-small")
    ax.set_xlabel("predicted cluster")
    ax.set_ylabel("true class")
    ax.set_title(f"ARI {ev.clusters['adjusted_rand_index']:.3f}", fontsize="small")
    return fig


def _plot_pose_errors(ev: Evaluation):
    """Histogram of rotation errors after global alignment; None without poses."""
    from matplotlib.figure import Figure as MplFigure

    if ev.pose_angle_deg is None or not len(ev.pose_angle_deg):
        return None
    fig = MplFigure(figsize=(4.6, 3.2), dpi=120)
    ax = fig.add_subplot(1, 1, 1)
    top = max(float(np.percentile(ev.pose_angle_deg, 99)), 1e-3)
    ax.hist(np.clip(ev.pose_angle_deg, 0, top), bins=50, color="tab:blue")
    ax.set_xlabel("rotation error after global alignment (degrees)")
    ax.set_ylabel("particles")
    return fig


def _fsc_section(ev: Evaluation, figs: dict[str, Path]) -> Section | None:
    if ev.fsc is None:
        return None
    f = ev.fsc
    s = f.summary()
    table = Table(["number", "mean", "median"], [
        ["FSC AUC (mean |FSC| over shells)", s["auc_mean"], s["auc_median"]],
        ["FSC = 0.5 (Å)", float(f.angstrom(s["res_0_5_mean"])), float(f.angstrom(s["res_0_5_median"]))],
        ["FSC = 0.143 (Å)", float(f.angstrom(s["res_0_143_mean"])), float(f.angstrom(s["res_0_143_median"]))],
        ["real-space correlation (sign check)", s["correlation_mean"], s["correlation_median"]],
        ["AUC vs mirrored truth (hand check)", s["auc_mirror_mean"], s["auc_mirror_median"]],
    ], caption="resolutions are those of the mean / median crossing frequency; Nyquist "
               f"is {2 * f.pixel_size_angstrom:.3g} Å")
    return Section("Per-image FSC", [
        f"{len(f.auc)} images evenly spaced over the particles; each map (at its latent) is compared with the "
        f"ground-truth map of the image's state at box {f.box_size} ({f.pixel_size_angstrom:.4g} Å/pixel), "
        "without a mask."],
        figures=[Figure(figs[k], c) for k, c in (("fsc_curves", "FSC curves"), ("auc_by_truth", "AUC per image"))
                 if k in figs],
        tables=[table], links=[("per_image_fsc.txt", "per-image numbers"), ("fsc_curves.npy", "curves")])


def _latent_section(ev: Evaluation, figs: dict[str, Path]) -> Section | None:
    if ev.latent is None:
        return None
    lat = ev.latent
    return Section("Latents against the true coordinate", [
        f"Rank correlation of the latents with the true {lat.get('coordinate', 'coordinate')} over {lat['n']} "
        "particles."],
        figures=[Figure(figs["latent_vs_truth"], "latent PC1 vs truth")] if "latent_vs_truth" in figs else [],
        tables=[Table(["number", "value"], [["|Spearman ρ|, latent PC1", lat["spearman_pc1"]],
                                            ["|Pearson r|, latent PC1", lat["pearson_pc1"]],
                                            [f"|Spearman ρ|, best dimension (z{lat['best_dim']})",
                                             lat["spearman_best_dim"]]])])


def _cluster_section(ev: Evaluation, figs: dict[str, Path]) -> Section | None:
    if ev.clusters is None:
        return None
    c = ev.clusters
    return Section("Clusters against the true classes", [f"Predicted labels: {c['labels']}."],
                   figures=[Figure(figs["clusters"], "true class x predicted cluster")] if "clusters" in figs else [],
                   tables=[Table(["number", "value"], [["adjusted Rand index", c["adjusted_rand_index"]],
                                                       ["normalised mutual information", c["normalized_mutual_info"]],
                                                       ["predicted clusters / true classes",
                                                        f"{c['n_predicted']} / {c['n_true']}"]])])


def _pose_section(ev: Evaluation, figs: dict[str, Path]) -> Section | None:
    if ev.poses is None:
        return None
    p = ev.poses
    rows = [["rotation error, mean / median (degrees)", f"{p['angle_deg_mean']:.3f} / {p['angle_deg_median']:.3f}"],
            ["handedness flipped", str(p["handedness_flipped"])]]
    if "translation_pixel_mean" in p:
        rows.append(["translation error, mean / median (pixels)",
                     f"{p['translation_pixel_mean']:.3f} / {p['translation_pixel_median']:.3f}"])
    rows.append(["within 5 / 15 degrees", f"{100 * p['fraction_within_5_deg']:.1f} % / "
                                           f"{100 * p['fraction_within_15_deg']:.1f} %"])
    return Section("Poses", [f"Poses of {p['n_particles']} particles from {p['file']}, after the global rotation "
                             "(and mirror) that best aligns them to the truth."],
                   figures=[Figure(figs["poses"], "rotation errors")] if "poses" in figs else [],
                   tables=[Table(["number", "value"], rows)])


_SECTIONS: list[Callable[[Evaluation, dict[str, Path]], Section | None]] = [
    _fsc_section, _latent_section, _cluster_section, _pose_section,
]


def write_evaluation_report(ev: Evaluation, *, figures: dict[str, Path] | None = None) -> Path:
    """``report.html`` in the evaluation folder (figures drawn first when not given)."""
    figures = figures if figures is not None else plot_evaluation(ev, ev.out_dir)
    head = []
    if ev.fsc is not None:
        head.append(["per-image FSC AUC (mean)", float(ev.fsc.auc.mean())])
        head.append(["FSC = 0.5 (Å, mean frequency)", float(ev.fsc.angstrom(ev.fsc.res_0_5.mean()))])
    if ev.latent is not None:
        head.append(["|Spearman ρ| latent PC1 vs truth", ev.latent["spearman_pc1"]])
    if ev.clusters is not None:
        head.append(["adjusted Rand index", ev.clusters["adjusted_rand_index"]])
    if ev.poses is not None:
        head.append(["rotation error (median, degrees)", ev.poses["angle_deg_median"]])
    summary = Section("Summary", [f"{ev.n_particles} particles of the dataset {ev.truth.folder} "
                                  f"({ev.truth.kind}, {ev.truth.n_states} true maps)."] + list(ev.notes),
                      tables=[Table(["number", "value"], head)] if head else [],
                      links=[("evaluation.yaml", "all numbers (evaluation.yaml)")])
    sections = [summary] + [s for s in (build(ev, figures) for build in _SECTIONS) if s is not None]
    subtitle = ", ".join(f"{k} {v}" for k, v in ev.source.items())
    return write_html_report(ev.out_dir / "report.html", title="cryoscape evaluate", subtitle=subtitle,
                             sections=sections)


def run_evaluation(truth: str | os.PathLike, **options: Any) -> Evaluation:
    """Evaluate (see :func:`evaluate_against_truth` for the options), draw the figures, write report.html."""
    ev = evaluate_against_truth(truth, **options)
    figures = plot_evaluation(ev, ev.out_dir)
    ev_report = write_evaluation_report(ev, figures=figures)
    log.info("evaluation report: %s", ev_report)
    return ev

"""``cryoscape analyze``: the latent analysis of a trained run, end to end, with an HTML report.

:func:`analyze_run` reads the latents of one epoch, computes PCA, k-means with on-data centres
and (for zdim >= 2) a UMAP embedding (:mod:`cryoscape.analysis.latent`), generates maps at the
k-means centres and along the top principal components (:mod:`cryoscape.analysis.maps`), draws
the plots (:mod:`cryoscape.report.plots`) and lists everything in ``report.html``.

Output folder (default ``RUN/analysis.EPOCH``, EPOCH 0-based like ``z.EPOCH.npy``)
--------------------------------------------------------------------------------------
``report.html``
    The report (open it in a browser; the folder can be copied as a whole).
``config.yaml``, ``analyze.log``
    The arguments and the log.
``z_pca.npy``, ``pca_explained_variance.txt``, ``pca_components.txt``, ``pca_mean.txt``
    Every particle's coordinates on the PCs ``(N, zdim)``; the variance ratio per PC; the PC
    directions (rows) and the mean latent, so that ``z = mean + pca @ components``.
``umap.npy``
    ``(N, 2)`` UMAP embedding (zdim >= 2, unless ``skip_umap``); ``umap_fit_indices.npy`` lists
    the particles it was fitted on when more than ``umap_fit_max`` (the others are interpolated,
    see :func:`cryoscape.analysis.latent.compute_umap`).
``kmeansK/``
    ``labels.npy`` and ``labels.pkl`` (cluster 0..K-1 of each particle; the pickle as cryoDRGN
    writes it), ``centers.txt`` (k-means centres), ``centers_ind.txt`` (index of the on-data
    centre of each cluster), ``z_values.txt`` (the on-data latents), ``vol_000.mrc`` ... (map of
    cluster ``i`` at its on-data centre).
``pcN/``
    ``vol_000.mrc`` ... along PC ``N`` from its 5th to its 95th percentile, ``z_values.txt`` (the
    latents) and ``pc_coordinates.txt`` (the PC coordinates).
``figures/``
    The report's PNG plots.

zdim 1: the latent is shown as histograms instead of scatter plots (no UMAP), its "PC1" is the
latent itself (up to sign), and the PC traversal runs along it.

Time: UMAP runs in a separate Python process (``background_umap``, started first) while PCA,
k-means and the maps are computed; its cost at small N is mostly umap-learn's just-in-time
compilation (~10 s), which would otherwise add to the maps' time.  Where no process can be
started, or the child fails, it runs in line.
"""

from __future__ import annotations

import logging
import os
import pickle
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cryoscape.analysis.latent import (
    KMeansResult,
    PCAResult,
    UMAPResult,
    compute_pca,
    compute_umap,
    kmeans_on_data,
    load_latents,
    pc_traversal,
)
from cryoscape.analysis.maps import MapOptions, MapSet
from cryoscape.errors import InputError
from cryoscape.report.html import Figure, Link, Section, Table, write_html_report

__all__ = ["AnalyzeOptions", "AnalysisResult", "analyze_run", "read_training_history"]

log = logging.getLogger(__name__)


@dataclass
class AnalysisResult:
    """What :func:`analyze_run` computed and wrote (arrays for notebook use, paths of the files)."""

    outdir: Path
    report: Path
    epoch: int
    z: np.ndarray
    pca: PCAResult
    kmeans: KMeansResult | None = None
    umap: UMAPResult | None = None
    kmeans_maps: MapSet | None = None
    pc_maps: dict[int, MapSet] = field(default_factory=dict)
    pc_coordinates: dict[int, np.ndarray] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def n_maps(self) -> int:
        """Number of maps written."""
        n = len(self.kmeans_maps.paths) if self.kmeans_maps else 0
        return n + sum(len(m.paths) for m in self.pc_maps.values())


def read_training_history(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Per-epoch training records (``loss``, ``error``, ``kl``...) of a run, ``[]`` when unreadable."""
    from cryoscape.train.checkpoint import find_checkpoint, load_checkpoint

    try:
        state = load_checkpoint(find_checkpoint(run_dir))
    except InputError:
        return []
    return list(state.get("history") or [])


class _Timer:
    def __init__(self, store: dict[str, float]):
        self.store = store

    def __call__(self, name: str):
        timer = self

        class _Block:
            def __enter__(self):
                self.t = time.perf_counter()

            def __exit__(self, *exc):
                timer.store[name] = timer.store.get(name, 0.0) + time.perf_counter() - self.t

        return _Block()


class _UMAPJob:
    """:func:`compute_umap` of ``z.EPOCH.npy`` in a fresh Python process, or in this one.

    The child is a new interpreter (``python -c``) that reads the latents from the run folder and
    writes its result to a temporary file in the output folder: unlike ``multiprocessing`` it never
    re-imports the caller's main script, so scripts and notebooks need no ``__main__`` guard.
    Any failure of the child (no process allowed, killed, crashed) falls back to computing here.
    """

    def __init__(self, run: Path, epoch: int, z: np.ndarray, out: Path, *, fit_max: int, seed: int, background: bool):
        import subprocess
        import sys

        self.z = z
        self.kwargs = dict(fit_max=fit_max, seed=seed)
        self.proc = None
        self.result_path = out / ".umap_result.npz"
        self.log_path = out / ".umap_child.log"
        self.background = False
        if not background:
            return
        # cryoscape.analysis.latent imports only numpy at the top: the child does not load torch
        code = "import sys; from cryoscape.analysis.latent import save_umap_of_run; save_umap_of_run(*sys.argv[1:])"
        try:
            self.result_path.unlink(missing_ok=True)
            with open(self.log_path, "wb") as log_file:
                self.proc = subprocess.Popen(
                    [sys.executable, "-c", code, str(run), str(epoch), str(self.result_path), str(fit_max), str(seed)],
                    stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            self.background = True
        except OSError as err:  # no processes here: compute in line later
            log.info("UMAP runs in this process (%s: %s)", type(err).__name__, err)
            self.proc = None

    def cancel(self) -> None:
        """Stop the child process (if still running) and remove its files."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
            self.proc = None
        self.result_path.unlink(missing_ok=True)
        self.log_path.unlink(missing_ok=True)

    def result(self) -> UMAPResult:
        try:
            if self.proc is not None:
                code = self.proc.wait()
                if code == 0 and self.result_path.is_file():
                    with np.load(self.result_path) as f:
                        return UMAPResult(embedding=f["embedding"], fit_indices=f["fit_indices"])
                tail = self.log_path.read_text(errors="replace").strip().splitlines()[-1:] if self.log_path.exists() else []
                log.info("UMAP in the background process failed (exit %s%s); running it here", code,
                         f": {tail[0]}" if tail else "")
                self.background = False
            return compute_umap(self.z, **self.kwargs)
        finally:
            self.cancel()


def _save_text(path: Path, array: np.ndarray, fmt: str = "%.6g") -> None:
    from cryoscape.io.writers import atomic_write

    with atomic_write(path, "w") as f:
        np.savetxt(f, array, fmt=fmt)


def _save_npy(path: Path, array: np.ndarray) -> None:
    from cryoscape.io.writers import atomic_write

    with atomic_write(path, "wb") as f:
        np.save(f, array)


@dataclass
class AnalyzeOptions:
    """What ``cryoscape analyze`` computes (one object, as :class:`~cryoscape.analysis.landscape.LandscapeOptions`).

    Attributes
    ----------
    epoch
        0-based epoch (``None``: the latest with latents).
    ksample
        Number of k-means clusters, i.e. of maps at on-data centres (0: no k-means).
    n_pcs, n_per_pc
        Traverse the top ``n_pcs`` PCs with ``n_per_pc`` maps each (5th to 95th percentile).
    skip_umap, skip_vol
        Leave out UMAP / map generation.
    umap_fit_max
        Fit UMAP on at most this many particles (the rest are interpolated).
    seed
        Seed of k-means, UMAP and subsampling.
    maps
        Box, low-pass, hand, device and precision of the maps (:class:`MapOptions`).
    map_views
        Draw each map set's isosurfaces and central slices into the report (and write its ``.cxc``).
    """

    epoch: int | None = None
    ksample: int = 20
    n_pcs: int = 2
    n_per_pc: int = 10
    skip_umap: bool = False
    skip_vol: bool = False
    umap_fit_max: int = 20_000
    seed: int = 0
    maps: MapOptions = field(default_factory=MapOptions)
    map_views: bool = True

    def validate(self) -> None:
        """Raise :class:`InputError` (one sentence) for impossible settings."""
        if self.ksample < 0 or self.n_pcs < 0 or self.n_per_pc < 1:
            raise InputError(f"--ksample {self.ksample}, --pc {self.n_pcs} and --n-per-pc {self.n_per_pc} must be "
                             ">= 0, >= 0 and >= 1; pass e.g. --ksample 20 --pc 2 --n-per-pc 10.")

    def record(self) -> dict[str, Any]:
        """Plain values for ``config.yaml``."""
        return {**{k: v for k, v in vars(self).items() if k != "maps"}, **self.maps.record()}


def analyze_run(
    run_dir: str | os.PathLike,
    options: AnalyzeOptions | None = None,
    *,
    outdir: str | os.PathLike | None = None,
    progress: bool = True,
    background_umap: bool = True,
    arguments: dict[str, Any] | None = None,
) -> AnalysisResult:
    """Analyse the latent space of a ``cryoscape train`` run and write a report (module docstring).

    Parameters
    ----------
    run_dir
        The training run folder.
    options
        What to compute (:class:`AnalyzeOptions`; default: its defaults).
    outdir
        Output folder (default ``run_dir/analysis.EPOCH``).
    background_umap
        Compute UMAP in a child process alongside the maps (module docstring).
    arguments
        What to record in ``config.yaml`` (the CLI passes its arguments; default: the options).

    Returns
    -------
    :class:`AnalysisResult`.
    """
    from cryoscape.io.run_folder import attach_log_file, detach_log_file, write_config

    opts = options or AnalyzeOptions()
    run = Path(os.path.abspath(run_dir))  # absolute: the report's links are made relative to it
    z, epoch = load_latents(run, opts.epoch)
    out = Path(os.path.abspath(outdir)) if outdir is not None else run / f"analysis.{epoch}"
    opts.validate()
    out.mkdir(parents=True, exist_ok=True)
    record = dict(arguments) if arguments is not None else dict(run=str(run), **opts.record())
    write_config(out, "analyze", record, analysed_epoch=epoch, n_particles=int(z.shape[0]), zdim=int(z.shape[1]))
    handler = attach_log_file(out / "analyze.log")
    try:
        return _analyze(run, out, z, epoch, opts, progress=progress, background_umap=background_umap)
    finally:
        detach_log_file(handler)


def _analyze(run: Path, out: Path, z: np.ndarray, epoch: int, opts: AnalyzeOptions, *, progress: bool,
             background_umap: bool) -> AnalysisResult:
    start = time.perf_counter()
    seconds: dict[str, float] = {}
    timed = _Timer(seconds)
    n, zdim = z.shape
    log.info("analysing %s epoch %d: %d particles, zdim %d -> %s", run, epoch, n, zdim, out)
    figures = out / "figures"
    figures.mkdir(exist_ok=True)
    want_umap = zdim >= 2 and not opts.skip_umap
    umap_job = (_UMAPJob(run, epoch, z, out, fit_max=opts.umap_fit_max, seed=opts.seed, background=background_umap)
                if want_umap else None)
    try:
        return _analyze_steps(run, out, z, epoch, figures, umap_job, seconds, timed, start, opts, progress=progress)
    finally:
        if umap_job is not None:
            umap_job.cancel()  # a no-op once its result was taken; stops the child after an error


def _analyze_steps(run: Path, out: Path, z: np.ndarray, epoch: int, figures: Path, umap_job: "_UMAPJob | None",
                   seconds: dict[str, float], timed: _Timer, start: float, opts: AnalyzeOptions, *,
                   progress: bool) -> AnalysisResult:
    n, zdim = z.shape

    # ---------------------------------------------------------------- latent space
    pca, kmeans = _latent_pca_and_kmeans(out, z, timed, opts)
    ksample = opts.ksample
    pc_coords, pc_latents = _latent_pc_traversals(out, pca, zdim, opts)

    # ---------------------------------------------------------------- maps
    # generated in a thread (torch releases the interpreter lock in its kernels) while this one
    # draws the figures; the figures of the maps wait for it
    maps_job = None
    if not opts.skip_vol:
        maps_job = _MapsJob(run, epoch, zdim, seconds, timed,
                            [(out / f"kmeans{ksample}", z[kmeans.center_indices])] if kmeans is not None else [],
                            [(pc, out / f"pc{pc}", pc_latents[pc]) for pc in pc_latents],
                            dict(opts.maps.generate_kwargs(), progress=progress), device=opts.maps.device)
    history = read_training_history(run)

    got: dict[str, UMAPResult] = {}

    def get_umap() -> UMAPResult:
        """UMAP's result (waiting for the background process the first time)."""
        if "umap" not in got:
            with timed("umap"):
                res = umap_job.result()
                _save_npy(out / "umap.npy", res.embedding)
                if res.subsampled:
                    _save_npy(out / "umap_fit_indices.npy", res.fit_indices)
            log.info("UMAP: fitted on %d of %d particles (%s; %.1f s waited for it here)", res.fit_indices.size, n,
                     "in a background process" if umap_job.background else "in this process", seconds["umap"])
            got["umap"] = res
        return got["umap"]

    # ---------------------------------------------------------------- plots and report
    # the figures of UMAP and of the maps are drawn last, so the others are drawn while the
    # background UMAP and the map thread finish
    try:
        with timed("plots"):
            sections = _plot_and_describe(out, figures, run=run, z=z, epoch=epoch, pca=pca, kmeans=kmeans,
                                          ksample=ksample, get_umap=get_umap if umap_job is not None else None,
                                          umap_fit_max=umap_job.kwargs["fit_max"] if umap_job is not None else 0,
                                          pc_coords=pc_coords, get_maps=maps_job.result if maps_job else None,
                                          history=history, map_views=opts.map_views)
            if not opts.skip_vol:  # decoders with attention queries (CryoFormer): their maps and a section
                from cryoscape.report.attention import attention_section

                attention = attention_section(run, out, figures, z=z, epoch=epoch)
                sections = list(sections) + ([attention] if attention is not None else [])
            report = write_html_report(out / "report.html", title=f"cryoscape analyze: {run.name}, epoch {epoch}",
                                       subtitle=f"{n} particles, zdim {zdim}", sections=sections)
        kmeans_maps, pc_maps = maps_job.result() if maps_job else (None, {})
    finally:
        if maps_job is not None:
            maps_job.join()
    # waits are counted as "umap" and "maps"
    seconds["plots"] -= seconds.get("umap", 0.0) + seconds.pop("maps wait", 0.0)
    umap_result = got.get("umap")
    seconds["total"] = time.perf_counter() - start
    n_maps = (len(kmeans_maps.paths) if kmeans_maps else 0) + sum(len(m.paths) for m in pc_maps.values())
    log.info("analysis done in %.1f s (%s); maps made in a thread alongside the plots; %d map(s); report: %s",
             seconds["total"], ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items() if k != "total"), n_maps,
             report)
    return AnalysisResult(outdir=out, report=report, epoch=epoch, z=z, pca=pca, kmeans=kmeans, umap=umap_result,
                          kmeans_maps=kmeans_maps, pc_maps=pc_maps, pc_coordinates=pc_coords, seconds=seconds)


def _latent_pca_and_kmeans(out: Path, z: np.ndarray, timed: _Timer, opts: AnalyzeOptions
                           ) -> tuple[PCAResult, KMeansResult | None]:
    """PCA of the latents and k-means with ``opts.ksample`` centres (none when 0), written into ``out``."""
    from cryoscape.io.writers import atomic_write

    n = len(z)
    with timed("pca"):
        pca = compute_pca(z)
        _save_npy(out / "z_pca.npy", pca.projections)
        _save_text(out / "pca_explained_variance.txt", pca.explained_variance_ratio)
        _save_text(out / "pca_components.txt", pca.components)
        _save_text(out / "pca_mean.txt", pca.mean[None])
    log.info("PCA explained variance ratio: %s", np.array2string(pca.explained_variance_ratio, precision=3))
    if opts.ksample <= 0:
        return pca, None
    with timed("kmeans"):
        k = min(opts.ksample, n)
        if k < opts.ksample:
            log.info("only %d particles: k-means with k = %d instead of %d", n, k, opts.ksample)
        kmeans = kmeans_on_data(z, k, seed=opts.seed)
        kdir = out / f"kmeans{opts.ksample}"
        kdir.mkdir(exist_ok=True)
        _save_npy(kdir / "labels.npy", kmeans.labels)
        with atomic_write(kdir / "labels.pkl", "wb") as f:
            pickle.dump(kmeans.labels.astype(np.int32), f)
        _save_text(kdir / "centers.txt", kmeans.centers)
        _save_text(kdir / "centers_ind.txt", kmeans.center_indices, fmt="%d")
        _save_text(kdir / "z_values.txt", z[kmeans.center_indices])
    log.info("k-means (k = %d): cluster sizes %s", kmeans.k, kmeans.counts.tolist())
    return pca, kmeans


def _latent_pc_traversals(out: Path, pca: PCAResult, zdim: int, opts: AnalyzeOptions
                          ) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray]]:
    """Points along each of the first ``opts.n_pcs`` latent PCs: ``{pc: coordinates}``, ``{pc: latents}``."""
    n_pcs_used = min(opts.n_pcs, zdim)
    if n_pcs_used < opts.n_pcs:
        log.info("the latent space has %d dimension(s): traversing %d PC(s) instead of %d", zdim, n_pcs_used,
                 opts.n_pcs)
    pc_coords: dict[int, np.ndarray] = {}
    pc_latents: dict[int, np.ndarray] = {}
    for pc in range(1, n_pcs_used + 1):
        pc_coords[pc], pc_latents[pc] = pc_traversal(pca, pc, n_points=opts.n_per_pc)
        pdir = out / f"pc{pc}"
        pdir.mkdir(exist_ok=True)
        _save_text(pdir / "pc_coordinates.txt", pc_coords[pc])
        _save_text(pdir / "z_values.txt", pc_latents[pc])
    return pc_coords, pc_latents


def _plot_and_describe(out: Path, figures: Path, *, run: Path, z: np.ndarray, epoch: int, pca: PCAResult,
                       kmeans: KMeansResult | None, ksample: int, get_umap, umap_fit_max: int,
                       pc_coords: dict[int, np.ndarray], get_maps, history: list[dict[str, Any]],
                       map_views: bool = True) -> list[Section]:
    """Draw every plot into ``figures`` and return the report's sections.

    ``get_umap`` (or ``None``: no UMAP) returns the UMAP result, ``get_maps`` (or ``None``: no
    maps) the ``(k-means MapSet, {pc: MapSet})`` of the map thread; figures that need them are
    placeholders (callables) filled in after all the others are drawn.
    """
    from cryoscape.report import plots

    n, zdim = z.shape
    want_umap = get_umap is not None and zdim >= 2
    sections: list[Section] = []

    sections.append(_overview_section(out, run=run, epoch=epoch, n=n, zdim=zdim, want_umap=want_umap))
    sections.append(_latent_section(figures, z=z, pca=pca, want_umap=want_umap, get_umap=get_umap,
                                    umap_fit_max=umap_fit_max))

    if kmeans is not None:
        sections.append(_kmeans_section(out, figures, z=z, pca=pca, kmeans=kmeans, ksample=ksample,
                                        want_umap=want_umap, get_umap=get_umap, get_maps=get_maps,
                                        map_views=map_views))
    sections += [_pc_section(out, figures, pc=pc, coords=coords, pca=pca, zdim=zdim, get_maps=get_maps,
                             map_views=map_views) for pc, coords in pc_coords.items()]

    # -- training
    if history:
        sections.append(Section(
            "Training", paragraphs=[f"{len(history)} epoch(s) recorded in the run's checkpoint."],
            figures=[Figure(plots.plot_learning_curve(history, figures / "learning_curve.png", mark_epoch=epoch),
                            "Learning curve: loss per epoch (mean over the epoch's batches)")]))
    for section in sections:  # now the figures that wait for UMAP and the maps
        section.figures = [f() if callable(f) else f for f in section.figures]
    return sections


def _overview_section(out: Path, *, run: Path, epoch: int, n: int, zdim: int, want_umap: bool) -> Section:
    """The overview section: which run, epoch and latents were analysed, and links to the files written."""
    overview = [
        f"Run {run} at epoch {epoch} (0-based; cryoDRGN would call it epoch {epoch + 1}): {n} particles, "
        f"{zdim}-dimensional latent space (the per-particle posterior means, z.{epoch}.npy).",
    ]
    files = [(out / "z_pca.npy", "PCA coordinates (z_pca.npy)"),
             (out / "pca_explained_variance.txt", "explained variance per PC")]
    if want_umap:
        files.append((out / "umap.npy", "UMAP embedding (umap.npy)"))
    files.append((out / "config.yaml", "arguments (config.yaml)"))
    files.append((out / "analyze.log", "log (analyze.log)"))
    return Section("Overview", paragraphs=overview, links=files)


def _latent_section(figures: Path, *, z: np.ndarray, pca: PCAResult, want_umap: bool, get_umap,
                    umap_fit_max: int) -> Section:
    """The latent-space section: histogram (1-D) or PCA plots now, UMAP plots as placeholders drawn later."""
    from cryoscape.report import plots

    n, zdim = z.shape
    latent_figs: list[Figure] = []
    paragraphs: list[str] = []
    if zdim == 1:
        latent_figs.append(Figure(plots.plot_latent_histogram(z[:, 0], figures / "z_histogram.png", xlabel="z",
                                                              title="latent distribution"),
                                  "Histogram of the 1-D latent"))
    else:
        ev = pca.explained_variance_ratio
        paragraphs.append("PCA: " + ", ".join(f"PC{i + 1} {100 * v:.1f} %" for i, v in enumerate(ev[:6]))
                          + " of the latent variance.")
        xy = pca.projections[:, :2]
        latent_figs += [
            Figure(plots.plot_scatter(xy, figures / "pca_scatter.png", xlabel="PC1", ylabel="PC2",
                                      title="particles on PC1-PC2"), "Particles projected on PC1 and PC2"),
            Figure(plots.plot_joint(xy, figures / "pca_density.png", xlabel="PC1", ylabel="PC2",
                                    title="density on PC1-PC2"),
                   "Density (log scale) on PC1-PC2 with the marginal distributions"),
            Figure(plots.plot_explained_variance(ev, figures / "pca_explained_variance.png"),
                   "Explained variance ratio per principal component"),
            Figure(plots.plot_latent_marginals(z, figures / "z_marginals.png", prefix="z"),
                   "Marginal distribution of each latent coordinate"),
        ]
        if want_umap:
            note = ""
            if n > umap_fit_max:
                note = (f" UMAP was fitted on {umap_fit_max} particles drawn at random; the other "
                        f"{n - umap_fit_max} were placed at the weighted mean of their 10 nearest "
                        "fitted neighbours' embeddings (umap_fit_indices.npy lists the fitted ones).")
            paragraphs.append("UMAP (umap-learn, 15 neighbours, min_dist 0.1) embeds the latents in 2-D; distances "
                              "between far-apart groups in it are not meaningful." + note)
            latent_figs += [
                lambda: Figure(plots.plot_scatter(get_umap().embedding, figures / "umap_scatter.png", xlabel="UMAP1",
                                                  ylabel="UMAP2", title="UMAP"), "UMAP embedding of the latents"),
                lambda: Figure(plots.plot_hexbin(get_umap().embedding, figures / "umap_density.png", xlabel="UMAP1",
                                                 ylabel="UMAP2", title="density on UMAP"),
                               "Density (log scale) of the UMAP embedding"),
            ]
    return Section("Latent space", paragraphs=paragraphs, figures=latent_figs)


def _kmeans_section(out: Path, figures: Path, *, z: np.ndarray, pca: PCAResult, kmeans: KMeansResult, ksample: int,
                    want_umap: bool, get_umap, get_maps, map_views: bool) -> Section:
    """The k-means section: clusters on PC1-PC2 (and UMAP), sizes, the centres' maps, the cluster table."""
    from cryoscape.analysis.maps import map_paths
    from cryoscape.report import plots

    n, zdim = z.shape
    labels = kmeans.labels
    kdir = out / f"kmeans{ksample}"
    kfigs: list[Figure] = []
    centers_idx = kmeans.center_indices
    if zdim == 1:
        kfigs.append(Figure(plots.plot_latent_histogram(
            z[:, 0], figures / "kmeans_histogram.png", labels=labels, marks=z[centers_idx, 0],
            mark_labels=[str(i) for i in range(kmeans.k)], xlabel="z", title=f"k-means, k = {kmeans.k}"),
            "Latent histogram stacked by cluster; dashed lines: on-data centres"))
    else:
        kfigs.append(Figure(plots.plot_scatter(
            pca.projections[:, :2], figures / "kmeans_pca.png", labels=labels,
            centers=pca.projections[centers_idx, :2], xlabel="PC1", ylabel="PC2",
            title=f"k-means clusters (k = {kmeans.k}) on PC1-PC2"),
            "Particles coloured by cluster; crosses: on-data centres (numbered)"))
        if want_umap:
            kfigs.append(lambda: Figure(plots.plot_scatter(
                get_umap().embedding, figures / "kmeans_umap.png", labels=labels,
                centers=get_umap().embedding[centers_idx], xlabel="UMAP1", ylabel="UMAP2",
                title=f"k-means clusters (k = {kmeans.k}) on UMAP"), "Clusters on the UMAP embedding"))
    kfigs.append(Figure(plots.plot_cluster_sizes(kmeans.counts, figures / "kmeans_sizes.png"),
                        "Particles per cluster"))
    kmeans_paths = map_paths(kdir, kmeans.k) if get_maps is not None else None
    links: list[tuple[str | os.PathLike, str]] = []
    if get_maps is not None:
        kfigs.append(lambda: Figure(plots.plot_map_projections(
            get_maps()[0].projections, figures / "kmeans_maps.png",
            titles=[f"cluster {i}" for i in range(kmeans.k)]),
            "Projections along z of the maps at the on-data centres (each scaled to its own range)"))
        if map_views:
            kfigs.append(lambda: map_set_views(get_maps()[0].paths, figures / "kmeans_map_views.png",
                                               kdir / "maps.cxc", titles=[f"cluster {i}" for i in range(kmeans.k)],
                                               what=f"maps at the k-means on-data centres (k = {kmeans.k})"))
    if get_maps is not None and map_views:
        links.append((kdir / "maps.cxc", "ChimeraX: the maps as a volume series (maps.cxc)"))
    rows = []
    for c in range(kmeans.k):
        row: list[Any] = [c, int(kmeans.counts[c]), f"{100.0 * kmeans.counts[c] / n:.1f}", int(centers_idx[c])]
        row.append(Link(kmeans_paths[c], kmeans_paths[c].name) if kmeans_paths is not None else "-")
        rows.append(row)
    table = Table(["cluster", "particles", "%", "on-data particle", "map"], rows,
                  caption="k-means clusters: the map of each is made at its on-data centre, the particle "
                          "latent nearest to the cluster's mean")
    links += [(kdir / "labels.pkl", "cluster labels (labels.pkl / labels.npy)"),
             (kdir / "centers_ind.txt", "on-data centre particle indices"),
             (kdir / "z_values.txt", "on-data centre latents"), (kdir / "centers.txt", "k-means centres")]
    return Section(
        f"k-means clustering (k = {kmeans.k})",
        paragraphs=["k-means partitions the latent space into regions; each region is represented by the map at "
                    "its on-data centre (thesis 4.4.5). Cluster labels can select particles for other tools."],
        figures=kfigs, tables=[table], links=links)


def _pc_section(out: Path, figures: Path, *, pc: int, coords: np.ndarray, pca: PCAResult, zdim: int, get_maps,
                map_views: bool) -> Section:
    """The section of the traversal along one PC: positions, the maps' projections and pictures, links."""
    from cryoscape.analysis.maps import map_paths
    from cryoscape.report import plots

    pdir = out / f"pc{pc}"
    figs = [Figure(plots.plot_traversal_positions(
        pca.projections[:, pc - 1], coords, figures / f"pc{pc}_positions.png", xlabel=f"PC{pc}",
        title=f"PC{pc}: {len(coords)} points, 5th-95th percentile"),
        f"Histogram of the particles' PC{pc} coordinate; dashed lines: the traversal's points")]
    links = [(pdir / "z_values.txt", "latents (z_values.txt)"), (pdir / "pc_coordinates.txt", "PC coordinates")]
    if get_maps is not None:
        figs.append(lambda pc=pc, coords=coords: Figure(
            plots.plot_map_projections(get_maps()[1][pc].projections, figures / f"pc{pc}_maps.png",
                                       titles=[f"{i}: {c:.3g}" for i, c in enumerate(coords)]),
            f"Projections along z of the maps along PC{pc} (title: map, PC{pc} coordinate)"))
        if map_views:
            figs.append(lambda pc=pc, coords=coords, pdir=pdir: map_set_views(
                get_maps()[1][pc].paths, figures / f"pc{pc}_map_views.png", pdir / "maps.cxc",
                titles=[f"{i}: {c:.3g}" for i, c in enumerate(coords)], what=f"maps along PC{pc}"))
            links.append((pdir / "maps.cxc", "ChimeraX: the maps as a volume series (maps.cxc)"))
        links += [(p, p.name) for p in map_paths(pdir, len(coords))]
    label = "the latent" if zdim == 1 else f"principal component {pc}"
    return Section(
        f"Traversal along PC{pc}",
        paragraphs=[f"Maps at {len(coords)} equally spaced points along {label}, from the 5th to the 95th "
                    "percentile of the particles' coordinates, other PCs at the mean (thesis 4.4.11)."],
        figures=figs, links=links)


def map_set_views(paths: list[Path], figure: Path, chimerax: Path, *, titles: list[str], what: str) -> Figure:
    """Isosurfaces and central slices of one map set (one level for all) and its ChimeraX ``.cxc``."""
    from cryoscape.report.mapviews import write_map_set_views

    path, level = write_map_set_views(paths, figure, chimerax, titles=titles, what=what)
    return Figure(path, f"The {what}: isosurface at {level:.3g} (Otsu's level of the set, also in {chimerax.name}) "
                        "and the central slices through the origin voxel")


class _MapsJob:
    """The analysis's maps, generated in a thread: ``result()`` waits and returns ``(k-means
    MapSet or None, {pc: MapSet})`` (or raises what the thread raised)."""

    def __init__(self, run: Path, epoch: int, zdim: int, seconds: dict[str, float], timed: "_Timer",
                 kmeans_job: list[tuple[Path, np.ndarray]], pc_jobs: list[tuple[int, Path, np.ndarray]],
                 options: dict[str, Any], *, device: str):
        import threading

        self._result: tuple[MapSet | None, dict[int, MapSet]] | None = None
        self._error: BaseException | None = None
        self._timed = timed

        def work():
            from cryoscape.analysis.maps import generate_maps, load_map_model

            try:
                start = time.perf_counter()
                model = load_map_model(run, epoch=epoch, device=device)
                if model.zdim != zdim:
                    raise InputError(f"{run}: the decoder of epoch {epoch} has zdim {model.zdim} but z.{epoch}.npy "
                                     f"has {zdim} columns; pass a matching --epoch.", path=run)
                kmeans_maps = None
                for folder, latents in kmeans_job:
                    kmeans_maps = generate_maps(model, latents, folder, **options)
                pc_maps = {pc: generate_maps(model, latents, folder, **options) for pc, folder, latents in pc_jobs}
                self._result = (kmeans_maps, pc_maps)
                seconds["maps"] = time.perf_counter() - start
            except BaseException as err:  # re-raised in the caller's thread by result()
                self._error = err

        self._thread = threading.Thread(target=work, name="cryoscape-maps", daemon=True)
        self._thread.start()

    def join(self) -> None:
        self._thread.join()

    def result(self) -> tuple[MapSet | None, dict[int, MapSet]]:
        if self._thread.is_alive():
            with self._timed("maps wait"):
                self._thread.join()
        if self._error is not None:
            raise self._error
        return self._result

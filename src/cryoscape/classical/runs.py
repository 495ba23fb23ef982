"""Particle tables in, run folders out: the library side of ``cryoscape refine`` and ``classify``.

Output of a refinement (``OUT/``): ``map.mrc`` (both halves joined, MAP-filtered), ``half1.mrc``,
``half2.mrc``, ``fsc.txt``/``fsc.png`` (half-map FSC), ``particles.star`` (the input rows with the
refined poses in RELION columns, ``rlnRandomSubset`` and ``rlnMaxValueProbDistribution``),
``poses.pkl`` (cryoDRGN layout), ``iterations.tsv`` (resolution and pose changes per iteration)
and ``checkpoint.pt`` (``--resume``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cryoscape.classical.refine import ImageSource, RefineSettings, RefineState, refine
from cryoscape.errors import InputError

__all__ = ["source_from_table", "initial_map_file", "read_initial_map", "refine_particles", "classify_particles", "write_iterations"]

log = logging.getLogger(__name__)


def source_from_table(table, *, use_ctf: bool = True, invert_contrast: bool = True) -> ImageSource:
    """An :class:`ImageSource` reading the table's stacks lazily with its CTF."""
    from cryoscape.data.images import ParticleImages
    from cryoscape.fourier.ctf import ctf_images_from_table

    images = ParticleImages(table.image_paths, table.image_indices, box_size=table.box_size,
                            table_path=table.source_path)
    D = images.box_size
    ctf = None
    if use_ctf:
        table.require_ctf()
        table.require_pixel_size()

        def ctf(idx, freqs):
            return ctf_images_from_table(table.ctf, table.pixel_size_angstrom, D, idx, freqs_cycles_per_pixel=freqs)

    return ImageSource(images.read, D, ctf=ctf, invert_contrast=invert_contrast)


def initial_map_file(path) -> Path:
    """The map file behind ``--initial-map``: the path itself, or for a folder (an ``abinit`` or
    ``train`` run) its last ``reconstruct.E.mrc`` (highest epoch ``E``)."""
    path = Path(path)
    if not path.is_dir():
        return path
    epochs = []
    for candidate in path.glob("reconstruct.*.mrc"):
        middle = candidate.name[len("reconstruct."):-len(".mrc")]
        if middle.isdigit():
            epochs.append((int(middle), candidate))
    if not epochs:
        raise InputError(f"{path} is a folder without reconstruct.E.mrc maps; pass a homogeneous abinit run "
                         f"folder or a map .mrc as --initial-map.")
    chosen = max(epochs)[1]
    log.info("initial map: %s (the last map of the run folder %s)", chosen.name, path)
    return chosen


def read_initial_map(path, box_size: int) -> torch.Tensor:
    """The initial map as a ``(D, D, D)`` tensor (a map file, or an abinit run folder's last map:
    :func:`initial_map_file`); one sentence if its box differs from the images'."""
    from cryoscape.io.mrc import read_mrc

    path = initial_map_file(path)
    volume, _ = read_mrc(path)
    if volume.ndim != 3 or volume.shape != (box_size,) * 3:
        raise InputError(f"{path} is a map of shape {volume.shape}, but the particles are {box_size} pixels; "
                         f"resample the map to a {box_size}^3 box first.")
    return torch.as_tensor(np.asarray(volume, dtype=np.float32))


def write_iterations(path: Path, history: list[dict]) -> None:
    """``iterations.tsv``: one row per iteration."""
    from cryoscape.io.writers import atomic_write

    with atomic_write(path, "w") as f:
        pd.DataFrame(history).to_csv(f, sep="\t", index=False, float_format="%.4g")


def _write_particles(out: Path, table, state: RefineState) -> None:
    from cryoscape.io.cryodrgn import write_poses_pkl_from_table
    from cryoscape.io.star import write_star

    refined = table.subset(np.arange(len(table)))
    refined.rotations = state.rotations.double().numpy()
    refined.shifts_pixel = state.shifts_pixel.double().numpy()
    if refined.star_rows is not None:
        refined.star_rows["rlnRandomSubset"] = state.sets + 1
        refined.star_rows["rlnMaxValueProbDistribution"] = state.max_probability.double().numpy()
    write_star(out / "particles.star", refined)
    write_poses_pkl_from_table(out / "poses.pkl", refined)


def refine_particles(table, initial_map_path, out_dir, settings: RefineSettings, *, resume: bool = False,
                     use_ctf: bool = True, invert_contrast: bool = True) -> RefineState:
    """Refine ``table`` from an initial map and write the run folder (module docstring)."""
    from cryoscape.reconstruct.backproject import BackprojectionResult, write_backprojection

    out = Path(out_dir)
    source = source_from_table(table, use_ctf=use_ctf, invert_contrast=invert_contrast)
    pixel = float(np.nanmedian(table.pixel_size_angstrom)) if use_ctf else 1.0
    initial = read_initial_map(initial_map_path, source.box_size)
    checkpoint = out / "checkpoint.pt"
    if resume and not checkpoint.exists():
        raise InputError(f"{out} has no checkpoint.pt to resume from; run without --resume.")
    if not resume and checkpoint.exists():
        raise InputError(f"{out} already holds a refinement (checkpoint.pt); pass --resume or another -o.")

    def on_iteration(state, summary):
        write_iterations(out / "iterations.tsv", state.history)

    state = refine(source, len(table), initial, pixel, settings, checkpoint=checkpoint, resume=resume,
                   initial_shifts_pixel=table.shifts_pixel, on_iteration=on_iteration)
    result = BackprojectionResult(volume=state.final_map, half_maps=state.half_maps, fsc=state.fsc,
                                  n_particles=len(table), regularization=f"MAP, T = {settings.tau2_fudge:g}")
    summary = write_backprojection(out, result, pixel_size_angstrom=pixel)
    _write_particles(out, table, state)
    log.info("refinement %s after %d iterations: %.2f A", "converged" if state.converged else "stopped",
             state.iteration, summary.get("res_0.143_angstrom", float("nan")))
    return state


def classify_particles(table, initial_map_path, out_dir, settings, *, resume: bool = False, use_ctf: bool = True,
                       invert_contrast: bool = True):
    """Classify ``table`` and write ``classNNN.mrc``, ``classNNN.star`` (subsets of the input rows),
    ``particles.star`` (all, with ``rlnClassNumber`` and ``rlnMaxValueProbDistribution``),
    ``model.tsv`` (population and resolution of each class), ``iterations.tsv``, ``checkpoint.pt``."""
    from cryoscape.classical.classify import classify
    from cryoscape.io.mrc import write_mrc
    from cryoscape.io.star import write_star

    out = Path(out_dir)
    table.require_poses()
    source = source_from_table(table, use_ctf=use_ctf, invert_contrast=invert_contrast)
    pixel = float(np.nanmedian(table.pixel_size_angstrom)) if use_ctf else 1.0
    initial = read_initial_map(initial_map_path, source.box_size)
    checkpoint = out / "checkpoint.pt"
    if resume and not checkpoint.exists():
        raise InputError(f"{out} has no checkpoint.pt to resume from; run without --resume.")
    if not resume and checkpoint.exists():
        raise InputError(f"{out} already holds a classification (checkpoint.pt); pass --resume or another -o.")
    shifts = table.shifts_pixel if table.shifts_pixel is not None else np.zeros((len(table), 2))
    state = classify(source, len(table), initial, pixel, settings, rotations=table.rotations, shifts_pixel=shifts,
                     checkpoint=checkpoint, resume=resume,
                     on_iteration=lambda s, _: write_iterations(out / "iterations.tsv", s.history))
    labels = state.probabilities.argmax(1).numpy()
    rows = []
    for k in range(settings.n_classes):
        write_mrc(out / f"class{k + 1:03d}.mrc", state.maps[k].numpy(), pixel_size_angstrom=pixel)
        members = np.flatnonzero(labels == k)
        if len(members):
            write_star(out / f"class{k + 1:03d}.star", table, indices=members, image_names="keep")
        rows.append({"class": k + 1, "population": float(state.populations[k]), "n_particles": len(members),
                     "resolution_angstrom": float(state.fsc[k]["res_0.143_angstrom"])})
    write_iterations(out / "model.tsv", rows)
    labelled = table.subset(np.arange(len(table)))
    if settings.align:
        labelled.rotations = state.rotations.double().numpy()
        labelled.shifts_pixel = state.shifts_pixel.double().numpy()
    if labelled.star_rows is not None:
        labelled.star_rows["rlnClassNumber"] = labels + 1
        labelled.star_rows["rlnMaxValueProbDistribution"] = state.probabilities.max(1).values.double().numpy()
    write_star(out / "particles.star", labelled)
    log.info("classes: %s", rows)
    return state

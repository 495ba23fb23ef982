"""Slow end-to-end run of the micrograph EM from another conformation (the setting of bench/micrographs.py).

The built-in molecule at hinge 0 degrees in 4 micrographs of 512^2 pixels at D = 32 (7.8 A/pixel), 28
separated particles each, SNR 1 per pixel of the particle boxes; the initial map is the molecule at hinge
40 degrees low-passed to 40 A (FSC=0.5 to the truth at 42.1 A, AUC 0.358).  Measured (bench/results/
micrographs_a.txt): the first iteration at box 16 (band limit 31.2 A) reaches the band limit (31.0 A, AUC
0.387); later iterations drift back (49 A after 4), which is the open part of issue 17.
"""

import csv

import numpy as np
import pytest

from cryoscape.cli.main import main
from cryoscape.fourier.filters import lowpass_filter
from cryoscape.io.mrc import write_mrc
from cryoscape.simulate.ensembles import _render_hinge
from cryoscape.simulate.molecule import default_pixel_size_angstrom

pytestmark = pytest.mark.slow


def test_first_em_iteration_from_another_conformation_reaches_the_band_limit(tmp_path):
    import torch

    D = 32
    pixel = default_pixel_size_angstrom(D)
    init = lowpass_filter(torch.from_numpy(_render_hinge(40.0, D, pixel, 3 * pixel)), 40.0, pixel, ndim=3)
    write_mrc(tmp_path / "init.mrc", init.numpy().astype(np.float32), pixel_size_angstrom=pixel)
    mics = tmp_path / "mics"
    assert main(["simulate", "micrographs", "-o", str(mics), "--n-micrographs", "4", "--micrograph-size", "512",
                 "-D", "32", "--particles-per-micrograph", "28", "--hinge-angle-deg", "0", "--snr", "1",
                 "--seed", "1"]) == 0
    out = tmp_path / "em"
    assert main(["micrograph-em", str(mics / "micrographs.star"), "--initial-map", str(tmp_path / "init.mrc"),
                 "--box-size", "32", "-o", str(out), "--reference", str(mics / "gt_volumes/vol_000.mrc"),
                 "--schedule", "16:0:1:0.5", "--no-progress"]) == 0
    with open(out / "iterations.tsv") as f:
        row = next(csv.DictReader(f, delimiter="\t"))
    assert float(row["fsc_0.5_angstrom"]) < 33.0  # from 42.1 A; the stage's band limit is 31.2 A
    assert float(row["fsc_auc"]) > 0.375  # from 0.358


def test_first_em_iteration_with_overlapping_particles_still_improves(tmp_path):
    """Boxes only kept disjoint (``--placement arbitrary``), 110 particles per micrograph: 58 % of the
    non-empty patches cut two or more particle boxes, against the model's one.  Measured: the FSC AUC
    rises from 0.358 to 0.379 in the first iteration, while the FSC=0.5 crossing moves from 42.1 A to
    48.4 A (the curve runs close to 0.5 over 35-50 A); the separated case reaches 31.0 A."""
    import torch

    from cryoscape.io.micrographs import read_coordinates_star

    D = 32
    pixel = default_pixel_size_angstrom(D)
    init = lowpass_filter(torch.from_numpy(_render_hinge(40.0, D, pixel, 3 * pixel)), 40.0, pixel, ndim=3)
    write_mrc(tmp_path / "init.mrc", init.numpy().astype(np.float32), pixel_size_angstrom=pixel)
    mics = tmp_path / "mics"
    assert main(["simulate", "micrographs", "-o", str(mics), "--n-micrographs", "2", "--micrograph-size", "512",
                 "-D", "32", "--particles-per-micrograph", "110", "--placement", "arbitrary", "--hinge-angle-deg", "0",
                 "--snr", "1", "--seed", "1"]) == 0
    coords = read_coordinates_star(mics / "particles.star")
    shared = _fraction_of_patches_cutting_two(coords, D, 512)
    assert shared > 0.4
    out = tmp_path / "em"
    assert main(["micrograph-em", str(mics / "micrographs.star"), "--initial-map", str(tmp_path / "init.mrc"),
                 "--box-size", "32", "-o", str(out), "--reference", str(mics / "gt_volumes/vol_000.mrc"),
                 "--schedule", "16:0:1:0.5", "--no-progress"]) == 0
    with open(out / "iterations.tsv") as f:
        row = next(csv.DictReader(f, delimiter="\t"))
    assert float(row["fsc_auc"]) > 0.37  # from 0.358


def _fraction_of_patches_cutting_two(coords, D, size):
    """Fraction of the non-empty patches whose area meets two or more particle boxes."""
    n = size // D
    counts = np.zeros((2, n, n), dtype=int)
    names = sorted(set(coords["rlnMicrographName"]))
    py, px = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    for name, x, y in zip(coords["rlnMicrographName"], coords["rlnCoordinateX"], coords["rlnCoordinateY"]):
        g = names.index(name)
        counts[g] += (np.abs(y - D // 2 - py * D) < D) & (np.abs(x - D // 2 - px * D) < D)
    return float((counts >= 2).sum() / max((counts >= 1).sum(), 1))

"""Micrograph STAR files: RELION 3.1 / 3.0 (CTFFIND) layouts, round trip, clear errors."""

import numpy as np
import pytest

from cryoscape.errors import InputError
from cryoscape.io.micrographs import (
    MicrographTable,
    read_micrograph,
    read_micrographs_star,
    write_micrographs_star,
)
from cryoscape.io.mrc import write_mrc
from cryoscape.io.particles import CtfParameters


def _micrographs(tmp_path, n=2):
    names = []
    for g in range(n):
        write_mrc(tmp_path / f"m{g}.mrc", np.full((20, 30), g, np.float32), pixel_size_angstrom=1.5, is_stack=False)
        names.append(f"m{g}.mrc")
    return names


def test_round_trip_relion31(tmp_path):
    names = _micrographs(tmp_path)
    ctf = CtfParameters(defocus_u_angstrom=[15000.5, 20000.25], defocus_v_angstrom=[14000, 19000.5],
                        defocus_angle_deg=[10, 80], voltage_kv=[300, 300], cs_mm=[2.7, 2.7],
                        amplitude_contrast=[0.1, 0.1], phase_shift_deg=[0, 0])
    table = MicrographTable(np.array([str(tmp_path / n) for n in names], object), np.array([1.5, 1.5]), ctf,
                            np.zeros(2), np.array(names, object))
    write_micrographs_star(tmp_path / "mics.star", table)
    back = read_micrographs_star(tmp_path / "mics.star")
    assert list(back.paths) == [str((tmp_path / n).resolve()) for n in names]
    np.testing.assert_allclose(back.ctf.defocus_v_angstrom, [14000, 19000.5])
    np.testing.assert_allclose(back.pixel_size_angstrom, [1.5, 1.5])
    assert read_micrograph(back.paths[1]).shape == (20, 30) and read_micrograph(back.paths[1])[0, 0] == 1


def test_relion30_ctffind_layout(tmp_path):
    names = _micrographs(tmp_path)
    text = "data_\nloop_\n_rlnMicrographName #1\n_rlnDefocusU #2\n_rlnDefocusV #3\n_rlnDefocusAngle #4\n" \
           "_rlnVoltage #5\n_rlnSphericalAberration #6\n_rlnAmplitudeContrast #7\n_rlnMagnification #8\n" \
           "_rlnDetectorPixelSize #9\n_rlnCtfFigureOfMerit #10\n"
    for n in names:
        text += f"{n} 12000 11000 45 200 2.0 0.07 10000 5.0 0.2\n"
    (tmp_path / "ctffind.star").write_text(text)
    table = read_micrographs_star(tmp_path / "ctffind.star")
    np.testing.assert_allclose(table.pixel_size_angstrom, 5.0)  # 5 um * 1e4 / 10000
    np.testing.assert_allclose(table.ctf.voltage_kv, 200)
    np.testing.assert_allclose(table.ctf.amplitude_contrast, 0.07)


def test_missing_micrograph_and_missing_ctf_are_one_sentence(tmp_path):
    (tmp_path / "bad.star").write_text("data_\nloop_\n_rlnMicrographName #1\n_rlnMicrographPixelSize #2\nnope.mrc 1.0\n")
    with pytest.raises(InputError, match="nope.mrc.*--datadir"):
        read_micrographs_star(tmp_path / "bad.star")
    names = _micrographs(tmp_path, 1)
    (tmp_path / "noctf.star").write_text(f"data_\nloop_\n_rlnMicrographName #1\n_rlnMicrographPixelSize #2\n{names[0]} 1.0\n")
    table = read_micrographs_star(tmp_path / "noctf.star")
    assert table.ctf is None
    with pytest.raises(InputError, match="CTF"):
        table.require_ctf()

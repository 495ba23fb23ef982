"""bench/common.relion_auto_refine_command builds the RELION auto-refine commands the recorded benchmark
runs used, flag for flag (bench/results/*: their ``relion command:`` lines)."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
from common import relion_auto_refine_command  # noqa: E402


def recorded(name: str) -> str:
    """The ``relion command:`` line of a results file, without the note's prefix."""
    line = next(x for x in (ROOT / "bench" / "results" / name).read_text().splitlines() if "relion command:" in x)
    return line.split("relion command: ", 1)[1].strip()


def test_refine_benchmark_command_is_the_recorded_one():
    command = relion_auto_refine_command(2, "particles.star", "/tmp/cryoscape-bench/refine/relion/run",
                                         "/tmp/cryoscape-bench/refine/init/gt_volumes/vol_000.mrc",
                                         ini_high_angstrom=40, particle_diameter_angstrom=200, healpix_order=2,
                                         local_healpix_order=4, offset_range_pixel=5, offset_step_pixel=2,
                                         extra=["--firstiter_cc"])
    assert " ".join(str(c) for c in ["timeout", 1, *command]) == recorded("refine_2026-12-04_n5000.txt")


def test_local_refine_benchmark_command_is_the_recorded_one():
    run = Path("/tmp/lead/relion_8000")
    command = relion_auto_refine_command(2, run / "perturbed.star", run / "relion" / "run", run / "reference.mrc",
                                         ini_high_angstrom=20.0, particle_diameter_angstrom=200.0, healpix_order=4,
                                         local_healpix_order=4, offset_range_pixel=3, offset_step_pixel=1)
    assert " ".join(str(c) for c in ["timeout", 5400, *command]) == recorded("poses_2026-12-05_relion_local.txt")

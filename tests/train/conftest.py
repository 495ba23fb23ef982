"""Simulated datasets shared by the training tests (made once per test session)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cryoscape.cli.main import main


def simulate(root: Path, name: str, *, n: int, D: int, snr: str, heterogeneity: str, seed: int,
             extra: tuple[str, ...] = ()) -> Path:
    """``cryoscape simulate`` into ``root/name`` (skipped when already there)."""
    out = root / name
    if not (out / "particles.star").is_file():
        code = main(["simulate", "-o", str(out), "-n", str(n), "-D", str(D), "--snr", snr,
                     "--heterogeneity", heterogeneity, "--seed", str(seed), "--oversampling", "1", *extra])
        assert code == 0
    return out


@pytest.fixture(scope="session")
def sim_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("train_sims")


@pytest.fixture(scope="session")
def tiny_dataset(sim_root) -> Path:
    """64 images of 16 px, two classes, SNR 1, shifts up to 1 px: for fast behaviour tests."""
    return simulate(sim_root, "tiny", n=64, D=16, snr="1", heterogeneity="discrete", seed=0,
                    extra=("--n-classes", "2", "--shift-max-pixel", "1"))


@pytest.fixture(scope="session")
def homogeneous_32(sim_root) -> Path:
    """1000 images of 32 px, one map, SNR 1, shifts up to 2 px."""
    return simulate(sim_root, "hom32", n=1000, D=32, snr="1", heterogeneity="none", seed=0,
                    extra=("--shift-max-pixel", "2"))

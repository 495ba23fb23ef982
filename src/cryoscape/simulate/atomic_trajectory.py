"""Datasets from trajectories of atomic models, with the true coordinates of every state.

A trajectory is either a multi-model PDB/mmCIF (one model per state, in order) or the models
:func:`~cryoscape.simulate.atomic_structures.bond_rotation_models` builds from one reference by
turning a backbone bond (the thesis's 1-D motion of 5NI1).  Every state is rendered as Gaussian
atoms (:func:`~cryoscape.simulate.volumes.render_gaussian_atoms`) after subtracting the centroid of
the *first* model (so the states stay superposed and the first equals ``cryoscape simulate
--molecule`` of that model); the result is a ``"trajectory"`` :class:`Ensemble` (image ``i`` shows
state ``rint(u_i (M - 1))``, ``u_i ~ U[0, 1]``).

Ground truth written next to the dataset (:func:`write_atomic_truth`)
-------------------------------------------------------------------
``gt_models.pdb``
    The M all-atom models (file frame), one MODEL per state.
``gt_atomic.npz``
    ``ca_angstrom`` and ``sidechain_angstrom`` ``(M, K, 3)`` in the box frame (file frame minus
    ``origin_angstrom``), ``residue_name``, ``residue_number``, ``chain``, ``origin_angstrom``
    and, for bond rotations, ``angles_deg``.  The true coordinates of image ``i`` are state
    ``ground_truth.npz: state_index[i]``'s.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from cryoscape.errors import InputError
from cryoscape.io.writers import atomic_write
from cryoscape.simulate.atomic_structures import (
    bond_rotation_models,
    heavy_atoms,
    read_structure,
    residue_table,
    write_structure_models,
)
from cryoscape.simulate.ensembles import Ensemble, trajectory_ensemble
from cryoscape.simulate.volumes import render_gaussian_atoms

__all__ = ["AtomicTrajectory", "atomic_trajectory", "atomic_trajectory_ensemble", "write_atomic_truth",
           "GT_MODELS_NAME", "GT_ATOMIC_NAME"]

GT_MODELS_NAME = "gt_models.pdb"
GT_ATOMIC_NAME = "gt_atomic.npz"


@dataclass
class AtomicTrajectory:
    """The models of a trajectory and their coarse-grained coordinates (box frame)."""

    structure: object  # gemmi.Structure (template for writing)
    models: list  # gemmi.Model per state
    origin_angstrom: np.ndarray
    angles_deg: np.ndarray | None = None
    tables: list = field(default_factory=list)

    def __post_init__(self) -> None:
        self.tables = [residue_table(m) for m in self.models]

    @property
    def ca_angstrom(self) -> np.ndarray:
        """``(M, K, 3)`` C-alphas in the box frame."""
        return np.stack([t.ca_angstrom for t in self.tables]) - self.origin_angstrom

    @property
    def sidechain_angstrom(self) -> np.ndarray:
        return np.stack([t.sidechain_angstrom for t in self.tables]) - self.origin_angstrom


def atomic_trajectory(path: str | os.PathLike, *, bond_rotation_deg: Sequence[float] | None = None,
                      n_states: int = 20, bond_residue: int | None = None) -> AtomicTrajectory:
    """The trajectory of a multi-model file, or (``bond_rotation_deg = (lo, hi)``) ``n_states``
    bond rotations of its first model at evenly spaced angles from ``lo`` to ``hi`` degrees."""
    structure = read_structure(path)
    if bond_rotation_deg is not None:
        if n_states < 2:
            raise InputError(f"--atomic-states {n_states}: a trajectory needs at least 2 states.")
        angles = np.linspace(float(bond_rotation_deg[0]), float(bond_rotation_deg[1]), int(n_states))
        models = bond_rotation_models(structure, residue_index=bond_residue, angles_deg=angles)
    else:
        angles, models = None, [m for m in structure]
        if len(models) < 2:
            raise InputError(f"{path} holds one model; a trajectory needs a multi-model file (or --bond-rotation-deg).")
    coords, weights = heavy_atoms(models[0])
    origin = (coords * weights[:, None]).sum(0) / weights.sum()
    traj = AtomicTrajectory(structure, models, origin, angles)
    if len({len(t) for t in traj.tables}) != 1:
        raise InputError(f"the models of {path} have different residues; a trajectory needs the same residues in every model.")
    return traj


def atomic_trajectory_ensemble(traj: AtomicTrajectory, *, box_size: int, pixel_size_angstrom: float,
                               resolution_angstrom: float | None = None) -> Ensemble:
    """Render every state (Gaussian atoms, ``sigma = 0.225 * resolution``, default 3 pixels)."""
    resolution = 3.0 * pixel_size_angstrom if resolution_angstrom is None else float(resolution_angstrom)
    volumes = []
    for model in traj.models:
        coords, weights = heavy_atoms(model)
        volumes.append(render_gaussian_atoms(coords - traj.origin_angstrom, weights, box_size=box_size,
                                             pixel_size_angstrom=pixel_size_angstrom, resolution_angstrom=resolution))
    labels = ([f"bond rotation {a:.2f} deg" for a in traj.angles_deg] if traj.angles_deg is not None
              else [f"model {m + 1}" for m in range(len(volumes))])
    return trajectory_ensemble(np.stack(volumes), pixel_size_angstrom=pixel_size_angstrom, labels=labels)


def write_atomic_truth(out_dir: str | os.PathLike, traj: AtomicTrajectory) -> Path:
    """Write ``gt_models.pdb`` and ``gt_atomic.npz`` (module docstring) into ``out_dir``."""
    out = Path(out_dir)
    write_structure_models(out / GT_MODELS_NAME, traj.models, template=traj.structure)
    t0 = traj.tables[0]
    with atomic_write(out / GT_ATOMIC_NAME) as f:
        np.savez(f, ca_angstrom=traj.ca_angstrom, sidechain_angstrom=traj.sidechain_angstrom,
                 residue_name=np.array(t0.residue_name), residue_number=t0.residue_number,
                 chain=np.array(t0.chain), origin_angstrom=traj.origin_angstrom,
                 angles_deg=np.full(len(traj.models), np.nan) if traj.angles_deg is None else traj.angles_deg)
    return out / GT_ATOMIC_NAME

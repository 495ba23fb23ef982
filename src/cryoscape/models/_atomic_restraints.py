"""Restraints of the Cryofold model (thesis eq. 7.3): backbone bonds and side-chain tethers.

* **Bonds**: a harmonic term ``k_b (|mu_i - mu_j| - l)^2`` between consecutive backbone centres
  of a chain (``l = 3.8`` angstroms, the C-alpha spacing; pairs farther apart than
  :data:`CHAIN_BREAK_ANGSTROM` in the reference are chain breaks and get no bond).
* **Side-chain tethers**: a one-sided term ``k_s max(|mu_bb - mu_sc| - l_max, 0)^2`` keeping each
  side-chain centre within ``l_max`` of its backbone centre.  ``l_max`` is the larger of a
  per-residue-type length (:data:`SIDECHAIN_MAX_ANGSTROM`, 1.5-4 angstroms, about the largest
  C-alpha to side-chain-centroid distance of each type's rotamers) and the distance in the
  reference, so the reference itself is never penalised (the thesis takes the reference's).
* **Local geometry** (not in the thesis): a harmonic term ``k_l (|mu_i - mu_j| - d0_ij)^2`` between
  backbone centres ``2..span`` residues apart along one unbroken chain (``d0``: their distance in the
  reference).  Span 2 holds the C-alpha pseudo bond angles, spans 3-4 the turn of a helix or the
  pleat of a strand.  A chain held only by bonds bends freely at every residue, so a residue whose
  density moved out of reach of its Gaussian stays behind; with its local geometry held, the
  residues around it that still overlap their density carry it along.  A hinge bends only the few
  pairs that span it, so domain motions stay cheap.
* **Elastic network** (not in the thesis; off unless its strength is set): a harmonic term
  ``k_n (|mu_i - mu_j| - d0_ij)^2`` between backbone centres closer than a cutoff in the reference
  (``d0``: their distance there; bonded pairs excluded).  Bonds alone leave the chain floppy: a
  centre far from its density gets no pull from the image, and only the network carries the pull
  on the part of a domain that still overlaps its density to the rest of it (rigid motions keep
  every distance, so they cost nothing).
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["SIDECHAIN_MAX_ANGSTROM", "CHAIN_BREAK_ANGSTROM", "bond_pairs", "sidechain_max_lengths",
           "restraint_energy", "local_pairs", "network_pairs", "network_energy"]

CHAIN_BREAK_ANGSTROM = 4.5

SIDECHAIN_MAX_ANGSTROM = {
    "GLY": 1.5, "ALA": 1.6, "SER": 2.0, "CYS": 2.2, "THR": 2.0, "VAL": 2.0, "PRO": 1.9, "ASP": 2.5,
    "ASN": 2.5, "ILE": 2.4, "LEU": 2.7, "MET": 3.2, "MSE": 3.2, "GLU": 3.2, "GLN": 3.2, "HIS": 3.2,
    "LYS": 3.6, "PHE": 3.4, "TYR": 3.9, "ARG": 4.0, "TRP": 3.8,
}
"""Largest C-alpha to side-chain-centroid distance allowed, by residue type (others: 3.0)."""


def bond_pairs(chain: list[str], ca_angstrom: np.ndarray) -> np.ndarray:
    """``(n_bonds, 2)`` int64 indices of consecutive residues of one chain closer than the break length."""
    ca = np.asarray(ca_angstrom, dtype=np.float64)
    i = np.arange(len(ca) - 1)
    same = np.asarray(chain[:-1]) == np.asarray(chain[1:])
    close = np.linalg.norm(ca[1:] - ca[:-1], axis=1) < CHAIN_BREAK_ANGSTROM
    keep = i[same & close]
    return np.stack([keep, keep + 1], axis=1).astype(np.int64)


def sidechain_max_lengths(residue_name: list[str], ca_angstrom: np.ndarray, sidechain_angstrom: np.ndarray) -> np.ndarray:
    """``(K,)`` tether lengths: the type's table value or the reference distance, whichever is larger."""
    table = np.array([SIDECHAIN_MAX_ANGSTROM.get(n, 3.0) for n in residue_name])
    reference = np.linalg.norm(np.asarray(sidechain_angstrom) - np.asarray(ca_angstrom), axis=1)
    return np.maximum(table, reference + 1e-3)


def restraint_energy(positions: torch.Tensor, bonds: torch.Tensor, max_lengths: torch.Tensor, *,
                     bond_length_angstrom: float, bond_strength: float,
                     sidechain_strength: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(bond energy, side-chain energy)`` per structure, ``(...,)`` each, in angstrom^2 units.

    ``positions``: ``(..., 2K, 3)`` angstroms, backbone centres then side-chain centres.
    """
    K = max_lengths.shape[0]
    backbone, side = positions[..., :K, :], positions[..., K:, :]
    d = _distance(backbone[..., bonds[:, 0], :], backbone[..., bonds[:, 1], :])
    e_bond = bond_strength * (d - bond_length_angstrom).square().sum(-1)
    s = _distance(side, backbone)
    e_side = sidechain_strength * torch.clamp(s - max_lengths, min=0.0).square().sum(-1)
    return e_bond, e_side


def _distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``|a - b|`` with a finite gradient at 0 (a glycine's side chain sits on its C-alpha)."""
    return ((a - b).square().sum(-1) + 1e-12).sqrt()


def local_pairs(ca_angstrom: np.ndarray, bonds: np.ndarray, span: int) -> tuple[np.ndarray, np.ndarray]:
    """``((n, 2) int64 pairs, (n,) reference distances)`` of backbone centres ``2..span`` residues apart
    with a bond between every two consecutive residues in between (no chain break)."""
    ca = np.asarray(ca_angstrom, dtype=np.float64)
    bonded = np.zeros(max(len(ca) - 1, 0), dtype=bool)
    b = np.asarray(bonds, dtype=np.int64).reshape(-1, 2)
    bonded[b[b[:, 1] == b[:, 0] + 1, 0]] = True
    pairs = [(i, i + s) for s in range(2, int(span) + 1) for i in range(len(ca) - s) if bonded[i:i + s].all()]
    pairs = np.asarray(sorted(pairs), dtype=np.int64).reshape(-1, 2)
    return pairs, np.linalg.norm(ca[pairs[:, 0]] - ca[pairs[:, 1]], axis=-1)


def network_pairs(ca_angstrom: np.ndarray, bonds: np.ndarray, cutoff_angstrom: float) -> tuple[np.ndarray, np.ndarray]:
    """``((n, 2) int64 pairs, (n,) reference distances)`` of backbone centres closer than the cutoff, bonds excluded."""
    ca = np.asarray(ca_angstrom, dtype=np.float64)
    d = np.linalg.norm(ca[:, None] - ca[None], axis=-1)
    i, j = np.nonzero(np.triu(d < float(cutoff_angstrom), k=1))
    bonded = {(int(a), int(b)) for a, b in np.asarray(bonds).reshape(-1, 2)}
    keep = np.array([(int(a), int(b)) not in bonded for a, b in zip(i, j)], dtype=bool)
    pairs = np.stack([i[keep], j[keep]], axis=1).astype(np.int64) if keep.any() else np.zeros((0, 2), np.int64)
    return pairs, d[pairs[:, 0], pairs[:, 1]]


def network_energy(positions: torch.Tensor, pairs: torch.Tensor, distances: torch.Tensor, *, strength: float,
                   n_backbone: int) -> torch.Tensor:
    """Harmonic energy ``strength * sum (d - distances)^2`` per structure ``(...,)`` of the backbone centre
    ``pairs`` of ``positions (..., 2K, 3)``: the elastic network's or the local geometry's (module docstring)."""
    if strength == 0 or pairs.shape[0] == 0:
        return positions.new_zeros(positions.shape[:-2])
    backbone = positions[..., :n_backbone, :]
    d = _distance(backbone[..., pairs[:, 0], :], backbone[..., pairs[:, 1], :])
    return strength * (d - distances).square().sum(-1)

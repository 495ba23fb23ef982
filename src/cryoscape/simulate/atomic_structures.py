"""Residue-level atomic models: read PDB/mmCIF with gemmi, coarse-grain, write, rotate a bond.

Coarse-graining (thesis ch. 7, Cryofold)
----------------------------------------
Every amino acid becomes two pseudo-atoms:

* a **backbone** centre at its C-alpha, carrying the electrons of the backbone atoms
  ``N, CA, C, O, OXT`` (atomic numbers times occupancy);
* a **side-chain** centre at the electron-weighted centroid of its other heavy atoms, carrying
  their electrons.  Glycine (no side-chain atom) gets its side-chain centre on the C-alpha with
  zero electrons, so every residue has the same two entries.

Hydrogens, waters and ligands that are not polymer residues are left out.  Coordinates are in
angstroms, ``(x, y, z)``, in the file's frame unless a centre is subtracted.

Trajectories
------------
A multi-model PDB/mmCIF is a trajectory (one model per state).  :func:`bond_rotation_models`
builds one from a single model the way the thesis does with 5NI1: every atom after a backbone
bond (the ``CA - C`` bond, psi, of a chosen residue) turns about that bond's axis by a series of
angles, a 1-D motion with exact coordinates for every state.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cryoscape.errors import InputError

__all__ = [
    "ResidueTable",
    "BACKBONE_ATOMS",
    "read_structure",
    "residue_table",
    "read_residue_tables",
    "heavy_atoms",
    "bond_rotation_models",
    "write_structure_models",
    "write_residue_models",
]

BACKBONE_ATOMS = ("N", "CA", "C", "O", "OXT")
SIDECHAIN_PSEUDO_ATOM = "CEN"
"""Atom name of the side-chain pseudo-atom in written models (Rosetta's centroid name)."""

PathLike = str | os.PathLike


@dataclass
class ResidueTable:
    """The coarse-grained residues of one model (``K`` residues, module docstring).

    Attributes
    ----------
    chain, residue_name : list[str]
        Per residue, as in the file (``MSE``, ``ALA``...).
    residue_number : (K,) int
        Sequence numbers of the file.
    ca_angstrom, sidechain_angstrom : (K, 3) float64
        Backbone (C-alpha) and side-chain centres.
    backbone_electrons, sidechain_electrons : (K,) float64
        Electrons each centre represents (0 for a glycine's side chain).
    """

    chain: list[str]
    residue_name: list[str]
    residue_number: np.ndarray
    ca_angstrom: np.ndarray
    sidechain_angstrom: np.ndarray
    backbone_electrons: np.ndarray
    sidechain_electrons: np.ndarray

    def __len__(self) -> int:
        return len(self.residue_name)

    def to_dict(self) -> dict:
        """Plain lists (YAML/checkpoint safe); :meth:`from_dict` inverts it."""
        return {
            "chain": list(self.chain), "residue_name": list(self.residue_name),
            "residue_number": [int(n) for n in self.residue_number],
            "ca_angstrom": np.round(self.ca_angstrom, 4).tolist(),
            "sidechain_angstrom": np.round(self.sidechain_angstrom, 4).tolist(),
            "backbone_electrons": [float(e) for e in self.backbone_electrons],
            "sidechain_electrons": [float(e) for e in self.sidechain_electrons],
        }

    @classmethod
    def from_dict(cls, d: dict) -> "ResidueTable":
        return cls(
            chain=list(d["chain"]), residue_name=list(d["residue_name"]),
            residue_number=np.asarray(d["residue_number"], dtype=np.int64),
            ca_angstrom=np.asarray(d["ca_angstrom"], dtype=np.float64).reshape(-1, 3),
            sidechain_angstrom=np.asarray(d["sidechain_angstrom"], dtype=np.float64).reshape(-1, 3),
            backbone_electrons=np.asarray(d["backbone_electrons"], dtype=np.float64),
            sidechain_electrons=np.asarray(d["sidechain_electrons"], dtype=np.float64),
        )


def read_structure(path: PathLike):
    """A ``gemmi.Structure`` of ``path`` (all models), hydrogens, waters and ligands removed.

    Raises :class:`InputError` naming the file for a missing, unreadable or empty file.
    """
    import gemmi

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path} was not found; pass an existing .pdb or .cif atomic model.", path=path)
    try:
        structure = gemmi.read_structure(str(path))
    except Exception as err:  # noqa: BLE001 - gemmi raises RuntimeError/ValueError/IOError
        raise InputError(f"{path} could not be read as an atomic model ({str(err).strip() or type(err).__name__}); "
                         "pass a valid PDB or mmCIF file.", path=path) from None
    structure.setup_entities()
    structure.remove_hydrogens()
    structure.remove_waters()
    if len(structure) == 0 or not any(_is_amino_acid(r) for ch in structure[0] for r in ch):
        raise InputError(f"{path} holds no amino-acid residue; pass a protein model (PDB or mmCIF).", path=path)
    return structure


def _is_amino_acid(residue) -> bool:
    import gemmi

    info = gemmi.find_tabulated_residue(residue.name)
    return residue.find_atom("CA", "*") is not None and (info is None or info.is_amino_acid())


def residue_table(model) -> ResidueTable:
    """Coarse-grain one ``gemmi.Model`` (module docstring); residues without a C-alpha are skipped."""
    rows = []
    for chain in model:
        for residue in chain:
            if not _is_amino_acid(residue):
                continue
            back, side = [], []
            for atom in residue:
                z = atom.element.atomic_number * atom.occ
                (back if atom.name in BACKBONE_ATOMS else side).append((atom.pos.x, atom.pos.y, atom.pos.z, z))
            ca = residue.find_atom("CA", "*").pos
            ca_xyz = np.array([ca.x, ca.y, ca.z])
            side_arr = np.asarray(side, dtype=np.float64).reshape(-1, 4)
            e_side = float(side_arr[:, 3].sum())
            centroid = (side_arr[:, :3] * side_arr[:, 3:]).sum(0) / e_side if e_side > 0 else ca_xyz
            rows.append((chain.name, residue.name, residue.seqid.num, ca_xyz, centroid,
                         float(sum(b[3] for b in back)), e_side))
    return ResidueTable(
        chain=[r[0] for r in rows], residue_name=[r[1] for r in rows],
        residue_number=np.array([r[2] for r in rows], dtype=np.int64),
        ca_angstrom=np.array([r[3] for r in rows]).reshape(-1, 3),
        sidechain_angstrom=np.array([r[4] for r in rows]).reshape(-1, 3),
        backbone_electrons=np.array([r[5] for r in rows]), sidechain_electrons=np.array([r[6] for r in rows]),
    )


def read_residue_tables(path: PathLike) -> list[ResidueTable]:
    """One :class:`ResidueTable` per model of a PDB/mmCIF file (a trajectory when several)."""
    structure = read_structure(path)
    tables = [residue_table(model) for model in structure]
    if len({len(t) for t in tables}) != 1:
        raise InputError(f"the models of {path} have different numbers of residues "
                         f"({sorted({len(t) for t in tables})}); a trajectory needs the same residues in every model.")
    return tables


def heavy_atoms(model) -> tuple[np.ndarray, np.ndarray]:
    """``(coords (n, 3) angstrom, electrons (n,))`` of a ``gemmi.Model``'s heavy atoms (for rendering)."""
    coords, weights = [], []
    for cra in model.all():
        coords.append((cra.atom.pos.x, cra.atom.pos.y, cra.atom.pos.z))
        weights.append(cra.atom.element.atomic_number * cra.atom.occ)
    return np.asarray(coords, dtype=np.float64), np.asarray(weights, dtype=np.float64)


def bond_rotation_models(structure, *, residue_index: int | None = None, angles_deg) -> list:
    """Copies of the first model with the atoms after one backbone bond turned by each angle.

    The bond is the ``CA - C`` bond (psi) of the ``residue_index``-th amino acid of the first
    chain (default: the middle one); the atoms turned are the residue's ``O``/``OXT`` and every
    atom of the chain's later residues, about the axis through ``CA`` and ``C`` (right-hand rule).
    Returns ``gemmi.Model`` objects in the order of ``angles_deg``.
    """
    from scipy.spatial.transform import Rotation

    chain = structure[0][0]
    amino = [i for i, r in enumerate(chain) if _is_amino_acid(r)]
    k = len(amino) // 2 if residue_index is None else int(residue_index)
    if not 0 <= k < len(amino) - 1:
        raise InputError(f"--bond-residue {residue_index} is outside the chain's {len(amino)} residues; "
                         f"pass 0 to {len(amino) - 2}.")
    pivot = chain[amino[k]]
    a, c = pivot.find_atom("CA", "*").pos, pivot.find_atom("C", "*")
    if c is None:
        raise InputError(f"residue {pivot.name} {pivot.seqid.num} has no C atom to rotate about; choose another --bond-residue.")
    origin = np.array([a.x, a.y, a.z])
    axis = np.array([c.pos.x, c.pos.y, c.pos.z]) - origin
    axis /= np.linalg.norm(axis)
    models = []
    for angle in np.atleast_1d(np.asarray(angles_deg, dtype=np.float64)):
        model = structure[0].clone()
        models.append(model)
        if angle == 0:
            continue  # the reference exactly (no rounding from an identity rotation)
        R = Rotation.from_rotvec(np.deg2rad(angle) * axis).as_matrix()
        mchain = model[0]
        for j in range(amino[k], len(mchain)):
            for atom in mchain[j]:
                if j == amino[k] and atom.name not in ("O", "OXT"):
                    continue
                p = R @ (np.array([atom.pos.x, atom.pos.y, atom.pos.z]) - origin) + origin
                atom.pos = type(atom.pos)(*p)
    return models


def write_structure_models(path: PathLike, models, *, template=None) -> Path:
    """Write ``gemmi.Model`` objects as a multi-model PDB (``.pdb``) or mmCIF (``.cif``)."""
    import gemmi

    out = gemmi.Structure() if template is None else template.clone()
    if template is not None:
        while len(out):
            del out[0]
    for i, model in enumerate(models):
        m = model.clone()
        m.num = i + 1
        out.add_model(m)
    out.setup_entities()
    return _write(out, Path(path))


def _write(structure, path: Path) -> Path:
    from cryoscape.io.writers import atomic_write

    name = path.name.lower()
    text = (structure.make_mmcif_document().as_string() if name.endswith((".cif", ".mmcif"))
            else structure.make_pdb_string())
    with atomic_write(path, "w") as f:
        f.write(text)
    return path


def write_residue_models(path: PathLike, table: ResidueTable, models_angstrom) -> Path:
    """Coarse-grained models as a (multi-model) PDB or mmCIF: per residue a ``CA`` atom and, for
    residues with side-chain electrons, a side-chain pseudo-atom ``CEN``, with the residue names,
    numbers and chains of ``table``.

    ``models_angstrom``: ``(M, 2K, 3)`` or ``(2K, 3)``: backbone centres then side-chain centres.
    """
    import gemmi

    models = np.asarray(models_angstrom, dtype=np.float64)
    models = models[None] if models.ndim == 2 else models
    K = len(table)
    if models.shape[1:] != (2 * K, 3):
        raise ValueError(f"models must be (M, {2 * K}, 3) for {K} residues, got {models.shape}")
    structure = gemmi.Structure()
    for m, xyz in enumerate(models):
        model = gemmi.Model(str(m + 1))
        for i in range(K):
            if len(model) == 0 or model[len(model) - 1].name != table.chain[i]:
                model.add_chain(gemmi.Chain(table.chain[i]))
            residue = gemmi.Residue()
            residue.name, residue.seqid = table.residue_name[i], gemmi.SeqId(int(table.residue_number[i]), " ")
            for name, p, present in (("CA", xyz[i], True), (SIDECHAIN_PSEUDO_ATOM, xyz[K + i],
                                                             table.sidechain_electrons[i] > 0)):
                if present:
                    atom = gemmi.Atom()
                    atom.name, atom.element, atom.pos, atom.occ = name, gemmi.Element("C"), gemmi.Position(*p), 1.0
                    residue.add_atom(atom)
            model[len(model) - 1].add_residue(residue)
        structure.add_model(model)
    structure.setup_entities()
    return _write(structure, Path(path))

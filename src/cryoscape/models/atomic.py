"""Cryofold: a coarse-grained atomic model as a decoder (thesis ch. 7).

The map is a sum of Gaussian radial basis functions, two per residue of a reference structure
(a backbone centre at the C-alpha and a side-chain centre, see
:mod:`cryoscape.simulate.atomic_structures`), with amplitudes ``a_i = a0 Z_i`` tied to the
electrons ``Z_i`` each centre represents and one shared width ``sigma`` (thesis eq. 7.1)::

    V(r) = sum_i a_i (2 pi s^2)^(-3/2) exp(-|r - mu_i|^2 / (2 s^2))
    F(k) = sum_i a_i exp(-2 pi i k . mu_i) exp(-2 pi^2 s^2 |k|^2)

with ``r``, ``mu`` and ``s`` in training pixels and ``k`` in cycles per training pixel.  (Eq. 7.2
of the thesis prints the envelope as ``exp(-pi^2 k^2 sigma^2 / 2)``; the transform of a Gaussian
of standard deviation ``s`` is ``exp(-2 pi^2 s^2 k^2)``, which is what the test against the FFT
checks.)  The transform is evaluated analytically at the slice points, so training needs no
grid; :meth:`AtomicDecoder.eval_volume` samples ``V`` at voxel centres, which equals the centred
FFT convention of :mod:`cryoscape.models.base` up to the aliasing of a Gaussian beyond Nyquist.

Parameters: the ``2K`` centres (angstroms, box frame: the reference minus its centre), ``log
sigma`` and ``log a0``.  With ``zdim > 0`` a residual MLP (``layers`` x ``width``, thesis: 3 x 256)
maps ``z`` to offsets of every centre from those positions, ``mu(z) = mu + D(z)``; its output
layer starts at zero, so every latent starts at the reference.

Training hooks
--------------
* :meth:`~AtomicDecoder.warm_start` is the thesis's warm-up: with the centres held at the
  reference it fits ``sigma`` and ``a0`` to up to :data:`WARM_START_IMAGES` images (``a0`` in
  closed form for every ``sigma`` on a grid); the centres are untouched, which is the thesis's
  "reset the coordinates after the warm-up epoch".
* :meth:`~AtomicDecoder.regularization_loss` adds the restraints
  (:mod:`cryoscape.models._atomic_restraints`) of the structures of the batch's latents (kept
  from the same step's forward pass) to the loss, divided by the pixels of the training circle:
  our image error is a mean over pixels where eq. 7.3's is a sum, so the strengths keep the
  thesis's meaning (0.1 for both).  Beyond the thesis, a local-geometry restraint (on by default)
  holds the reference's distances between backbone centres up to four residues apart: with bonds
  alone the chain bends freely at every residue, and residues whose density moved beyond reach of
  their Gaussians stay behind (README "Atomic models" has what it measured).
* :meth:`~AtomicDecoder.optimizer_param_groups`: centres, the global parameters and the MLP
  learn at ``centre_lr_scale``, ``global_lr_scale`` and ``offset_lr_scale`` times ``--lr``.
* The optional coarse-to-fine schedule counts the images of the training passes in a buffer
  (``training_images_seen``, kept in checkpoints), so it needs no hook of the engine.
* :meth:`~AtomicDecoder.write_atomic_model` writes the centres as a PDB/mmCIF.
* :attr:`~AtomicDecoder.latent_search_fraction`: the last half of a run's epochs take each image's
  latent from a search against the model rather than from the encoder (train/latent_search.py;
  ``--latent-search-epochs`` overrides it).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cryoscape.errors import InputError
from cryoscape.models._atomic_restraints import (
    bond_pairs,
    local_pairs,
    network_energy,
    network_pairs,
    restraint_energy,
    sidechain_max_lengths,
)
from cryoscape.models.base import VolumeDecoder, register_decoder
from cryoscape.models.layers import ResidualMLP

__all__ = ["AtomicDecoder", "load_reference", "WARM_START_IMAGES", "CENTERING_CHOICES"]

WARM_START_IMAGES = 256
"""Images the warm-up fits ``sigma`` and ``a0`` to."""

CENTERING_CHOICES = ("centroid", "box", "none")


def load_reference(reference: str | os.PathLike | dict, *, centering: str = "centroid",
                   box_size: int | None = None, pixel_size_angstrom: float | None = None) -> dict[str, Any]:
    """The reference as a plain dict (a :class:`ResidueTable`'s plus ``origin_angstrom``, the point
    of the file's frame at the box centre, and ``source``); a dict is returned as it is.

    ``centering``: ``centroid`` (the electron-weighted centroid of all heavy atoms, as ``cryoscape
    simulate`` centres atomic models), ``box`` (the file is in the frame of a map of the training
    box with its origin at the corner, e.g. a model fitted into the consensus map) or ``none``.
    """
    if isinstance(reference, dict):
        return reference
    if reference is None or os.fspath(reference) == "hinge":
        return _hinge_reference()
    from cryoscape.simulate.atomic_structures import heavy_atoms, read_structure, residue_table

    if centering not in CENTERING_CHOICES:
        raise InputError(f"reference_centering {centering!r} is unknown; use one of {', '.join(CENTERING_CHOICES)}.")
    structure = read_structure(reference)
    table = residue_table(structure[0])
    if centering == "centroid":
        coords, weights = heavy_atoms(structure[0])
        origin = (coords * weights[:, None]).sum(0) / weights.sum()
    elif centering == "box":
        origin = np.full(3, (int(box_size) // 2) * float(pixel_size_angstrom))
    else:
        origin = np.zeros(3)
    return {**table.to_dict(), "origin_angstrom": [float(v) for v in origin], "source": os.fspath(reference)}


def _hinge_reference() -> dict[str, Any]:
    """The built-in hinge molecule at 0 degrees (simulate/molecule.py) as a reference: one
    pseudo-atom per residue, its C-alpha, of weight 1 and no side chain (residue name ``UNK``), in
    the box frame that ``cryoscape simulate`` renders it in."""
    from cryoscape.simulate.molecule import hinge_molecule

    coords, weights = hinge_molecule(0.0)
    n = len(coords)
    return {"chain": ["A"] * n, "residue_name": ["UNK"] * n, "residue_number": list(range(1, n + 1)),
            "ca_angstrom": np.round(coords, 4).tolist(), "sidechain_angstrom": np.round(coords, 4).tolist(),
            "backbone_electrons": [float(w) for w in weights], "sidechain_electrons": [0.0] * n,
            "origin_angstrom": [0.0, 0.0, 0.0], "source": "hinge"}


@register_decoder("atomic")
class AtomicDecoder(VolumeDecoder):
    """Two Gaussian RBFs per residue of a reference structure (module docstring).

    Parameters
    ----------
    box_size, zdim
        Training box ``D`` and latent dimension (0: one structure).
    reference
        PDB/mmCIF path (read with gemmi), the dict :func:`load_reference` made of one, or
        ``None``/``"hinge"``: the built-in hinge molecule (C-alpha pseudo-atoms only).
    pixel_size_angstrom
        Training pixel size (the reference is in angstroms); default: the built-in molecule's
        at this box (``cryoscape simulate``'s default).
    reference_centering
        See :func:`load_reference`.
    sigma_angstrom, a0
        Initial width and amplitude per electron (thesis: 3.71 A and 0.1; the warm start fits both).
    bond_strength, sidechain_strength, bond_length_angstrom
        Restraint strengths (thesis: 0.1) and the backbone bond length (3.8 A).
    perturb_angstrom
        Start the backbone centres at the reference plus uniform noise in ``[-p, p]`` per
        coordinate (seeded by ``seed``) and the side chains on them (thesis Table 7.1).
    layers, width
        The offset MLP (``zdim > 0``).
    centre_lr_scale, global_lr_scale, offset_lr_scale
        Learning-rate multipliers of the centres, of ``sigma, a0`` and of the offset MLP.
    coarse_angstrom, coarse_images
        Coarse-to-fine: training passes widen every Gaussian by ``coarse_angstrom`` (in quadrature,
        ``sigma`` and ``a0`` held) falling linearly to 0 over the first ``coarse_images`` images
        (off by default; the README has what it measured).
    network_strength, network_cutoff_angstrom
        The elastic-network restraint (:mod:`cryoscape.models._atomic_restraints`; off by default).
    local_strength, local_span
        The local-geometry restraint (:mod:`cryoscape.models._atomic_restraints`): the reference's
        distances between backbone centres 2 to ``local_span`` residues apart, harmonic with that
        strength (0: off, the thesis's restraints alone).
    """

    def __init__(self, *, box_size: int, zdim: int = 0, reference: str | os.PathLike | dict | None = None,
                 pixel_size_angstrom: float | None = None, reference_centering: str = "centroid", sigma_angstrom: float = 3.71,
                 a0: float = 0.1, bond_strength: float = 0.1, sidechain_strength: float = 0.1,
                 bond_length_angstrom: float = 3.8, perturb_angstrom: float = 0.0, layers: int = 3, width: int = 256,
                 domain: str = "fourier", centre_lr_scale: float = 200.0, global_lr_scale: float = 100.0,
                 offset_lr_scale: float = 1.0, coarse_angstrom: float = 0.0, coarse_images: int = 0,
                 network_strength: float = 0.0, network_cutoff_angstrom: float = 10.0, local_strength: float = 0.1,
                 local_span: int = 4, seed: int = 0):
        super().__init__(box_size=box_size, zdim=zdim)
        if domain not in ("fourier", "hartley"):
            raise ValueError(f"unknown domain {domain!r}; choose fourier or hartley")
        if pixel_size_angstrom is None:  # the built-in molecule's pixel size at this box (cryoscape simulate's)
            from cryoscape.simulate.molecule import default_pixel_size_angstrom

            pixel_size_angstrom = default_pixel_size_angstrom(int(box_size))
        if not pixel_size_angstrom > 0:
            raise ValueError("the atomic decoder needs a positive pixel size (decoder option pixel_size_angstrom)")
        ref = load_reference(reference, centering=reference_centering, box_size=box_size,
                             pixel_size_angstrom=pixel_size_angstrom)
        self.domain, self.pixel_size_angstrom = domain, float(pixel_size_angstrom)
        self.residue_name, self.chain = list(ref["residue_name"]), list(ref["chain"])
        self.residue_number = [int(n) for n in ref["residue_number"]]
        self.config.update(reference=ref, pixel_size_angstrom=self.pixel_size_angstrom,
                           reference_centering=reference_centering, sigma_angstrom=float(sigma_angstrom), a0=float(a0),
                           bond_strength=float(bond_strength), sidechain_strength=float(sidechain_strength),
                           bond_length_angstrom=float(bond_length_angstrom), perturb_angstrom=float(perturb_angstrom),
                           layers=int(layers), width=int(width), domain=domain,
                           centre_lr_scale=float(centre_lr_scale), global_lr_scale=float(global_lr_scale),
                           offset_lr_scale=float(offset_lr_scale), coarse_angstrom=float(coarse_angstrom),
                           coarse_images=int(coarse_images), network_strength=float(network_strength),
                           network_cutoff_angstrom=float(network_cutoff_angstrom),
                           local_strength=float(local_strength), local_span=int(local_span), seed=int(seed))
        self._build_parameters(ref, sigma_angstrom, a0, perturb_angstrom, seed)
        pairs, d0 = network_pairs(self.reference_angstrom[: len(self.residue_name)].double().numpy(),
                                  self.bonds.numpy(), network_cutoff_angstrom)
        self.register_buffer("network_pairs", torch.as_tensor(pairs), persistent=False)
        self.register_buffer("network_distances_angstrom", torch.as_tensor(d0, dtype=torch.float32), persistent=False)
        pairs, d0 = local_pairs(self.reference_angstrom[: len(self.residue_name)].double().numpy(), self.bonds.numpy(),
                                int(local_span))
        self.register_buffer("local_pairs", torch.as_tensor(pairs), persistent=False)
        self.register_buffer("local_distances_angstrom", torch.as_tensor(d0, dtype=torch.float32), persistent=False)
        self.offsets = None
        if self.zdim > 0:
            self.offsets = ResidualMLP(self.zdim, 3 * self.n_centres, layers=int(layers), width=int(width))
            nn.init.zeros_(self.offsets.output.weight)
            nn.init.zeros_(self.offsets.output.bias)
        self._batch_positions: torch.Tensor | None = None
        self.has_coarse_schedule = int(coarse_images) > 0 and float(coarse_angstrom) > 0
        if self.has_coarse_schedule:  # a buffer only then: older checkpoints still load
            self.register_buffer("training_images_seen", torch.zeros((), dtype=torch.float64))

    def _build_parameters(self, ref: dict, sigma_angstrom: float, a0: float, perturb: float, seed: int) -> None:
        origin = np.asarray(ref["origin_angstrom"], dtype=np.float64)
        ca = np.asarray(ref["ca_angstrom"], dtype=np.float64) - origin
        side = np.asarray(ref["sidechain_angstrom"], dtype=np.float64) - origin
        reference = np.concatenate([ca, side])
        start = reference.copy()
        if perturb > 0:
            rng = np.random.default_rng(seed)
            start[: len(ca)] = ca + rng.uniform(-perturb, perturb, size=ca.shape)
            start[len(ca):] = start[: len(ca)]
        electrons = np.concatenate([ref["backbone_electrons"], ref["sidechain_electrons"]])
        self.n_centres = len(reference)
        self.centres_angstrom = nn.Parameter(torch.as_tensor(start, dtype=torch.float32))
        self.log_sigma_angstrom = nn.Parameter(torch.tensor(math.log(sigma_angstrom), dtype=torch.float32))
        self.log_a0 = nn.Parameter(torch.tensor(math.log(a0), dtype=torch.float32))
        self.register_buffer("reference_angstrom", torch.as_tensor(reference, dtype=torch.float32))
        self.register_buffer("origin_angstrom", torch.as_tensor(origin, dtype=torch.float32))
        self.register_buffer("electrons", torch.as_tensor(electrons, dtype=torch.float32))
        self.register_buffer("bonds", torch.as_tensor(bond_pairs(ref["chain"], ca)))
        self.register_buffer("sidechain_max_angstrom", torch.as_tensor(
            sidechain_max_lengths(ref["residue_name"], ca, side), dtype=torch.float32))

    # ---- the structure
    @property
    def sigma_angstrom(self) -> torch.Tensor:
        return self.log_sigma_angstrom.exp()

    @property
    def a0(self) -> torch.Tensor:
        return self.log_a0.exp()

    def positions_angstrom(self, z: torch.Tensor | None = None) -> torch.Tensor:
        """Centres ``(B, 2K, 3)`` in angstroms (box frame) for latents ``z (B, zdim)``; ``(1, 2K, 3)`` for ``None``."""
        base = self.centres_angstrom[None]
        if self.offsets is None or z is None:
            return base
        return base + self.offsets(z.float()).reshape(z.shape[0], self.n_centres, 3)

    def model_angstrom(self, z: torch.Tensor | None = None) -> np.ndarray:
        """``(2K, 3)`` centres for one latent ``(zdim,)`` in the reference file's frame (float64)."""
        zz = None if z is None or self.zdim == 0 else torch.as_tensor(z, dtype=torch.float32).reshape(1, -1)
        with torch.no_grad():
            pos = self.positions_angstrom(None if zz is None else zz.to(self.centres_angstrom.device))[0]
        return (pos.detach() + self.origin_angstrom).double().cpu().numpy()

    # ---- Fourier and real space
    def structure_factor(self, coords: torch.Tensor, positions_angstrom: torch.Tensor,
                         amplitudes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(sum a cos, sum a sin)`` of ``2 pi k . mu`` at ``coords (B, P, 3)`` for ``positions (B|1, 2K, 3)``."""
        phase = (2.0 * math.pi) * torch.matmul(coords, (positions_angstrom / self.pixel_size_angstrom).transpose(-1, -2))
        return torch.cos(phase) @ amplitudes, torch.sin(phase) @ amplitudes

    def _envelope(self, coords: torch.Tensor, sigma_angstrom: torch.Tensor) -> torch.Tensor:
        s = sigma_angstrom / self.pixel_size_angstrom
        return torch.exp(-2.0 * math.pi**2 * s * s * coords.square().sum(-1))

    def forward(self, coords: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        """``F(k)`` (complex) or ``H(k) = Re F - Im F`` at ``coords (B, P, 3)`` (module docstring).

        Computed in float32 outside autocast: phases of tens of radians need float32's digits.
        """
        z = self.check_latent(z, coords.shape[0])
        with torch.autocast(device_type=coords.device.type, enabled=False):
            coords = coords.float()
            pos = self.positions_angstrom(None if z is None else z.float())
            if self.training and torch.is_grad_enabled():
                self._batch_positions = pos
            sigma, a0 = self._training_sigma_a0(coords.shape[0])
            c, s = self.structure_factor(coords, pos, a0 * self.electrons)
            env = self._envelope(coords, sigma)
            if self.domain == "hartley":
                return env * (c + s)
            return torch.complex(env * c, -env * s)

    def coarse_extra_angstrom(self) -> float:
        """The extra width of the coarse-to-fine schedule now: ``coarse_angstrom`` falling linearly
        to 0 over the first ``coarse_images`` training images (0 without the schedule)."""
        c = self.config
        if not self.has_coarse_schedule:
            return 0.0
        return c["coarse_angstrom"] * max(0.0, 1.0 - float(self.training_images_seen) / c["coarse_images"])

    def _training_sigma_a0(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(width, a0)`` of this forward pass.  While the coarse-to-fine schedule runs (training
        passes only), the width is ``sqrt(sigma^2 + extra^2)`` with ``sigma`` and ``a0`` held: the
        blur widens the centres' capture range (large motions) and would otherwise be absorbed into them."""
        if self.has_coarse_schedule and self.training and torch.is_grad_enabled():
            extra = self.coarse_extra_angstrom()
            self.training_images_seen += batch
            if extra > 0:
                sigma = self.sigma_angstrom.detach()
                return (sigma.square() + extra * extra).sqrt(), self.a0.detach()
        return self.sigma_angstrom, self.a0

    def eval_volume(self, z: torch.Tensor | None = None, *, box_size: int | None = None) -> torch.Tensor:
        """``V`` sampled at voxel centres of an ``n``-box (``n < D``: larger voxels, same field of view)."""
        D = self.box_size
        n = int(box_size or D)
        zz = self.check_latent(None if z is None else z.reshape(1, -1), 1)
        with torch.no_grad(), torch.autocast(device_type=self.centres_angstrom.device.type, enabled=False):
            pos = self.positions_angstrom(zz)[0] / self.pixel_size_angstrom  # (2K, 3) training pixels
            s = float(self.sigma_angstrom) / self.pixel_size_angstrom
            grid = (torch.arange(n, device=pos.device, dtype=torch.float32) - n // 2) * (D / n)
            g = torch.exp(-0.5 * ((grid[None, None, :] - pos[:, :, None]) / s).square())  # (2K, 3, n)
            g = g / (math.sqrt(2.0 * math.pi) * s)
            amp = (self.a0 * self.electrons)[:, None]
            gx, gy, gz = g[:, 0], g[:, 1], g[:, 2]
            zy = (amp[:, :, None] * gz[:, :, None] * gy[:, None, :]).reshape(len(pos), n * n)
            return (zy.T @ gx).reshape(n, n, n)

    # ---- training hooks
    def regularization_loss(self, *, n_images: int) -> torch.Tensor | None:
        """Bond and side-chain restraints of this step's structures, per pixel of the circle (module docstring)."""
        pos = self._batch_positions if self._batch_positions is not None else self.positions_angstrom(None)
        self._batch_positions = None
        e_bond, e_side = self.restraint_energies(pos)
        e_pairs = self.network_energy(pos) + self.local_energy(pos)
        n_circle = math.pi * (self.box_size / 2.0) ** 2
        return (e_bond + e_side + e_pairs).mean() / n_circle

    def restraint_energies(self, positions_angstrom: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(bond, side-chain)`` energies ``(B,)`` with the configured strengths."""
        c = self.config
        return restraint_energy(positions_angstrom, self.bonds, self.sidechain_max_angstrom,
                                bond_length_angstrom=c["bond_length_angstrom"], bond_strength=c["bond_strength"],
                                sidechain_strength=c["sidechain_strength"])

    def network_energy(self, positions_angstrom: torch.Tensor) -> torch.Tensor:
        """Elastic-network energy ``(B,)`` with the configured strength (0 unless ``network_strength`` is set)."""
        return network_energy(positions_angstrom, self.network_pairs, self.network_distances_angstrom,
                              strength=self.config["network_strength"], n_backbone=len(self.residue_name))

    def local_energy(self, positions_angstrom: torch.Tensor) -> torch.Tensor:
        """Local-geometry energy ``(B,)`` with the configured strength and span (0 when ``local_strength`` is 0)."""
        return network_energy(positions_angstrom, self.local_pairs, self.local_distances_angstrom,
                              strength=self.config["local_strength"], n_backbone=len(self.residue_name))

    def optimizer_param_groups(self) -> list[dict[str, Any]]:
        groups = [{"params": [self.centres_angstrom], "lr_scale": self.config["centre_lr_scale"]},
                  {"params": [self.log_sigma_angstrom, self.log_a0], "lr_scale": self.config["global_lr_scale"]}]
        if self.offsets is not None:
            groups.append({"params": list(self.offsets.parameters()), "lr_scale": self.config["offset_lr_scale"]})
        return groups

    wants_warm_start = True
    #: the last half of a run's epochs search each image's latent against the model (train/latent_search.py):
    #: the encoder's latents of neighbouring states overlap, so the model at one latent averages several states
    #: (README "Atomic models" has what it measured)
    latent_search_fraction = 0.5

    @torch.no_grad()
    def warm_start(self, slices) -> dict[str, Any]:
        """The warm-up: ``sigma`` on a grid and ``a0`` in closed form, centres held (module docstring)."""
        cols: dict[str, list[torch.Tensor]] = {"m": [], "t": [], "w": [], "k2": []}
        amp = self.electrons
        n = 0
        for coords, target, ctf, weights in slices:
            coords = coords.float()
            c, s = self.structure_factor(coords, self.centres_angstrom[None].to(coords.device), amp.to(coords.device))
            m = torch.complex(c, -s) if self.domain == "fourier" else (c + s)
            if ctf is not None:
                m = m * ctf
            cols["m"].append(m)
            cols["t"].append(target)
            cols["w"].append(weights.expand_as(coords[..., 0]).float())
            cols["k2"].append(coords.square().sum(-1))
            n += coords.shape[0]
            if n >= WARM_START_IMAGES:
                break
        if n == 0:
            return {"n_images": 0}
        m, t, w, k2 = (torch.cat(cols[k]) for k in ("m", "t", "w", "k2"))
        sigma, a0 = _fit_sigma_a0(m, t, w, k2, self.pixel_size_angstrom, float(self.sigma_angstrom))
        self.log_sigma_angstrom.fill_(math.log(sigma))
        self.log_a0.fill_(math.log(a0))
        return {"n_images": n, "sigma_angstrom": sigma, "a0": a0}

    # ---- outputs
    def write_atomic_model(self, path: str | os.PathLike, z: torch.Tensor | None = None) -> Path | None:
        """Write the centres for latent ``z`` (PDB or mmCIF by the suffix; residue names, numbers and
        chains of the reference; side-chain pseudo-atoms ``CEN``) in the reference file's frame."""
        from cryoscape.simulate.atomic_structures import ResidueTable, write_residue_models

        table = ResidueTable.from_dict(self.config["reference"])
        return write_residue_models(path, table, self.model_angstrom(z))


def _fit_sigma_a0(m: torch.Tensor, t: torch.Tensor, w: torch.Tensor, k2: torch.Tensor, pixel_size_angstrom: float,
                  sigma0_angstrom: float) -> tuple[float, float]:
    """``(sigma, a0)`` minimising ``sum w |t - a0 env_sigma m|^2``: ``a0`` in closed form per ``sigma``
    on a grid of 0.25-4 times ``sigma0`` (ratio 1.02 between neighbours)."""
    best = (math.inf, sigma0_angstrom, 1.0)
    t_energy = float((w * _abs2(t)).sum())
    for sigma in sigma0_angstrom * np.exp(np.arange(math.log(0.25), math.log(4.0), math.log(1.02))):
        s = sigma / pixel_size_angstrom
        env = torch.exp(-2.0 * math.pi**2 * s * s * k2)
        model = env * m
        num = float((w * _real_dot(model, t)).sum())
        den = float((w * _abs2(model)).sum())
        if den <= 0 or num <= 0:
            continue
        residual = t_energy - num * num / den
        if residual < best[0]:
            best = (residual, float(sigma), num / den)
    return best[1], best[2]


def _abs2(x: torch.Tensor) -> torch.Tensor:
    return x.real.square() + x.imag.square() if x.is_complex() else x.square()


def _real_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.real * b.real + a.imag * b.imag) if a.is_complex() else a * b

"""The Cryofold decoder (models/atomic.py): analytic transform, restraints, warm-up, rebuild, outputs."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from cryoscape.fourier.fft import fft3_center
from cryoscape.models.base import build_decoder, decoder_names
from cryoscape.simulate.atomic_structures import read_residue_tables, read_structure, residue_table

PDB = Path(__file__).resolve().parents[1] / "data" / "1A8O.pdb"


def _decoder(**kw):
    options = dict(box_size=32, reference=str(PDB), pixel_size_angstrom=2.0, sigma_angstrom=3.0)
    options.update(kw)
    return build_decoder("atomic", **options)


def _grid(D: int) -> torch.Tensor:
    idx = torch.arange(D) - D // 2
    kz, ky, kx = torch.meshgrid(idx, idx, idx, indexing="ij")
    return torch.stack([kx, ky, kz], -1).reshape(1, -1, 3).float() / D


@pytest.mark.parametrize("D", [32, 33])
def test_analytic_transform_equals_fft_of_real_space_map(D):
    dec = _decoder(box_size=D)
    volume = dec.eval_volume(None).double()
    with torch.no_grad():
        analytic = dec(_grid(D)).reshape(D, D, D)
    fft = fft3_center(volume)
    rel = float((fft - analytic.to(fft.dtype)).abs().norm() / fft.abs().norm())
    assert rel < 1e-4  # measured 3.9e-6 (D=32), 2.7e-6 (D=33): the Gaussian's aliasing beyond Nyquist
    # the map holds a0 * sum(Z) electrons' worth of density
    assert float(volume.sum()) == pytest.approx(float((dec.a0 * dec.electrons.sum()).detach()), rel=1e-5)


def test_hartley_is_real_minus_imaginary_and_fourier_is_hermitian():
    four, hart = _decoder(), _decoder(domain="hartley")
    k = torch.rand(2, 50, 3) - 0.5
    with torch.no_grad():
        F, H, Fm = four(k), hart(k), four(-k)
    assert torch.allclose(H, F.real - F.imag, atol=1e-4)
    assert torch.allclose(Fm, F.conj(), atol=1e-4)


def test_registered_and_rebuilt_from_its_yaml_config():
    assert "atomic" in decoder_names()
    dec = _decoder(zdim=2, layers=1, width=16)
    config = yaml.safe_load(yaml.safe_dump(dec.config))  # what config.yaml and checkpoints keep
    again = build_decoder("atomic", **config)
    again.load_state_dict(dec.state_dict())
    k, z = torch.rand(1, 20, 3) - 0.5, torch.randn(1, 2)
    with torch.no_grad():
        assert torch.equal(dec(k, z), again(k, z))
    assert config["reference"]["residue_name"][:3] == ["MSE", "ASP", "ILE"]


def test_latent_starts_at_the_reference_and_offsets_move_centres():
    dec = _decoder(zdim=1, layers=3, width=32)
    z = torch.tensor([[0.7]])
    assert torch.equal(dec.positions_angstrom(z)[0], dec.centres_angstrom)
    torch.nn.init.normal_(dec.offsets.output.weight, std=0.1)
    assert not torch.allclose(dec.positions_angstrom(z)[0], dec.centres_angstrom)


def test_restraints_bonds_and_one_sided_sidechains():
    dec = _decoder()
    K = dec.n_centres // 2
    pos = dec.reference_angstrom[None].clone()
    e_bond, e_side = dec.restraint_energies(pos)
    assert float(e_side) == 0.0  # the reference is never penalised
    d = (pos[0, 1:K] - pos[0, : K - 1]).norm(dim=-1)
    assert float(e_bond) == pytest.approx(float(0.1 * (d - 3.8).square().sum()), rel=1e-4)
    moved = pos.clone()
    moved[0, K + 10] = moved[0, 10] + torch.tensor([10.0, 0.0, 0.0])  # side chain 10 A from its C-alpha
    _, e_side = dec.restraint_energies(moved)
    assert float(e_side) == pytest.approx(0.1 * (10.0 - float(dec.sidechain_max_angstrom[10])) ** 2, rel=1e-4)
    # moving a side chain closer never costs anything (one-sided)
    moved[0, K + 10] = moved[0, 10]
    assert float(dec.restraint_energies(moved)[1]) == 0.0
    # the loss hook divides by the circle's pixels and has a gradient on the centres
    loss = dec.regularization_loss(n_images=100)
    loss.backward()
    assert float(loss.detach()) == pytest.approx(float(sum(dec.restraint_energies(dec.centres_angstrom[None].detach()))) /
                                        (math.pi * 16**2), rel=1e-5)
    assert dec.centres_angstrom.grad is not None and torch.isfinite(dec.centres_angstrom.grad).all()


def test_warm_start_recovers_sigma_and_a0():
    truth = _decoder(sigma_angstrom=2.4, a0=0.37)
    gen = torch.Generator().manual_seed(0)

    def slices():
        for _ in range(4):
            k = (torch.rand(32, 200, 3, generator=gen) - 0.5) * 0.9
            ctf = torch.cos(30 * k.norm(dim=-1))
            with torch.no_grad():
                yield k, ctf * truth(k), ctf, torch.ones(200)

    fresh = _decoder()  # sigma 3.0, a0 0.1
    summary = fresh.warm_start(slices())
    assert summary["sigma_angstrom"] == pytest.approx(2.4, rel=0.02)
    assert summary["a0"] == pytest.approx(0.37, rel=0.03)
    assert torch.equal(fresh.centres_angstrom, truth.centres_angstrom)  # centres held


def test_written_model_keeps_names_numbers_and_coordinates(tmp_path):
    dec = _decoder()
    table = residue_table(read_structure(PDB)[0])
    for name in ("model.pdb", "model.cif"):
        path = dec.write_atomic_model(tmp_path / name)
        back = read_residue_tables(path)[0]
        assert back.residue_name == table.residue_name
        assert list(back.residue_number) == list(table.residue_number)
        assert np.abs(back.ca_angstrom - table.ca_angstrom).max() < 2e-3


def test_elastic_network_keeps_rigid_motions_free_and_resists_stretching():
    dec = _decoder(network_strength=2.0, network_cutoff_angstrom=9.0)
    K = dec.n_centres // 2
    pairs = {tuple(p) for p in dec.network_pairs.tolist()}
    assert pairs and not pairs & {tuple(b) for b in dec.bonds.tolist()}  # bonded pairs are the bonds' business
    ref = dec.reference_angstrom[: K].double()
    d = (ref[:, None] - ref[None]).norm(dim=-1)
    assert len(pairs) == int(torch.triu(d < 9.0, diagonal=1).sum()) - len(dec.bonds)
    angle = 0.8
    rot = torch.tensor([[math.cos(angle), -math.sin(angle), 0.0], [math.sin(angle), math.cos(angle), 0.0], [0, 0, 1.0]])
    rigid = dec.reference_angstrom @ rot.T + torch.tensor([3.0, -2.0, 5.0])
    assert float(dec.network_energy(rigid[None])) < 1e-5
    stretched = dec.reference_angstrom.clone()
    stretched[20] += torch.tensor([2.0, 0.0, 0.0])
    i, j = dec.network_pairs.T
    new = (stretched[i] - stretched[j]).norm(dim=-1)
    expected = 2.0 * float((new - dec.network_distances_angstrom).square().sum())
    assert float(dec.network_energy(stretched[None])) == pytest.approx(expected, rel=1e-4) and expected > 1.0
    # the loss hook adds it (and the local geometry's energy) to the bond and side-chain terms
    with torch.no_grad():
        dec.centres_angstrom.copy_(stretched)
    loss = float(dec.regularization_loss(n_images=10).detach())
    total = sum(float(e) for e in dec.restraint_energies(stretched[None])) + expected
    total += float(dec.local_energy(stretched[None]))
    assert loss == pytest.approx(total / (math.pi * 16**2), rel=1e-4)
    assert float(_decoder().network_energy(stretched[None])) == 0.0  # off by default (the thesis has none)


def test_local_geometry_holds_nearby_residues_and_lets_a_hinge_turn():
    dec = _decoder(local_strength=0.5, local_span=4)
    K = dec.n_centres // 2
    pairs = dec.local_pairs.tolist()
    assert {j - i for i, j in pairs} == {2, 3, 4} and len(pairs) == (K - 2) + (K - 3) + (K - 4)  # one chain
    ref = dec.reference_angstrom.clone()
    assert float(dec.local_energy(ref[None])) < 1e-8  # the reference is not penalised (float32 distances)
    stretched = ref.clone()
    stretched[20] += torch.tensor([2.0, 0.0, 0.0])
    i, j = dec.local_pairs.T
    new = (stretched[i] - stretched[j]).norm(dim=-1)
    expected = 0.5 * float((new - dec.local_distances_angstrom).square().sum())
    assert float(dec.local_energy(stretched[None])) == pytest.approx(expected, rel=1e-4) and expected > 1.0
    # a hinge: everything after residue 35 turned 60 degrees about the axis through C-alphas 35 and 36 strains
    # only the few pairs that span it, far less than moving the same residues out of line one by one
    axis = (ref[36] - ref[35]) / (ref[36] - ref[35]).norm()
    a = math.radians(60.0)
    cross = torch.tensor([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    rot = torch.eye(3) + math.sin(a) * cross + (1 - math.cos(a)) * cross @ cross
    hinged = ref.clone()
    hinged[36:K] = (ref[36:K] - ref[35]) @ rot.T + ref[35]
    strained = ((hinged[i] - hinged[j]).norm(dim=-1) - dec.local_distances_angstrom).abs() > 1e-3
    assert 0 < int(strained.sum()) <= 6 and bool((i[strained] < 36).all() and (j[strained] > 35).all())
    assert float(_decoder(local_strength=0.0).local_energy(stretched[None])) == 0.0  # off: the thesis's restraints
    assert _decoder().config["local_strength"] == 0.1 and _decoder().config["local_span"] == 4  # Cryofold's default


def test_coarse_to_fine_widens_training_passes_only_and_ends():
    dec = _decoder(coarse_angstrom=4.0, coarse_images=16)
    plain = _decoder()
    k = torch.rand(8, 30, 3) - 0.5
    with torch.no_grad():
        assert torch.allclose(dec(k), plain(k))  # outside training passes: the model's own width
    dec.train()
    widths = []
    for _ in range(3):
        widths.append(dec.coarse_extra_angstrom())
        out = dec(k)
    assert widths == pytest.approx([4.0, 2.0, 0.0])
    out.abs().sum().backward()  # the schedule has ended: sigma and a0 learn again
    assert dec.log_sigma_angstrom.grad is not None
    dec.zero_grad()
    blurred = _decoder(coarse_angstrom=4.0, coarse_images=16).train()
    blurred(k).abs().sum().backward()
    assert blurred.log_sigma_angstrom.grad is None  # held while blurred
    again = build_decoder("atomic", **dec.config)
    again.load_state_dict(dec.state_dict())  # the schedule's position travels in checkpoints
    assert again.coarse_extra_angstrom() == 0.0

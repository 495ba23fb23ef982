"""cryoscape classify: classes recovered from a consensus start (adjusted Rand index), outputs."""

from __future__ import annotations

import numpy as np
import pytest
import starfile
from sklearn.metrics import adjusted_rand_score

from cryoscape.cli.main import main
from cryoscape.io.mrc import read_mrc


def _classes(root, n, D, k, lo, hi, seed=3, snr=0.1):
    assert main(["simulate", "-o", str(root / "data"), "-n", str(n), "-D", str(D), "--snr", str(snr), "--heterogeneity",
                 "discrete", "--n-classes", str(k), "--hinge-range-deg", str(lo), str(hi), "--seed", str(seed)]) == 0
    assert main(["backproject", str(root / "data" / "particles.star"), "-o", str(root / "consensus"),
                 "--no-progress"]) == 0
    return root / "data" / "particles.star", root / "consensus" / "map.mrc"


def test_two_classes_without_alignment_and_the_outputs(tmp_path):
    star, consensus = _classes(tmp_path, 400, 32, 2, 0, 60)
    out = tmp_path / "cls"
    assert main(["classify", str(star), "-K", "2", "--initial-map", str(consensus), "-o", str(out), "--no-align",
                 "--max-iterations", "12", "-b", "200"]) == 0
    truth = np.load(tmp_path / "data" / "ground_truth.npz")["state_index"]
    rows = starfile.read(out / "particles.star")["particles"]
    assert adjusted_rand_score(truth, rows["rlnClassNumber"]) > 0.9
    assert rows["rlnMaxValueProbDistribution"].between(0.5, 1.0).all()
    # per-class subsets of the original rows (image names as the input had them): together all the particles
    subsets = [starfile.read(out / f"class{k:03d}.star")["particles"] for k in (1, 2)]
    assert sum(len(s) for s in subsets) == len(rows)
    original = starfile.read(star)["particles"]
    assert set(subsets[0]["rlnImageName"]) | set(subsets[1]["rlnImageName"]) == set(original["rlnImageName"])
    model = np.genfromtxt(out / "model.tsv", names=True, delimiter="\t")
    assert np.isclose(model["population"].sum(), 1.0, atol=1e-3)
    for k in (1, 2):  # every class map is a real map of the box
        volume = read_mrc(out / f"class{k:03d}.mrc")[0]
        assert volume.shape == (32, 32, 32) and np.isfinite(volume).all() and volume.std() > 0


def test_bisecting_start_recovers_three_classes(tmp_path):
    """Without alignment the classes start from repeated two-class splits (the default): three
    hinge classes 30 degrees apart at D = 32, SNR 0.5 come out as three groups matching the truth."""
    import torch

    from cryoscape.classical.classify import ClassifySettings, _bisect_start, classify
    from cryoscape.classical.runs import source_from_table
    from cryoscape.io.particles import load_particles

    star, consensus = _classes(tmp_path, 450, 32, 3, 0, 60, snr=0.5)
    table = load_particles(star)
    source, volume = source_from_table(table), torch.as_tensor(read_mrc(consensus)[0].copy())
    settings = ClassifySettings(n_classes=3, max_iterations=8, batch_size=150)
    assert settings.bisect and settings.regularization_t == 16.0
    pixel = float(table.pixel_size_angstrom[0])
    truth = np.load(tmp_path / "data" / "ground_truth.npz")["state_index"]
    start = _bisect_start(source, len(table), volume, pixel, settings, table.rotations, table.shifts_pixel)
    assert sorted(np.bincount(start.probabilities.argmax(1).numpy(), minlength=3) > 100) == [True] * 3
    state = classify(source, len(table), volume, pixel, settings, rotations=table.rotations,
                     shifts_pixel=table.shifts_pixel)
    assert adjusted_rand_score(truth, state.probabilities.argmax(1).numpy()) > 0.9


def test_subset_source_reads_the_members(tmp_path):
    from cryoscape.classical.runs import source_from_table
    from cryoscape.io.particles import load_particles

    star, _ = _classes(tmp_path, 20, 16, 2, 0, 60, snr=1.0)
    source = source_from_table(load_particles(star))
    members = np.array([7, 3, 12])
    x_all, ctf_all = source.batch(members)
    x_sub, ctf_sub = source.subset(members).batch(np.array([0, 1, 2]))
    assert torch_equal(x_all, x_sub) and torch_equal(ctf_all, ctf_sub)


def test_band_limited_source_is_the_full_one_inside_the_radius(tmp_path):
    """The band-limited iterations read the same Fourier coefficients and CTF, inside the radius only."""
    from cryoscape.classical.runs import source_from_table
    from cryoscape.io.particles import load_particles
    from cryoscape.reconstruct.backproject import FourierAccumulator

    star, _ = _classes(tmp_path, 20, 16, 2, 0, 60, snr=1.0)
    full = source_from_table(load_particles(star))
    band = full.band_limited(5.0)
    inside = full.coords.norm(dim=-1) < 5.0
    assert 0 < len(band.coords) == int(inside.sum()) < len(full.coords)
    members = np.array([2, 9, 4])
    (x_full, c_full), (x_band, c_band) = full.batch(members), band.batch(members)
    assert torch_equal(x_full[:, inside], x_band) and torch_equal(c_full[:, inside], c_band)
    assert torch_equal(FourierAccumulator(16, band_radius=5.0).coordinates, band.coords)


def test_centred_images_in_memory_are_the_shifted_source_in_every_band(tmp_path):
    """Fixed-pose classification reads each image once: the held coefficients are the source's,
    shifted to the particle centre, in the full band, a band-limited view and a subset of it;
    above the memory budget nothing is held."""
    from cryoscape.classical.refine import CentredImages
    from cryoscape.classical.runs import source_from_table
    from cryoscape.fourier.shift import phase_shift_coords
    from cryoscape.io.particles import load_particles

    star, _ = _classes(tmp_path, 20, 16, 2, 0, 60, snr=1.0)
    table = load_particles(star)
    source = source_from_table(table)
    shifts = np.random.default_rng(0).normal(0, 2, (20, 2))
    held = CentredImages.from_source(source, shifts, max_bytes=1e9, batch_size=7)
    assert held.centred and not source.centred and held.nbytes == 20 * len(source.coords) * 12
    members = np.array([2, 9, 4])
    x, ctf = source.batch(members)
    import torch

    expected = phase_shift_coords(x, source.coords, torch.as_tensor(shifts[members], dtype=torch.float32), 16)
    (xh, ch), (xb, cb) = held.batch(members), held.band_limited(5.0).batch(members)
    assert torch.allclose(xh, expected, atol=1e-5) and torch_equal(ch, ctf)
    inside = source.coords.norm(dim=-1) < 5.0
    assert torch_equal(xb, xh[:, inside]) and torch_equal(held.band_limited(5.0).coords, source.band_limited(5.0).coords)
    sub = held.band_limited(5.0).subset(members)
    assert sub.band_radius == 5.0 and torch_equal(sub.batch(np.array([0, 1, 2]))[0], xb)
    assert torch_equal(sub.band_limited(None).batch(np.array([1]))[0], xh[1:2])
    assert CentredImages.from_source(source, shifts, max_bytes=20 * len(source.coords) * 12 - 1) is None


def test_classes_are_the_same_with_images_streamed_or_held(tmp_path):
    """Holding the centred images and the insertion operators (the default) changes the speed, not
    the result: the same class posteriors as streaming every image from disk at every iteration."""
    import torch

    from cryoscape.classical.classify import ClassifySettings, classify
    from cryoscape.classical.runs import source_from_table
    from cryoscape.io.particles import load_particles

    star, consensus = _classes(tmp_path, 240, 24, 3, 0, 60, snr=0.5)
    table = load_particles(star)
    volume = torch.as_tensor(read_mrc(consensus)[0].copy())
    runs = []
    for memory_gib in (4.0, 0.0):
        settings = ClassifySettings(n_classes=3, max_iterations=6, batch_size=50, bisect_iterations=4,
                                    image_memory_gib=memory_gib)
        runs.append(classify(source_from_table(table), len(table), volume, float(table.pixel_size_angstrom[0]),
                             settings, rotations=table.rotations, shifts_pixel=table.shifts_pixel))
    assert runs[0].iteration == runs[1].iteration
    assert torch.allclose(runs[0].probabilities, runs[1].probabilities, atol=1e-3)
    assert torch.allclose(runs[0].maps, runs[1].maps, atol=1e-3 * float(runs[1].maps.abs().max()))


def torch_equal(a, b) -> bool:
    import torch

    return bool(torch.equal(a, b))


def test_bad_k_is_one_sentence(tmp_path, capsys):
    assert main(["classify", "x.star", "-K", "0", "--initial-map", "m.mrc", "-o", str(tmp_path / "o")]) == 2
    assert "-K 0" in capsys.readouterr().err


@pytest.mark.slow
def test_four_hinge_classes_from_a_consensus_start(tmp_path):
    """The issue's test (4 classes of the built-in molecule at hinge 0/20/40/60 degrees, D = 64,
    SNR 0.1, 2,000 images, true poses, consensus map): ARI > 0.9 from the bisecting start
    (measured 0.928-0.932 over seeds 0-3; random starts reached 0.83)."""
    star, consensus = _classes(tmp_path, 2000, 64, 4, 0, 60)
    out = tmp_path / "cls"
    assert main(["classify", str(star), "-K", "4", "--initial-map", str(consensus), "-o", str(out), "--no-align"]) == 0
    truth = np.load(tmp_path / "data" / "ground_truth.npz")["state_index"]
    rows = starfile.read(out / "particles.star")["particles"]
    assert adjusted_rand_score(truth, rows["rlnClassNumber"]) > 0.9


def test_global_alignment_finds_poses_and_classes(tmp_path):
    """Classification with a global search (the input poses are ignored; identity poses given):
    two classes 60 degrees of hinge apart at SNR 1, D = 32, 5 iterations from the consensus
    low-passed to 20 A (measured: ARI 0.84, median pose error 9.3 degrees on the 7.5-degree grid)."""
    import torch

    from cryoscape.classical.classify import ClassifySettings, classify
    from cryoscape.classical.runs import source_from_table
    from cryoscape.geometry.align import pose_errors
    from cryoscape.io.particles import load_particles

    star, consensus = _classes(tmp_path, 240, 32, 2, 0, 60, snr=1.0)
    table = load_particles(star)
    settings = ClassifySettings(n_classes=2, align=True, global_align=True, level=2, n_starts=1,
                                anneal_iterations=2, max_iterations=5, batch_size=120, initial_lowpass_angstrom=20.0)
    state = classify(source_from_table(table), len(table), torch.as_tensor(read_mrc(consensus)[0].copy()),
                     float(table.pixel_size_angstrom[0]), settings, rotations=np.tile(np.eye(3), (len(table), 1, 1)),
                     shifts_pixel=np.zeros((len(table), 2)))
    truth = np.load(tmp_path / "data" / "ground_truth.npz")["state_index"]
    errors = pose_errors(state.rotations.numpy(), table.rotations, flip=False)
    assert adjusted_rand_score(truth, state.probabilities.argmax(1).numpy()) > 0.7
    assert errors["angle_deg_median"] < 12.0, errors


def test_no_align_and_global_align_together_is_one_sentence(tmp_path, capsys):
    assert main(["classify", "x.star", "--initial-map", "m.mrc", "-o", str(tmp_path / "o"), "--no-align",
                 "--global-align"]) == 2
    assert "exclude each other" in capsys.readouterr().err


def test_inserting_all_classes_at_once_equals_one_insertion_per_class():
    """--no-align inserts the K classes as channels of one buffer, folded once after several
    batches: the same sums as K calls of FourierAccumulator.add per batch with weights gamma_k / sigma^2."""
    import torch

    from cryoscape.classical.classify import SharedPoseSums
    from cryoscape.geometry.rotations import random_rotations
    from cryoscape.reconstruct.backproject import FourierAccumulator

    gen = torch.Generator().manual_seed(0)
    D, B, K = 16, 12, 3
    fast, slow = FourierAccumulator(D, n_sets=2 * K), FourierAccumulator(D, n_sets=2 * K)
    shared = SharedPoseSums(fast, K)
    P = fast.coordinates.shape[0]
    for _ in range(2):
        values = torch.complex(torch.randn(B, P, generator=gen), torch.randn(B, P, generator=gen))
        ctf, inv_sigma2 = torch.rand(B, P, generator=gen), torch.rand(P, generator=gen) + 0.5
        gamma = torch.softmax(torch.randn(B, K, generator=gen), dim=1)
        halves = torch.randint(0, 2, (B,), generator=gen)
        rotations = random_rotations(B, generator=gen)
        shared.add(values, rotations, ctf, gamma, halves, inv_sigma2)
        for k in range(K):
            slow.add(values, rotations, ctf=ctf, sets=2 * k + halves, weights=gamma[:, k, None] * inv_sigma2[None, :])
    assert not torch.equal(fast.sums, slow.sums)  # nothing folded yet
    shared.fold()
    assert torch.allclose(fast.sums, slow.sums, atol=1e-5, rtol=1e-4)
    assert torch.equal(fast.count, slow.count)

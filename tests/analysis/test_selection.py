"""Particle selection: criteria on latents, index mapping through a run's --ind, and the subsets written."""

from __future__ import annotations

import pickle
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest
import yaml

from cryoscape.analysis.selection import (
    choose_particles,
    complement,
    gmm_labels,
    indices_in_clusters,
    kmeans_labels,
    latent_norm_outliers,
    load_embedding,
    pca_embedding,
    points_in_polygon,
    read_polygon,
    run_particle_rows,
    select_from_run,
    selection_output_paths,
    write_polygon,
)
from cryoscape.errors import InputError
from cryoscape.io.star import read_star_blocks

N_SOURCE = 40


# ------------------------------------------------------------------------------------------ fixtures
def make_star(folder: Path, n: int = N_SOURCE, box: int = 8) -> Path:
    """A RELION 3.1 file with two optics groups, extra columns, and odd formatting of values."""
    folder.mkdir(parents=True, exist_ok=True)
    with mrcfile.new(folder / "stack.mrcs", overwrite=True) as m:
        m.set_data(np.zeros((n, box, box), np.float32))
        m.voxel_size = 1.5
    optics = ("data_optics\n\nloop_\n_rlnOpticsGroupName #1\n_rlnOpticsGroup #2\n_rlnImagePixelSize #3\n"
              "_rlnImageSize #4\n_rlnVoltage #5\n_rlnSphericalAberration #6\n_rlnAmplitudeContrast #7\n"
              "_rlnImageDimensionality #8\n"
              f"opticsGroup1 1 1.500000 {box} 300.0 2.7 0.1 2\nopticsGroup2 2 1.500000 {box} 200.0 2.0 0.07 2\n\n")
    cols = ["rlnImageName", "rlnMicrographName", "rlnOpticsGroup", "rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi",
            "rlnOriginXAngst", "rlnOriginYAngst", "rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle", "rlnClassNumber",
            "rlnMyScore"]
    rng = np.random.default_rng(1)
    lines = []
    for i in range(n):
        lines.append(" ".join([
            f"{i + 1:06d}@stack.mrcs", f"mics/mic{i % 7}.mrc", str(1 + i % 2),
            *(f"{v:.6f}" for v in rng.uniform(-180, 180, 3)), f"{rng.uniform(-3, 3):.6f}", f"{rng.uniform(-3, 3):.6f}",
            f"{rng.uniform(9000, 20000):.6f}", f"{rng.uniform(9000, 20000):.6f}", f"{rng.uniform(0, 180):.6f}",
            str(1 + i % 3), f"{rng.normal():.12g}",
        ]))
    particles = "data_particles\n\nloop_\n" + "".join(f"_{c} #{k + 1}\n" for k, c in enumerate(cols))
    path = folder / "particles.star"
    path.write_text("# version 30001\n\n" + optics + particles + "\n".join(lines) + "\n")
    return path


def make_cs(folder: Path, n: int = N_SOURCE, box: int = 8) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    with mrcfile.new(folder / "stack.mrcs", overwrite=True) as m:
        m.set_data(np.zeros((n, box, box), np.float32))
    rng = np.random.default_rng(2)
    records = np.zeros(n, dtype=[("uid", "<u8"), ("blob/path", "S16"), ("blob/idx", "<u4"), ("blob/shape", "<u4", (2,)),
                                 ("blob/psize_A", "<f4"), ("alignments3D/pose", "<f4", (3,)),
                                 ("alignments3D/shift", "<f4", (2,)), ("alignments3D/class_posterior", "<f4"),
                                 ("location/micrograph_uid", "<u8")])
    records["uid"] = rng.integers(1, 2**62, n, dtype=np.uint64)
    records["blob/path"] = b"stack.mrcs"
    records["blob/idx"] = np.arange(n)
    records["blob/shape"] = box
    records["blob/psize_A"] = 1.5
    records["alignments3D/pose"] = rng.normal(size=(n, 3)).astype(np.float32)
    records["alignments3D/shift"] = rng.normal(size=(n, 2)).astype(np.float32)
    records["alignments3D/class_posterior"] = rng.uniform(size=n).astype(np.float32)
    records["location/micrograph_uid"] = rng.integers(1, 2**62, n, dtype=np.uint64)
    path = folder / "particles.cs"
    with open(path, "wb") as f:
        np.save(f, records)
    return path


def blob_latents(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Three well-separated 2-D blobs (labels 0, 1, 2 in blocks) and two far outliers at the end."""
    rng = np.random.default_rng(seed)
    centres = np.array([[-4.0, 0.0], [4.0, 0.0], [0.0, 5.0]])
    truth = np.arange(n) % 3
    z = centres[truth] + 0.3 * rng.normal(size=(n, 2))
    z[-2:] = [[30.0, 30.0], [-30.0, 25.0]]
    truth[-2:] = -1
    return z.astype(np.float32), truth


def make_run(folder: Path, particles: Path, *, ind: np.ndarray | None = None, first: int | None = None,
             n_latents: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    training = {"particles": str(particles), "ind": None, "first": first, "zdim": 2}
    if ind is not None:
        with open(folder / "train_ind.pkl", "wb") as f:
            pickle.dump(np.asarray(ind, dtype=np.int64), f)
        training["ind"] = str(folder / "train_ind.pkl")
    (folder / "config.yaml").write_text(yaml.safe_dump({"command": "train", "training": training}))
    z, _ = blob_latents(n_latents)
    np.save(folder / "z.0.npy", np.zeros_like(z))
    np.save(folder / "z.1.npy", z)
    return folder


# ------------------------------------------------------------------------------------------ criteria
def test_kmeans_and_gmm_recover_blobs():
    z, truth = blob_latents(90)
    for labels in (kmeans_labels(z[:-2], 3)[0], gmm_labels(z[:-2], 3)[0]):
        # each true blob maps to exactly one cluster and vice versa
        pairs = set(zip(truth[:-2].tolist(), labels.tolist()))
        assert len(pairs) == 3
    labels, centres = kmeans_labels(z, 3, seed=5)
    again, _ = kmeans_labels(z, 3, seed=5)
    np.testing.assert_array_equal(labels, again)
    with pytest.raises(InputError, match="--kmeans 0"):
        kmeans_labels(z, 0)


def test_indices_in_clusters_and_missing_cluster_message():
    labels = np.array([2, 0, 1, 2, 2, 0])
    np.testing.assert_array_equal(indices_in_clusters(labels, [2]), [0, 3, 4])
    np.testing.assert_array_equal(indices_in_clusters(labels, [0, 1]), [1, 2, 5])
    with pytest.raises(InputError, match=r"cluster 5 does not exist.*0: 2, 1: 1, 2: 3"):
        indices_in_clusters(labels, [5])


def test_outliers_by_zscore_and_percentile():
    z, truth = blob_latents(100)
    out, r = latent_norm_outliers(z, zscore=3)
    np.testing.assert_array_equal(out, [98, 99])
    assert r.shape == (100,) and r[98] > 5 * np.median(r)
    out, _ = latent_norm_outliers(z, percentile=95)
    assert len(out) == 5 and {98, 99} <= set(out.tolist())
    sel = choose_particles(z, outliers=True, invert=True)  # default z-score 3
    np.testing.assert_array_equal(sel.positions, np.arange(98))
    with pytest.raises(InputError, match="not both"):
        choose_particles(z, outliers=True, zscore=3, norm_percentile=90)


def test_polygon_selection_is_exact(tmp_path):
    points = np.array([[0.5, 0.4], [2.0, 2.0], [0.1, 0.7], [-1.0, 0.5], [0.9, 0.2]])
    square = np.array([[0, 0], [1, 0], [1, 1], [0, 1]], dtype=float)
    np.testing.assert_array_equal(points_in_polygon(points, square), [0, 2, 4])
    triangle = np.array([[0, 0], [1, 0], [0, 1]], dtype=float)  # x + y < 1
    np.testing.assert_array_equal(points_in_polygon(points, triangle), [0, 2])
    write_polygon(tmp_path / "p.txt", triangle, comment="test")
    np.testing.assert_allclose(read_polygon(tmp_path / "p.txt"), triangle)
    (tmp_path / "bad.txt").write_text("1 2\n3 4\n")
    with pytest.raises(InputError, match="at least 3"):
        read_polygon(tmp_path / "bad.txt")


def test_embeddings():
    z, _ = blob_latents(60)
    pcs, ratio = pca_embedding(z, 2)
    assert pcs.shape == (60, 2) and ratio[0] >= ratio[1] > 0
    # scores are the centred latents in an orthonormal basis: distances are kept
    zc = z - z.mean(0)
    np.testing.assert_allclose(np.linalg.norm(pcs, axis=1), np.linalg.norm(zc, axis=1), rtol=1e-5)
    one_d, _ = pca_embedding(z[:, :1], 2)
    assert np.all(one_d[:, 1] == 0)
    pts, label = load_embedding("z", z)
    np.testing.assert_allclose(pts, z) and label == "z"
    with pytest.raises(InputError, match="neither pc"):
        load_embedding("nothing.npy", z)


def test_choose_particles_needs_one_criterion():
    z, _ = blob_latents(30)
    with pytest.raises(InputError, match="exactly one"):
        choose_particles(z)
    with pytest.raises(InputError, match="exactly one"):
        choose_particles(z, kmeans=3, outliers=True)
    with pytest.raises(InputError, match=r"pass --cluster .*0: \d+ particles"):
        choose_particles(z, kmeans=3)
    with pytest.raises(InputError, match="go with --outliers"):
        choose_particles(z, kmeans=3, clusters=[0], zscore=2)
    np.testing.assert_array_equal(complement(np.array([0, 2]), 4), [1, 3])


# ------------------------------------------------------------------------------------------ mapping
def test_run_particle_rows_follow_ind_and_first(tmp_path):
    star = make_star(tmp_path / "data")
    ind = np.array([3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25])
    run = make_run(tmp_path / "run", star, ind=ind, first=10, n_latents=10)
    np.testing.assert_array_equal(run_particle_rows(run, 10, n_source=N_SOURCE), ind[:10])
    with pytest.raises(InputError, match="10 particles after its --ind but the run has 12 latents"):
        run_particle_rows(run, 12, n_source=N_SOURCE)
    np.testing.assert_array_equal(run_particle_rows(run, 10, n_source=10, train_ind="none"), np.arange(10))
    # a moved --ind file is named in the message
    (run / "train_ind.pkl").unlink()
    with pytest.raises(InputError, match="--train-ind"):
        run_particle_rows(run, 10, n_source=N_SOURCE)


def test_output_names():
    assert selection_output_paths("a/sel.star", ".cs") == {"subset": Path("a/sel.star"),
                                                          "indices": Path("a/sel.ind.pkl")}
    assert selection_output_paths("sel.txt", ".cs") == {"indices": Path("sel.txt"), "subset": Path("sel.cs")}
    assert selection_output_paths("sel.pkl", ".mrcs")["subset"] == Path("sel.star")
    with pytest.raises(InputError, match="unknown extension"):
        selection_output_paths("sel.mrc", ".star")


# ------------------------------------------------------------------------------------------ writing
def test_star_subset_rows_are_exactly_the_selected_particles_with_optics_intact(tmp_path):
    star = make_star(tmp_path / "data")
    ind = np.arange(2, N_SOURCE, 2)[:30] if N_SOURCE >= 62 else np.arange(1, N_SOURCE, 2)  # every odd row: 20
    run = make_run(tmp_path / "run", star, ind=ind, n_latents=len(ind))
    out = tmp_path / "data" / "sel.star"  # beside the stacks: relative image names stay as they were
    sel = select_from_run(run, out, kmeans=3, clusters=[1], seed=0)
    z = np.load(run / "z.1.npy")
    labels, _ = kmeans_labels(z, 3, seed=0)
    expected_positions = np.flatnonzero(labels == 1)
    np.testing.assert_array_equal(sel.positions, expected_positions)
    np.testing.assert_array_equal(sel.rows, ind[expected_positions])

    original = read_star_blocks(star)
    written = read_star_blocks(out)
    pd.testing.assert_frame_equal(written["optics"], original["optics"])
    want = original["particles"].iloc[sel.rows].reset_index(drop=True)
    got = written["particles"]
    assert list(got.columns) == list(want.columns)
    pd.testing.assert_frame_equal(got, want)
    # the text of an unknown column is untouched
    assert set(got["rlnMyScore"]) <= set(original["particles"]["rlnMyScore"])
    with open(out.with_suffix(".ind.pkl"), "rb") as f:
        np.testing.assert_array_equal(pickle.load(f), sel.rows)

    # written elsewhere, the image names stay exactly as the input had them (RELION resolves them
    # from its project folder, issue 13); write_selection's absolute_paths makes them absolute
    elsewhere = tmp_path / "out" / "sel.star"
    select_from_run(run, elsewhere, kmeans=3, clusters=[1], seed=0)
    kept = read_star_blocks(elsewhere)["particles"]
    pd.testing.assert_frame_equal(kept, want)
    from cryoscape.analysis.selection import write_selection
    from cryoscape.io.particles import load_particles

    absolute = tmp_path / "out" / "abs.star"
    write_selection(absolute, load_particles(star), sel.rows, absolute_paths=True)
    moved = read_star_blocks(absolute)["particles"]
    names = moved["rlnImageName"].str.split("@", expand=True)
    assert (names[0] == want["rlnImageName"].str.split("@").str[0]).all()
    assert all(Path(p) == (tmp_path / "data" / "stack.mrcs").resolve() for p in names[1])
    pd.testing.assert_frame_equal(moved.drop(columns="rlnImageName"), want.drop(columns="rlnImageName"))


def test_cs_subset_keeps_original_fields(tmp_path):
    cs = make_cs(tmp_path / "J12")
    run = make_run(tmp_path / "run", cs, n_latents=N_SOURCE)
    out = tmp_path / "sel.txt"
    sel = select_from_run(run, out, outliers=True, invert=False)
    np.testing.assert_array_equal(sel.rows, [N_SOURCE - 2, N_SOURCE - 1])
    assert sel.paths["subset"] == tmp_path / "sel.cs"
    original = np.load(cs)
    written = np.load(tmp_path / "sel.cs")
    assert written.dtype == original.dtype
    for name in original.dtype.names:
        np.testing.assert_array_equal(written[name], original[name][sel.rows])
    assert np.loadtxt(out, dtype=np.int64).tolist() == sel.rows.tolist()


def test_explicit_original_file_and_format_change(tmp_path):
    """The run trained on a small copy; the subset is taken from the full file given with --particles."""
    star = make_star(tmp_path / "full")
    ind = np.array([0, 4, 8, 12, 16, 20, 24, 28, 32, 36])
    run = make_run(tmp_path / "run", tmp_path / "gone.star", ind=ind, n_latents=len(ind))
    with pytest.raises(InputError, match="--particles"):
        select_from_run(run, tmp_path / "x.star", ind=None, outliers=True)
    positions = np.array([1, 3])
    np.savetxt(tmp_path / "pick.txt", positions, fmt="%d")
    sel = select_from_run(run, tmp_path / "sel.cs", particles=star, ind=tmp_path / "pick.txt")
    np.testing.assert_array_equal(sel.rows, ind[positions])
    written = np.load(tmp_path / "sel.cs")
    assert [int(i) for i in written["blob/idx"]] == ind[positions].tolist()  # stack image = row here

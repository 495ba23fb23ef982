"""Atomic-model metrics (thesis Table 7.1): C-alpha RMSE, % within 3 A, volume NMSE.

C-alpha coordinates are compared as they are (no superposition): the models of a run and the
truth of a simulated dataset share the box frame, and a rigid shift is an error the images
would show.  Residues are matched by chain and number when both sides have them, else by order.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from cryoscape.errors import InputError

__all__ = ["ca_rmse_angstrom", "percent_within", "volume_nmse", "read_ca_models", "score_models",
           "atomic_metrics_along_path", "median_latent_per_state", "atomic_evaluation"]


def ca_rmse_angstrom(predicted: np.ndarray, truth: np.ndarray) -> float:
    """Root-mean-square distance between matching C-alpha ``(K, 3)`` arrays, in angstroms."""
    p, t = np.asarray(predicted, dtype=np.float64), np.asarray(truth, dtype=np.float64)
    if p.shape != t.shape:
        raise ValueError(f"C-alpha arrays differ in shape: {p.shape} and {t.shape}")
    return float(np.sqrt(np.square(p - t).sum(-1).mean()))


def percent_within(predicted: np.ndarray, truth: np.ndarray, *, cutoff_angstrom: float = 3.0) -> float:
    """Percentage of C-alpha atoms within ``cutoff_angstrom`` of their true position."""
    d = np.linalg.norm(np.asarray(predicted, dtype=np.float64) - np.asarray(truth, dtype=np.float64), axis=-1)
    return float(100.0 * (d <= cutoff_angstrom).mean())


def volume_nmse(predicted: np.ndarray, truth: np.ndarray) -> float:
    """``|v - t|^2 / |t|^2`` after scaling ``v`` by the least-squares factor onto ``t`` (maps are in
    arbitrary units: the normalised training data's), over the whole box."""
    v, t = np.asarray(predicted, dtype=np.float64).ravel(), np.asarray(truth, dtype=np.float64).ravel()
    scale = float(v @ t / max(v @ v, 1e-300))
    return float(np.square(scale * v - t).sum() / max(t @ t, 1e-300))


def read_ca_models(path: str | os.PathLike) -> tuple[list[tuple[str, int]], np.ndarray]:
    """``(residue keys (chain, number), (M, K, 3) C-alpha angstroms)`` of every model of a PDB/mmCIF."""
    from cryoscape.simulate.atomic_structures import read_residue_tables

    tables = read_residue_tables(path)
    keys = list(zip(tables[0].chain, (int(n) for n in tables[0].residue_number)))
    return keys, np.stack([t.ca_angstrom for t in tables])


def _matched(pred_keys, pred: np.ndarray, true_keys, true: np.ndarray, where: str) -> tuple[np.ndarray, np.ndarray]:
    """C-alphas of the residues both sides have (by chain and number), else by order when counts agree."""
    index = {k: i for i, k in enumerate(true_keys)}
    both = [(i, index[k]) for i, k in enumerate(pred_keys) if k in index]
    if len(both) >= 0.9 * min(len(pred_keys), len(true_keys)) and both:
        a, b = np.array(both).T
        return pred[..., a, :], true[..., b, :]
    if pred.shape[-2] == true.shape[-2]:
        return pred, true
    raise InputError(f"the models in {where} share no residue numbers with the truth and have a different number "
                     "of residues; compare models of the same protein.")


def score_models(predicted: str | os.PathLike, truth: str | os.PathLike, *, cutoff_angstrom: float = 3.0) -> dict:
    """C-alpha RMSE and % within the cutoff of each model of ``predicted`` against the matching
    model of ``truth`` (model ``m`` against ``m``; a single true model against every model)."""
    pk, p = read_ca_models(predicted)
    tk, t = read_ca_models(truth)
    if len(t) not in (1, len(p)):
        raise InputError(f"{truth} holds {len(t)} models and {predicted} {len(p)}; give one true model or one per "
                         "predicted model.")
    p, t = _matched(pk, p, tk, t, os.fspath(predicted))
    t = np.broadcast_to(t, p.shape)
    rmse = [ca_rmse_angstrom(a, b) for a, b in zip(p, t)]
    within = [percent_within(a, b, cutoff_angstrom=cutoff_angstrom) for a, b in zip(p, t)]
    return {"ca_rmse_angstrom": rmse, "percent_within": within, "cutoff_angstrom": cutoff_angstrom,
            "mean_ca_rmse_angstrom": float(np.mean(rmse)), "mean_percent_within": float(np.mean(within)),
            "n_residues": int(p.shape[-2])}


def atomic_metrics_along_path(decoder, z_per_state: np.ndarray, true_ca_angstrom: np.ndarray, *,
                              cutoff_angstrom: float = 3.0) -> dict:
    """C-alpha RMSE and % within of ``decoder``'s model at ``z_per_state[m]`` against state ``m``'s
    true C-alphas ``(M, K, 3)`` in the box frame (e.g. the median latent of each state's images)."""
    K = true_ca_angstrom.shape[1]
    origin = decoder.origin_angstrom.double().cpu().numpy()
    rmse, within = [], []
    for m, z in enumerate(z_per_state):
        ca = decoder.model_angstrom(None if z is None else np.asarray(z))[:K] - origin
        rmse.append(ca_rmse_angstrom(ca, true_ca_angstrom[m]))
        within.append(percent_within(ca, true_ca_angstrom[m], cutoff_angstrom=cutoff_angstrom))
    return {"ca_rmse_angstrom": rmse, "percent_within": within, "mean_ca_rmse_angstrom": float(np.mean(rmse)),
            "max_ca_rmse_angstrom": float(np.max(rmse)), "mean_percent_within": float(np.mean(within))}


def model_path_for(map_path: str | os.PathLike, suffix: str = ".pdb") -> Path:
    """The atomic-model file written next to a map: ``vol_000.mrc`` -> ``vol_000.pdb``."""
    return Path(map_path).with_suffix(suffix)


def median_latent_per_state(z: np.ndarray, state_index: np.ndarray, n_states: int) -> list[np.ndarray | None]:
    """The median latent of each state's images (thesis Fig. 7-5), ``None`` for a state with no image."""
    return [np.median(z[state_index == m], axis=0) if (state_index == m).any() else None for m in range(n_states)]


def atomic_evaluation(decoder, truth, rows: np.ndarray, z: np.ndarray | None, out_dir: str | os.PathLike, *,
                      true_model: str | os.PathLike | None = None, cutoff_angstrom: float = 3.0) -> dict | None:
    """C-alpha RMSE, % within and volume NMSE of a run's atomic models against the true models.

    The true models are ``true_model`` (one model, or one per state of the dataset) or the
    dataset's ``gt_models.pdb`` (``cryoscape simulate --atomic-trajectory/--bond-rotation-deg``).
    The run's model of state ``m`` is its decoder's at the median latent of the state's images
    (its only model for a homogeneous run), written to ``out_dir/atomic/state_XXX.pdb`` through
    the decoder's :meth:`~cryoscape.models.base.VolumeDecoder.write_atomic_model` hook; ``None``
    when the decoder has no atomic model or there is no true model.  Models are compared in the
    file frame of the reference and truth (the same frame when the reference is one of the
    true models or fitted to the same map).
    """
    import torch

    from cryoscape.simulate.atomic_trajectory import GT_MODELS_NAME

    path = Path(true_model) if true_model is not None else Path(truth.folder) / GT_MODELS_NAME
    if not path.is_file():
        return None
    true_keys, true_ca = read_ca_models(path)
    states = truth.state_index[rows]
    n = len(true_ca)
    if n not in (1, truth.n_states):
        raise InputError(f"{path} holds {n} models but the dataset has {truth.n_states} states; pass one model or one "
                         "per state.")
    latents = ([None] * n if z is None or decoder.zdim == 0 else
               (median_latent_per_state(z, states, n) if n > 1 else [np.median(z, axis=0)]))
    folder = Path(out_dir) / "atomic"
    rmse, within, nmse, scored = [], [], [], []
    for m, zm in enumerate(latents):
        if zm is None and decoder.zdim > 0:
            continue
        zt = None if zm is None else torch.as_tensor(np.asarray(zm, dtype=np.float32))
        written = decoder.write_atomic_model(folder / f"state_{m:03d}.pdb", zt)
        if written is None:
            return None
        keys, ca = read_ca_models(written)
        p, t = _matched(keys, ca[0], true_keys, true_ca[m], os.fspath(written))
        rmse.append(ca_rmse_angstrom(p, t))
        within.append(percent_within(p, t, cutoff_angstrom=cutoff_angstrom))
        with torch.no_grad():
            volume = decoder.eval_volume(zt).float().cpu().numpy()
        state = m if n > 1 else int(np.bincount(states).argmax())
        nmse.append(volume_nmse(volume, truth.volume(state)) if volume.shape == truth.volume(state).shape
                    else float("nan"))
        scored.append(m)
    return {"true_models": str(path), "states": scored, "ca_rmse_angstrom": rmse, "percent_within": within,
            "volume_nmse": nmse, "cutoff_angstrom": cutoff_angstrom,
            "mean_ca_rmse_angstrom": float(np.mean(rmse)), "max_ca_rmse_angstrom": float(np.max(rmse)),
            "mean_percent_within": float(np.mean(within)), "mean_volume_nmse": float(np.nanmean(nmse))}


def write_atomic_models(decoder, latents: list, map_files: list, *, trajectory_name: str = "models.pdb") -> list[Path]:
    """Next to each map ``vol_XXX.mrc`` the decoder's atomic model at its latent (``vol_XXX.pdb``),
    and for several latents (a traversal, sampled centres) all of them as one multi-model
    ``trajectory_name`` in the same folder, in order.  Nothing for a decoder of maps only."""
    import torch

    written = []
    for zi, name in zip(latents, map_files):
        zt = None if zi is None else torch.as_tensor(np.asarray(zi, dtype=np.float32))
        path = decoder.write_atomic_model(Path(name).with_suffix(".pdb"), zt)
        if path is None:
            return []
        written.append(Path(path))
    if len(written) > 1:
        _concatenate_models(written, written[0].parent / trajectory_name)
    return written


def _concatenate_models(paths: list[Path], out: Path) -> Path:
    """One multi-model PDB of the first model of each file."""
    from cryoscape.simulate.atomic_structures import read_structure, write_structure_models

    structures = [read_structure(p) for p in paths]
    return write_structure_models(out, [s[0] for s in structures], template=structures[0])

"""Offline prototype: EM with soft assignments for the voxel basis (issue 19).

    .venv/bin/python bench/oracle_soft_em.py RUN_FOLDER DATA_FOLDER     (ROUNDS=3, NC=512, TEMP=1, HARD=1)

E step: every image's posterior weights over ``NC`` candidate latents (drawn from the current latents)
under the current maps; M step: the refit's normal equations with the posterior moments of the whitened
mixing weights (``E[a]`` in the data sums, ``E[a a^T]`` in the Gram) instead of the features of one
point estimate; the latents become the posterior means.  Scores 50 images like bench/oracle.py.
A research tool (it patches SubspaceSums in place); results: bench/results/oracle_2026-12-04_diagnostics.txt."""
import os, shutil, sys, time
from pathlib import Path
import numpy as np, torch
from cryoscape.train.loop import load_tables, build_training_data, pose_source_for
from cryoscape.train.schedule import ConstantSchedule
from cryoscape.train.trainer import Trainer, _PosedData
from cryoscape.train.checkpoint import load_latest_checkpoint
from cryoscape.train.config import TrainConfig
from cryoscape.train.warm_start import posed_slices
from cryoscape.analysis.evaluate import evenly_spaced_indices, load_ground_truth
from cryoscape.analysis.oracle import truth_variability_mask, score_maps
from cryoscape.models.subspace_fit import SubspaceSums, solve_subspace, whitening
from cryoscape.models.basis import _ComponentMask
from cryoscape.models.sparse_slice import corner_codes_and_weights
from sklearn.neighbors import KNeighborsRegressor
from sklearn.model_selection import cross_val_predict

run, data_dir = Path(sys.argv[1]), Path(sys.argv[2])
ROUNDS = int(os.environ.get("ROUNDS", "3")); NC = int(os.environ.get("NC", "512")); NSCORE = 50
TEMP = float(os.environ.get("TEMP", "1")); HARD = bool(os.environ.get("HARD"))
work = Path("/tmp/cryoscape-latent-diagnostics/soft_em"); shutil.rmtree(work, ignore_errors=True); shutil.copytree(run, work)
state = load_latest_checkpoint(work, command="train"); config = TrainConfig.from_dict(state["config"])
table, tilted = load_tables(config); data = build_training_data(config, table, tilted, resume_state=state)
poses = pose_source_for(config, data.dataset, table)
tr = Trainer(config, data, poses, ConstantSchedule(config), work, resume_state=state, continue_run=True)
z = np.load(work / f"z.{state['epoch']}.npy").astype(np.float32)
truth = load_ground_truth(data_dir); mask = truth_variability_mask(truth); coord = truth.coordinate[:len(z)]
index = evenly_spaced_indices(len(z), NSCORE)
dec = tr.model.decoder; dec.eval(); posed = _PosedData(tr.data, tr.poses)

def knn(zz):
    zs = (zz - zz.mean(0)) / zz.std(0).clip(1e-6)
    pred = cross_val_predict(KNeighborsRegressor(30), zs, coord, cv=5)
    return 1 - np.var(pred - coord) / np.var(coord)

def score(tag, zz, ea=None):
    with torch.no_grad():
        maps = [dec.eval_volume(torch.as_tensor(r)).numpy() for r in zz[index]]
    s = score_maps(maps, truth.state_index[index], truth, mask, z=zz)
    print(f"{tag}: AUC {np.mean(s.auc):.3f} masked {np.mean(s.masked_auc):.3f} rho {s.spearman:.3f} kNN R2 {knn(zz):.3f}", flush=True)

class SoftSums(SubspaceSums):
    def add2(self, index, cw, sign, values, weights, a, second):
        B = index.shape[0]
        half = (torch.arange(B) + self.n_images) % 2
        for h in (0, 1):
            sel = (half == h).nonzero().squeeze(-1)
            self._second = second[sel]
            self._add_half(h, index[sel], cw[sel], sign[sel], values[sel], weights[sel], a[sel])
        self.n_images += B

import cryoscape.models.subspace_fit as SF
_orig_add_half = SF.SubspaceSums._add_half
def _add_half(self, h, index, cw, imag_sign, values, weights, a):
    second = getattr(self, "_second", None)
    if second is None:
        return _orig_add_half(self, h, index, cw, imag_sign, values, weights, a)
    # same as the library's, with the Gram from the second moments: swap a's outer product via a hook
    orig_mul = None
    B = index.shape[0]
    tri = second[:, self.tri_rows, self.tri_cols].double()
    # replicate library code path with our tri: call original with a fake 'a' whose products are tri is impossible,
    # so compute the gram part separately with a=ones-free trick: run original for rhs with gram disabled
    g = self.gram
    self.gram = torch.zeros(2, self.n_vox, 0, dtype=torch.float64)
    _orig_add_half(self, h, index, cw, imag_sign, values, weights, a)
    self.gram = g
    # gram: sum_i sum_p w_ip corner -> voxel of tri_i
    cw = cw.double(); w = (cw * weights.double().unsqueeze(-1)).reshape(B, -1)
    vox = index.reshape(B, -1).long()
    img = torch.arange(B).unsqueeze(-1).expand_as(vox)
    keep = w != 0
    M = torch.sparse_coo_tensor(torch.stack([vox[keep], img[keep]]), w[keep], (self.n_vox, B)).coalesce()
    self.gram[h] += torch.sparse.mm(M, tri)
SF.SubspaceSums._add_half = _add_half

@torch.no_grad()
def em_round(z):
    rng = np.random.default_rng(0)
    cand = torch.as_tensor(z[np.sort(rng.choice(len(z), NC, replace=False))])
    s_all = dec.mixing_weights(torch.as_tensor(z)).double()
    mean, white = whitening(s_all)
    A = torch.cat([torch.ones(NC, 1, dtype=torch.float64), (dec.mixing_weights(cand).double() - mean) @ white], 1)
    C = A.shape[1]
    sums = SoftSums(dec.lattice.n_vox, C)
    znew = np.zeros_like(z)
    lattice = dec._lattice()
    for coords, target, ctf, pw, idx in posed_slices(posed, tr.pixels, np.arange(len(z)), batch_size=64,
                                                    domain="fourier", device="cpu"):
        err = dec.latent_errors(coords, target, ctf, pw, cand)  # (B, NC)
        npx = float((pw > 0).sum()); e = err / npx
        best = e.min(1, keepdim=True).values; noise = best.mean()
        logits = -npx * (e - best) / (2 * noise * TEMP)
        P = torch.softmax(logits, 1)
        if HARD:
            P = torch.nn.functional.one_hot(P.argmax(1), NC).double()
        Ea = P @ A
        Eaa = torch.einsum("bc,ci,cj->bij", P, A, A)
        znew[idx] = (P.float() @ cand).numpy()
        c = ctf.float(); pwt = pw.float().expand_as(c) if pw.dim() == 1 else pw.float()
        index_, sign, w = corner_codes_and_weights(lattice, coords.double() * dec.box_size)
        sums.add2(index_, w, sign, target.to(torch.complex64) * (c * pwt), c.square() * pwt, Ea, Eaa)
    cm = _ComponentMask(dec) if dec.config["refit_mask"] else None
    x, fsc, tau = solve_subspace(sums, dec._voxel_shell, component_mask=cm)
    dec._store_subspace(x, mean, white)
    return znew

score("start (the run's maps and latents)", z)
for r in range(ROUNDS):
    t0 = time.perf_counter()
    z = em_round(z)
    score(f"round {r} ({'hard' if HARD else 'soft'}, T={TEMP}, {time.perf_counter() - t0:.0f} s)", z)

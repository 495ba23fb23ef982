"""Offline diagnostics of the voxel basis's latents and refit on a finished bench/oracle.py run (issue 19).

    .venv/bin/python bench/oracle_diagnostics.py RUN_FOLDER DATA_FOLDER        (env variables pick the mode)

It rebuilds the run's trainer from its checkpoint (in a copy under /tmp/cryoscape-latent-diagnostics),
then, per mode, refits the maps at some latents, scores 50 evenly spaced images (``NSCORE``) like
bench/oracle.py (per-image FSC AUC, masked AUC in the moving region, |Spearman| of PC1) and reports
how well the latents predict the true coordinate (5-fold k-nearest-neighbour regression, R^2 and rms).
Modes (one per call):

* default: the latent step (posterior mean over ``NC`` candidate latents, ``ROUNDS`` rounds, each
  followed by a refit);
* ``TRUEZ=1``: the refit with 12 radial-basis features of the *true* coordinate (the map model's
  ceiling), then the latent step against those maps;
* ``NOISYZ=SD``: the same from the true coordinate plus Gaussian noise of rms ``SD``, ``ROUNDS`` rounds of
  latent step + refit (does the step sharpen latents whose errors do not depend on the image?);
* ``PC1=1``: the refit with radial-basis features of the learnt latent's first principal component only;
* ``CROSS=1``: as ``PC1`` but each half-set's latents scored against maps refitted from the other half;
* ``CLEAN=1``: radial-basis features of all 8 latent dimensions, raw and with the part predictable from the
  defocus removed;
* ``TOPK=1,2,4``: the run's own refit keeping only the top-k whitened mixing-weight components;
* ``RBF0=K``: radial-basis features (K centres) of the learnt latent;
* ``SHARPEN=f1,f2``: ``ROUNDS`` rounds of the library's latent step against maps refitted with the
  components' SSNR times ``1/f`` (a weaker or stronger prior), each followed by the plain refit;
  ``CORR=N`` sets the final refit's correction passes, ``FORCE_CORR=1`` makes them at any SNR,
  ``CORR_COMPONENTS_ONLY=1`` leaves the mean map's column uncorrected.

* ``SHUFFLE=1``: each image's latent error (from the latents' mean at its true coordinate) given to another
  image of the same state (``SHUFFLE_BY=view`` / ``defocus``: of the same viewing octant / defocus decile too),
  then refit, latent step, refit (``SHUFFLE_OWN=1`` also runs the own errors);
* ``JITTER=f1,f2``: the refit at latents plus f posterior sds, the latent step against it, the refit;
* ``BAND=lo-hi,...``: the latent step on the frequencies ``lo <= |k| / Nyquist <= hi`` only, then the refit;
* ``CALIB=n``: latents' mean and covariance matched per defocus bin (``VIEWS=1``: and per viewing octant),
  ``ROUNDS`` rounds of refit, latent step, calibration;
* ``SPLIT=1``: pixel-split EM, latents from one checkerboard half of each image's Fourier pixels and maps
  from the other half, ``ROUNDS`` rounds, each ended by an all-pixel latent step;
* ``FRESH=1`` with ``PARTICLES=stack``: the same clean images with new noise (the run's latents no longer
  chose by these pixels' noise): the latent step against the run's maps and against maps refitted from them;
* ``NOWINDOW=1`` (any mode): the images read without the soft circular window the run was trained with.

A research tool: it reaches into the trainer's private pieces and swaps the decoder's mixing
weights in place, so it lives in bench/, not in the library.  Results: bench/results/oracle_2026-12-04_diagnostics.txt, oracle_2026-12-05_estep_maps.txt and
oracle_2026-12-05_window_diagnostics.txt.
"""
import os, shutil, sys, time
from pathlib import Path
import numpy as np, torch
from cryoscape.train.loop import load_tables, build_training_data, pose_source_for
from cryoscape.train.schedule import ConstantSchedule
from cryoscape.train.trainer import Trainer, _PosedData
from cryoscape.train.checkpoint import load_latest_checkpoint
from cryoscape.train.config import TrainConfig
from cryoscape.train.refit import refit_decoder, refine_latents
from cryoscape.train.warm_start import posed_slices
from cryoscape.analysis.evaluate import evenly_spaced_indices, load_ground_truth
from cryoscape.analysis.oracle import truth_variability_mask, score_maps
from sklearn.neighbors import KNeighborsRegressor
from sklearn.model_selection import cross_val_predict

run, data_dir = Path(sys.argv[1]), Path(sys.argv[2])
NC = int(os.environ.get("NC", "512")); TEMPS = [float(t) for t in os.environ.get("TEMPS", "1").split(",")]
ROUNDS = int(os.environ.get("ROUNDS", "1")); NSCORE = int(os.environ.get("NSCORE", "50"))
work = Path("/tmp/cryoscape-latent-diagnostics") / run.parent.name / run.name
shutil.rmtree(work, ignore_errors=True); shutil.copytree(run, work)
state = load_latest_checkpoint(work, command="train")
config = TrainConfig.from_dict(state["config"])
if os.environ.get("PARTICLES"):  # the same images with other noise (FRESH): the run's latents, new pixels
    config.particles = os.environ["PARTICLES"]
if os.environ.get("NOWINDOW"):  # no real-space window: the Fourier pixels' noise stays independent (SPLIT)
    config.window = False
    state["normalization"]["window"] = False  # what the dataset reads when it resumes
table, tilted = load_tables(config)
data = build_training_data(config, table, tilted, resume_state=state)
poses = pose_source_for(config, data.dataset, table)
tr = Trainer(config, data, poses, ConstantSchedule(config), work, resume_state=state, continue_run=True)
z0 = np.load(work / f"z.{state['epoch']}.npy").astype(np.float32)
truth = load_ground_truth(data_dir); mask = truth_variability_mask(truth)
coord = truth.coordinate[:len(z0)]
index = evenly_spaced_indices(len(z0), NSCORE)
dec = tr.model.decoder; dec.eval()
posed = _PosedData(tr.data, tr.poses)
saved = {k: v.detach().clone() for k, v in dec.state_dict().items()}
import copy as _c; saved_dec = _c.deepcopy(dec)

def knn(z):
    zs = (z - z.mean(0)) / z.std(0).clip(1e-6)
    pred = cross_val_predict(KNeighborsRegressor(30), zs, coord, cv=5)
    return 1 - np.var(pred - coord) / np.var(coord), np.sqrt(np.mean((pred - coord) ** 2))

def score(tag, z):
    with torch.no_grad():
        maps = [dec.eval_volume(torch.as_tensor(r)).numpy() for r in z[index]]
    s = score_maps(maps, truth.state_index[index], truth, mask, z=z)
    r2, rms = knn(z)
    print(f"{tag}: AUC {np.mean(s.auc):.3f} masked {np.mean(s.masked_auc):.3f} rho {s.spearman:.3f} kNN R2 {r2:.3f} rms {rms:.2f}", flush=True)

@torch.no_grad()
def e_step(z, temps, subset=None, dec=dec):
    rng = np.random.default_rng(0)
    cand_z = torch.as_tensor(z[rng.choice(len(z), NC, replace=False)])
    S = dec.mixing_weights(cand_z).double()  # (C, K)
    K = S.shape[1]
    out = {t: np.zeros_like(z) for t in temps}
    order = np.arange(len(z)) if subset is None else subset
    real_inst = dec.__dict__.get('mixing_weights')
    for coords, target, ctf, w, idx in posed_slices(posed, tr.pixels, order, batch_size=128, domain="fourier", device="cpu"):
        B = coords.shape[0]; zz = torch.zeros(B, z.shape[1])
        comps = []
        for k in range(K + 1):
            s = torch.zeros(1, K, dtype=dec.mean_real.dtype)
            if k: s[0, k - 1] = 1
            dec.mixing_weights = (lambda zq, batch=1, s=s: s.expand(batch, -1))
            comps.append(dec(coords, zz))
        if real_inst is None: del dec.mixing_weights
        else: dec.mixing_weights = real_inst
        M = comps[0].to(torch.complex128); A = torch.stack([c.to(torch.complex128) - M for c in comps[1:]], -1)
        c = (ctf if ctf is not None else torch.ones_like(M.real)).to(torch.float64)
        wt = w.to(torch.float64)
        r0 = target.to(torch.complex128) - c * M
        A = c[..., None] * A
        e0 = (wt * r0.abs().square()).sum(-1)  # (B,)
        h = torch.einsum("bpk,bp->bk", (A.conj() * wt[None, :, None]), r0).real
        G = torch.einsum("bpk,bpl->bkl", A.conj() * wt[None, :, None], A).real
        err = e0[:, None] - 2 * h @ S.T + torch.einsum("ck,bkl,cl->bc", S, G, S)  # (B, C)
        best = err.min(1, keepdim=True).values
        n_pix = float((wt > 0).sum())
        noise = best.mean() / n_pix  # mean squared error per pixel (complex)
        for t in temps:
            logits = -(err - best) / (noise * t)
            p = torch.softmax(logits, 1)
            out[t][idx] = (p @ cand_z.double()).float().numpy()
    return out

def rbf_setup(z, K, d):
    """Give decoder ``d`` K radial-basis mixing weights of the standardised latent (centres by k-means,
    width the median nearest-centre distance times $BW) and zeroed basis volumes."""
    from sklearn.cluster import KMeans
    from torch import nn
    zt_ = torch.as_tensor(z, dtype=torch.float64)
    mu, sd = zt_.mean(0), zt_.std(0).clamp_min(1e-6)
    km = KMeans(K, n_init=4, random_state=0).fit(((zt_ - mu) / sd).numpy())
    C = torch.as_tensor(km.cluster_centers_)
    d2 = torch.cdist(C, C).square(); d2.fill_diagonal_(float("inf"))
    h2 = float(d2.min(1).values.median()) * float(os.environ.get("BW", "1.0"))
    def feats(zz, batch=1):
        zz = (torch.as_tensor(zz, dtype=torch.float64).reshape(-1, zt_.shape[1]) - mu) / sd
        return torch.softmax(-torch.cdist(zz, C).square() / (2 * h2), -1).to(d.mean_real.dtype)
    n_vox = d.mean_real.shape[0]
    d.basis_real = nn.Parameter(torch.zeros(n_vox, K)); d.basis_imag = nn.Parameter(torch.zeros(n_vox, K))
    d.mixing_weights = feats

def rbf_refit(z, K):
    """The run's decoder refitted with K radial-basis features of ``z``, then scored."""
    rbf_setup(z, K, dec)
    refit_decoder(dec, posed, tr.pixels, z, device="cpu")
    score(f"rbf{K} refit", z)

if os.environ.get("TRUEZ"):
    zt = np.tile(coord[:, None], (1, z0.shape[1])).astype(np.float32) + 1e-3 * np.random.default_rng(0).standard_normal(z0.shape).astype(np.float32)
    rbf_refit(zt, 12)
    zs = e_step(zt, [1.0])[1.0]
    err = zs[:, 0] - coord
    print(f"E-step against the true-coordinate maps: posterior-mean coordinate rms error {np.sqrt(np.mean(err**2)):.4f}, range {np.ptp(coord):.3f}, kNN R2 {knn(zs)[0]:.3f}", flush=True)
    sys.exit()

if os.environ.get("NOISYZ"):
    sd = float(os.environ["NOISYZ"])
    rng = np.random.default_rng(1)
    zt = (coord[:, None] + sd * rng.standard_normal((len(coord), 1))).astype(np.float32)
    zt = np.tile(zt, (1, z0.shape[1])) + 1e-3 * rng.standard_normal(z0.shape).astype(np.float32)
    for r in range(ROUNDS):
        rbf_refit(zt, 12)
        zs = e_step(zt, [1.0])[1.0]
        err = zs[:, 0] - coord
        print(f"round {r}: rms in {np.sqrt(np.mean((zt[:,0]-coord)**2)):.4f} -> out {np.sqrt(np.mean(err**2)):.4f} kNN R2 {knn(zs)[0]:.3f}", flush=True)
        zt = zs
    sys.exit()


def refit_subset(d, idx, z):
    zall = torch.as_tensor(z)
    def batches():
        for c, t, ctf, w, i in posed_slices(posed, tr.pixels, idx, batch_size=64, domain="fourier", device="cpu"):
            yield c, t, ctf, w, zall[torch.as_tensor(i)]
    d.refit(batches, zall[torch.as_tensor(idx)], final=True)



def pc1_latents():
    """The learnt latent's first principal component scaled to 0..1 (oriented like the truth), in every
    latent dimension (plus 1e-3 noise), so that the radial-basis refit sees a 1-D latent."""
    zc = z0 - z0.mean(0); _, _, vt = np.linalg.svd(zc, full_matrices=False)
    p = zc @ vt[0]; p = (p - p.min()) / np.ptp(p)
    if np.corrcoef(p, coord)[0, 1] < 0: p = 1 - p
    rng = np.random.default_rng(1)
    return np.tile(p[:, None], (1, z0.shape[1])).astype(np.float32) + 1e-3 * rng.standard_normal(z0.shape).astype(np.float32)

if os.environ.get("TOPK"):
    import cryoscape.models.basis as B
    orig = B.whitening
    for k in [int(x) for x in os.environ["TOPK"].split(",")]:
        B.whitening = lambda s, k=k, **kw: (lambda m, w: (m, w[:, :k]))(*orig(s, **kw))
        dec.load_state_dict(saved)
        refit_decoder(dec, posed, tr.pixels, z0, device="cpu")
        score(f"s(z) refit top {k}", z0)
    sys.exit()
if os.environ.get("CLEAN"):
    import pickle
    ctfp = pickle.load(open(data_dir / "ctf.pkl", "rb"))[:len(z0)]
    df = ctfp[:, 2:4].mean(1, keepdims=True)
    df = (df - df.mean()) / df.std()
    pred = KNeighborsRegressor(200).fit(df, z0).predict(df)
    zcl = (z0 - pred).astype(np.float32)
    for tag, zz in (("raw", z0), ("clean", zcl)):
        zc = zz - zz.mean(0); u, s, vt = np.linalg.svd(zc, full_matrices=False)
        print(tag, "PC var frac", np.round(s**2 / (s**2).sum(), 3), flush=True)
        rbf_refit(zz, 12)
    sys.exit()
if os.environ.get("CROSS"):
    import copy
    zt = pc1_latents()
    halves = [np.arange(0, len(zt), 2), np.arange(1, len(zt), 2)]
    for r in range(ROUNDS):
        decs = []
        for h in (0, 1):
            d = copy.deepcopy(saved_dec); rbf_setup(zt, 12, d); d.eval(); refit_subset(d, halves[h], zt); decs.append(d)
        zs = np.zeros_like(zt)
        for h in (0, 1):
            out = e_step(zt, [1.0], subset=halves[h], dec=decs[1 - h])[1.0]
            zs[halves[h]] = out[halves[h]]
        print(f"cross round {r}: kNN R2 in {knn(zt)[0]:.3f} -> out {knn(zs)[0]:.3f}", flush=True)
        zt = zs
        rbf_refit(zt, 12)
    sys.exit()
if os.environ.get("PC1"):
    zt = pc1_latents()
    for r in range(ROUNDS):
        rbf_refit(zt, 12)
        zs = e_step(zt, [1.0])[1.0]
        print(f"round {r}: kNN R2 in {knn(zt)[0]:.3f} -> out {knn(zs)[0]:.3f}", flush=True)
        zt = zs
    rbf_refit(zt, 12)
    sys.exit()
if os.environ.get("SHARPEN"):
    # E steps against maps refitted with a weaker prior on the components (their SSNR times 1/f), then the
    # usual refit at the new latents for scoring: does scoring latents against sharper maps escape the fixed point?
    import cryoscape.models.subspace_fit as SF
    from cryoscape.train.refit import refine_latents
    plain_ssnr = SF.ssnr_from_halves
    dec.config["refit_corrections"] = int(os.environ.get("CORR", dec.config["refit_corrections"]))
    if os.environ.get("FORCE_CORR"):  # also below the SNR at which the library makes them
        type(dec)._resolved_to_nyquist = lambda self, fsc: True
    if os.environ.get("CORR_COMPONENTS_ONLY"):  # the mean map keeps its plain Wiener solution
        import cryoscape.models.basis as B
        plain_correct = B.correct_subspace
        def components_only(x, *a, **k):
            y = plain_correct(x, *a, **k)
            return torch.cat([x[:, :1], y[:, 1:]], 1)
        B.correct_subspace = components_only
    print(f"correction passes per final refit: {dec.config['refit_corrections']}", flush=True)
    for f in [float(x) for x in os.environ["SHARPEN"].split(",")]:
        dec.load_state_dict(saved); z = z0
        for r in range(ROUNDS):
            def sharper(*a, f=f):
                fsc, ssnr = plain_ssnr(*a)
                return fsc, torch.cat([ssnr[:, :1], ssnr[:, 1:] / f], 1) if ssnr.shape[1] > 1 else ssnr
            SF.ssnr_from_halves = sharper
            refit_decoder(dec, posed, tr.pixels, z, device="cpu")
            SF.ssnr_from_halves = plain_ssnr
            score(f"f={f} round {r}: sharpened maps, latents in", z)
            z = refine_latents(dec, posed, tr.pixels, z, device="cpu")[0]
            refit_decoder(dec, posed, tr.pixels, z, device="cpu")
            score(f"f={f} round {r}: plain refit at the new latents", z)
    sys.exit()
if os.environ.get("JITTER"):
    # The final refit at latents jittered by f posterior sds, the latent step against those maps, the refit at
    # the new latents: do maps fitted at latents whose errors are partly independent of the images unlock the step?
    sd_post = np.exp(0.5 * np.load(work / f"z_logvar.{state['epoch']}.npy")).astype(np.float32)
    for f in [float(x) for x in os.environ["JITTER"].split(",")]:
        dec.load_state_dict(saved)
        zj = z0 + f * sd_post * np.random.default_rng(2).standard_normal(z0.shape).astype(np.float32)
        refit_decoder(dec, posed, tr.pixels, zj, device="cpu")
        zr = refine_latents(dec, posed, tr.pixels, z0, device="cpu")[0]
        refit_decoder(dec, posed, tr.pixels, zr, device="cpu")
        score(f"jitter {f} sd: latent step against maps at jittered latents, refit", zr)
    sys.exit()
if os.environ.get("BAND"):
    # The latent step with the likelihood on the frequencies |k| <= f Nyquist only, then the usual refit:
    # in which band do the maps fitted at the learnt latents hold what locks the step?
    from cryoscape.train.refit import latent_posteriors
    from cryoscape.train.warm_start import posed_slices as _ps
    radius = tr.pixels.freqs_cycles_per_pixel.norm(dim=-1) / 0.5
    for band in os.environ["BAND"].split(","):
        lo, hi = (float(x) for x in band.split("-"))
        dec.load_state_dict(saved)
        keep = ((radius >= lo) & (radius <= hi)).to(tr.pixels.weights.dtype)
        batches = ((c, t, ctf, w * keep, i) for c, t, ctf, w, i in
                   _ps(posed, tr.pixels, np.arange(len(z0)), batch_size=64, domain="fourier", device="cpu"))
        zr = latent_posteriors(dec, batches, z0)[0]
        refit_decoder(dec, posed, tr.pixels, zr, device="cpu")
        score(f"latent step on |k| in [{lo}, {hi}] Nyquist, refit", zr)
    sys.exit()
def calibrate(z, groups):
    """Each group's latents moved and scaled (mean and covariance) onto those of all images: a latent
    whose scale along the motion depends on the defocus (or the view) made the same for every group."""
    mu, cov = z.mean(0), np.cov(z.T)
    w, v = np.linalg.eigh(cov); root = (v * np.sqrt(np.clip(w, 1e-12, None))) @ v.T
    out = np.empty_like(z)
    for g in np.unique(groups):
        i = groups == g
        wg, vg = np.linalg.eigh(np.cov(z[i].T)); inv_root = (vg / np.sqrt(np.clip(wg, 1e-12, None))) @ vg.T
        out[i] = mu + (z[i] - z[i].mean(0)) @ inv_root @ root
    return out.astype(np.float32)

if os.environ.get("CALIB"):
    # Latents calibrated per defocus bin (CALIB=n bins; VIEWS=1 also per viewing-direction octant), refit, latent
    # step, calibrated again, refit: does a latent whose scale no longer depends on the defocus unlock the step?
    import pickle
    ctfp = pickle.load(open(data_dir / "ctf.pkl", "rb"))[:len(z0)]
    df = ctfp[:, 2:4].mean(1)
    groups = np.digitize(df, np.quantile(df, np.linspace(0, 1, int(os.environ["CALIB"]) + 1)[1:-1]))
    if os.environ.get("VIEWS"):
        view = truth.rotations[:len(z0), 2, :]
        groups = groups * 8 + (view > 0) @ np.array([1, 2, 4])
    z = z0
    dec.load_state_dict(saved)
    for r in range(ROUNDS):
        zc = calibrate(z, groups)
        refit_decoder(dec, posed, tr.pixels, zc, device="cpu"); score(f"round {r}: calibrated latents, refit", zc)
        z = refine_latents(dec, posed, tr.pixels, zc, device="cpu")[0]
        refit_decoder(dec, posed, tr.pixels, z, device="cpu"); score(f"round {r}: latent step, refit", z)
    zc = calibrate(z, groups)
    refit_decoder(dec, posed, tr.pixels, zc, device="cpu"); score(f"final: calibrated latents, refit", zc)
    sys.exit()
if os.environ.get("SPLIT"):
    # Pixel-split EM: the latents estimated from one checkerboard half of each image's Fourier pixels
    # (Hermitian pairs stay together), the maps fitted from the OTHER half at those latents, so that no
    # pixel's noise chose the latent it is fitted at (errors-in-variables without the noise coupling).
    from cryoscape.train.refit import latent_posteriors
    from cryoscape.train.warm_start import posed_slices as _ps
    Dbox = tr.pixels.box_size
    par = (tr.pixels.freqs_cycles_per_pixel * Dbox).round().long().sum(-1) % 2
    masks = [(par == 0).to(tr.pixels.weights.dtype), (par == 1).to(tr.pixels.weights.dtype)]
    ones = torch.ones_like(masks[0])
    N = len(z0)
    def slices(mask, zz=None):
        zt_ = None if zz is None else torch.as_tensor(zz)
        for c, t, ctf, w, i in _ps(posed, tr.pixels, np.arange(N), batch_size=64, domain="fourier", device="cpu"):
            yield (c, t, ctf, w * mask, i) if zt_ is None else (c, t, ctf, w * mask, zt_[torch.as_tensor(i)])
    def estep(mask, z):
        return latent_posteriors(dec, slices(mask), z)[0]
    def split_refit(z1, z2):
        dec.refit(lambda: (b for zz, m in ((z1, masks[1]), (z2, masks[0])) for b in slices(m, zz)),
                  torch.as_tensor(np.concatenate([z1, z2])), final=True)
    z = z0
    for r in range(ROUNDS):
        z1, z2 = estep(masks[0], z), estep(masks[1], z)
        print(f"round {r}: half-pixel latents kNN R2 {knn(z1)[0]:.3f} / {knn(z2)[0]:.3f}", flush=True)
        split_refit(z1, z2)
        score(f"round {r}: split maps at the mean of the halves' latents", 0.5 * (z1 + z2))
        z = estep(ones, 0.5 * (z1 + z2))
        score(f"round {r}: split maps, all-pixel latent step against them", z)
    refit_decoder(dec, posed, tr.pixels, z, device="cpu"); score("plain refit at the last latents", z)
    sys.exit()
if os.environ.get("FRESH"):
    # With PARTICLES= the same clean images plus NEW noise: the run's latents (chosen by the old noise) are
    # independent of these pixels' noise.  (a) the latent step of the new images against the run's maps;
    # (b) the maps refitted from the new images at the run's latents, then the latent step against them.
    for tag, refit_first in (("run's maps", False), ("maps refitted from the new images at the run's latents", True)):
        dec.load_state_dict(saved)
        if refit_first:
            refit_decoder(dec, posed, tr.pixels, z0, device="cpu"); score(f"{tag}", z0)
        zr = refine_latents(dec, posed, tr.pixels, z0, device="cpu")[0]
        print(f"{tag}: latent step of the new images: kNN R2 {knn(zr)[0]:.3f}", flush=True)
        refit_decoder(dec, posed, tr.pixels, zr, device="cpu"); score(f"{tag}: latent step, refit", zr)
    sys.exit()
if os.environ.get("SHUFFLE"):
    # Keep each image's latent error but give it to another image of the same true state: the same error
    # sizes, independent of the images.  Refit there, one latent step, refit: does the step then sharpen?
    pred = KNeighborsRegressor(200).fit(coord[:, None], z0).predict(coord[:, None]).astype(np.float32)
    err = z0 - pred; zsh = z0.copy(); rng = np.random.default_rng(3)
    cells = truth.state_index[:len(z0)].astype(np.int64)
    by = os.environ.get("SHUFFLE_BY", "")  # also keep the error within the same defocus decile / view octant
    if "defocus" in by:
        import pickle
        dfc = pickle.load(open(data_dir / "ctf.pkl", "rb"))[:len(z0), 2:4].mean(1)
        cells = cells * 10 + np.digitize(dfc, np.quantile(dfc, np.linspace(0, 1, 11)[1:-1]))
    if "view" in by:
        cells = cells * 8 + (truth.rotations[:len(z0), 2, :] > 0) @ np.array([1, 2, 4])
    for c_ in np.unique(cells):
        i = np.flatnonzero(cells == c_); zsh[i] = pred[i] + err[rng.permutation(i)]
    tags = (("own errors", z0),) if os.environ.get("SHUFFLE_OWN") else ()
    for tag, zz in tags + ((f"errors shuffled within state {by}", zsh),):
        dec.load_state_dict(saved)
        refit_decoder(dec, posed, tr.pixels, zz, device="cpu"); score(f"{tag}: refit", zz)
        zr = refine_latents(dec, posed, tr.pixels, zz, device="cpu")[0]
        refit_decoder(dec, posed, tr.pixels, zr, device="cpu"); score(f"{tag}: latent step, refit", zr)
    sys.exit()
if os.environ.get("RBF0"):
    rbf_refit(z0, int(os.environ["RBF0"])); sys.exit()
score("trained", z0)
z = z0
for r in range(ROUNDS):
    t0 = time.perf_counter()
    zs = e_step(z, TEMPS)
    print(f"round {r}: e-step {time.perf_counter() - t0:.0f} s", flush=True)
    for t in TEMPS:
        dec.load_state_dict(saved)
        r2, rms = knn(zs[t]); print(f"  T={t}: kNN R2 {r2:.3f} rms {rms:.2f}", flush=True)
    if os.environ.get("RBF"):
        rbf_refit(zs[TEMPS[0]], int(os.environ["RBF"])); break
    if len(TEMPS) == 1 or ROUNDS > 1:
        t = TEMPS[0]
        refit_decoder(dec, posed, tr.pixels, zs[t], device="cpu")
        score(f"round {r} T={t} refit", zs[t]); z = zs[t]

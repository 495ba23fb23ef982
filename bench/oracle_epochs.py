#!/usr/bin/env python
"""Scores of a finished training run at each of its saved epochs (bench/oracle.py's figures over time).

For every epoch E given (``weights.E.pt`` and ``z.E.npy`` in the run folder; 0-based labels), the
maps at the latents of ``--fsc-images`` evenly spaced images are scored against the truth of a
``cryoscape simulate`` dataset: per-image FSC AUC, the AUC inside the variability mask
(cryoscape.analysis.oracle), the mean FSC at a few shells, and |Spearman| of the latents' PC1
with the true coordinate.  It shows *when* a decoder over-fits (plain AUC falling while the
masked AUC still rises).

    .venv/bin/python bench/oracle_epochs.py DATA RUN 4 9 14 19
"""

from __future__ import annotations

import argparse

import numpy as np
import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data", help="the cryoscape simulate folder (ground_truth.npz)")
    p.add_argument("run", help="the cryoscape train run folder")
    p.add_argument("epochs", type=int, nargs="+", help="saved epochs (0-based labels of weights.E.pt)")
    p.add_argument("--fsc-images", type=int, default=40)
    args = p.parse_args(argv)

    from cryoscape.analysis.evaluate import evenly_spaced_indices, latent_correlation, load_ground_truth
    from cryoscape.analysis.oracle import score_maps, truth_variability_mask
    from cryoscape.analysis.evaluate import per_image_fsc
    from cryoscape.train.volumes import load_trained_model

    truth = load_ground_truth(args.data)
    mask = truth_variability_mask(truth)
    print(f"# {args.run} against {args.data}: {args.fsc_images} images per epoch")
    for epoch in args.epochs:
        z = np.load(f"{args.run}/z.{epoch}.npy")
        index = evenly_spaced_indices(len(z), args.fsc_images)
        decoder, _, _ = load_trained_model(args.run, epoch=epoch)
        with torch.no_grad():
            maps = [decoder.eval_volume(torch.as_tensor(z[i])).numpy() for i in index]
        states = truth.state_index[index]
        s = score_maps(maps, states, truth, mask)
        curve = per_image_fsc(maps, [truth.volume(k) for k in states]).curves.mean(0)
        rho = latent_correlation(z, truth.coordinate[: len(z)])
        print(f"epoch {epoch}: AUC {s.auc.mean():.3f}, masked AUC {s.masked_auc.mean():.3f}, "
              f"|rho| PC1 {rho['spearman_pc1']:.3f} (best dimension {rho['spearman_best_dim']:.3f}); "
              f"mean FSC at shells 8/16/24/31: {curve[8]:.2f} {curve[16]:.2f} {curve[24]:.2f} {curve[31]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

#!/usr/bin/env bash
# The built-in example: simulate a dataset of the built-in molecule, reconstruct it by
# backprojection with known poses and CTF, and compare the map with the ground truth.
# Usage: scripts/demo.sh [OUTDIR]   (make demo runs it with OUTDIR=demo_out)
set -euo pipefail
OUT=${1:-demo_out}
BIN=${BIN:-.venv/bin}
N=${DEMO_N_IMAGES:-5000}

echo "== 1/3 simulate: $N images of the built-in molecule, D=64, SNR 0.1, CTF, shifts"
"$BIN/cryoscape" simulate -o "$OUT/data" -n "$N" -D 64 --snr 0.1 --heterogeneity none \
    --shift-max-pixel 3 --astigmatism-angstrom 500 --seed 0

echo "== 2/3 backproject with the known poses and CTF (half-maps, gold-standard FSC)"
"$BIN/cryoscape" backproject "$OUT/data/particles.star" -o "$OUT/backproject"

echo "== 3/3 compare the map with the ground truth"
"$BIN/cryoscape" fsc "$OUT/backproject/map.mrc" "$OUT/data/gt_volumes/vol_000.mrc" \
    -o "$OUT/backproject/fsc_vs_truth.txt" --plot "$OUT/backproject/fsc_vs_truth.png"

cat <<TXT

Done. Look at:
  $OUT/backproject/map.mrc            reconstructed map (open in ChimeraX)
  $OUT/backproject/fsc.png            half-map gold-standard FSC
  $OUT/backproject/fsc_vs_truth.png   FSC of the map against the ground truth
  $OUT/data/                          the simulated dataset (.mrcs, .star, poses.pkl, ctf.pkl, ground truth)
TXT

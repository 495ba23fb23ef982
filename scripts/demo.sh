#!/usr/bin/env bash
# The built-in example: simulate datasets of the built-in molecule, reconstruct one by
# backprojection with known poses and CTF and compare the map with the ground truth, then learn
# the moving domain of the other with a 1-D VAE (train's default decoder, the voxel basis), check
# it against the truth, analyse its latent space into an HTML report and decode maps along its
# latent axis; then learn the same motion with the neural field decoder and check it too, and the
# basis once more as two processes (torchrun); sort a 3-state set into classes with the classical
# EM classification (RELION's --K); last, learn the motion with CryoFormer, its encoder started from
# the basis run, and write its attention maps.
# Usage: scripts/demo.sh [OUTDIR]   (make demo runs it with OUTDIR=demo_out)
set -euo pipefail
OUT=${1:-demo_out}
BIN=${BIN:-.venv/bin}
N=${DEMO_N_IMAGES:-5000}
# a new training run never overwrites an earlier one (cryoscape refuses), so a second demo starts
# its training runs afresh
rm -rf "$OUT/train" "$OUT/train_nf" "$OUT/train_2proc" "$OUT/train_basis" "$OUT/train_basis_2proc" "$OUT/classes" \
    "$OUT/train_cf"

echo "== 1/10 simulate: $N images of the built-in molecule, D=64, SNR 0.1, CTF, shifts"
"$BIN/cryoscape" simulate -o "$OUT/data" -n "$N" -D 64 --snr 0.1 --heterogeneity none \
    --shift-max-pixel 3 --astigmatism-angstrom 500 --seed 0

echo "== 2/10 backproject with the known poses and CTF (half-maps, gold-standard FSC)"
"$BIN/cryoscape" backproject "$OUT/data/particles.star" -o "$OUT/backproject"

echo "== 3/10 compare the map with the ground truth"
"$BIN/cryoscape" fsc "$OUT/backproject/map.mrc" "$OUT/data/gt_volumes/vol_000.mrc" \
    -o "$OUT/backproject/fsc_vs_truth.txt" --plot "$OUT/backproject/fsc_vs_truth.png"

NH=${DEMO_N_HINGE:-1000}
EPOCHS=${DEMO_EPOCHS:-14}
echo "== 4/10 simulate $NH images of the hinge motion (D=32, SNR 1) and train a VAE (train's default decoder, the voxel basis; zdim 1, $EPOCHS epochs)"
"$BIN/cryoscape" simulate -o "$OUT/hinge" -n "$NH" -D 32 --snr 1 --heterogeneity hinge --seed 2
"$BIN/cryoscape" train "$OUT/hinge/particles.star" --zdim 1 -n "$EPOCHS" --beta 0.05 \
    --enc-layers 2 --enc-dim 128 --dec-layers 2 --dec-dim 128 -o "$OUT/train" --no-progress
LAST=$((EPOCHS - 1))

echo "== 5/10 evaluate against the simulated truth (latent vs hinge angle, per-image FSC)"
"$BIN/cryoscape" evaluate "$OUT/train" --truth "$OUT/hinge" --n-images 50 --no-progress

echo "== 6/10 analyze the latent space (PCA, k-means, maps, report) and decode maps along the latent"
"$BIN/cryoscape" analyze "$OUT/train" --ksample 5 --skip-umap
"$BIN/cryoscape" volumes "$OUT/train" --z-values -1.5 -0.75 0 0.75 1.5 -o "$OUT/train/maps" --no-progress

NEPOCHS=${DEMO_NF_EPOCHS:-10}
echo "== 7/10 the same motion with the neural field decoder (--decoder neural_field, $NEPOCHS epochs), evaluated the same way"
"$BIN/cryoscape" train "$OUT/hinge/particles.star" --zdim 1 -n "$NEPOCHS" --beta 0.05 --decoder neural_field --lr 1e-3 \
    --enc-layers 2 --enc-dim 128 --dec-layers 2 --dec-dim 128 -o "$OUT/train_nf" --no-progress
"$BIN/cryoscape" evaluate "$OUT/train_nf" --truth "$OUT/hinge" --n-images 50 --no-progress

echo "== 8/10 the basis run again as 2 processes (torchrun, gloo, one share of every batch each), with checkpoints inside epochs"
OMP_NUM_THREADS=1 "$BIN/torchrun" --nproc-per-node 2 --master-addr 127.0.0.1 --master-port "${DEMO_PORT:-29533}" \
    "$BIN/cryoscape" train "$OUT/hinge/particles.star" --zdim 1 -n "$EPOCHS" --beta 0.05 \
    --enc-layers 2 --enc-dim 128 --dec-layers 2 --dec-dim 128 -o "$OUT/train_2proc" --no-progress \
    --checkpoint-minutes 0.01
"$BIN/cryoscape" evaluate "$OUT/train_2proc" --truth "$OUT/hinge" --n-images 50 --no-progress

echo "== 9/10 classical 3-D classification: 3 hinge states (D=32, SNR 0.5), consensus map, classify -K 3 --no-align"
"$BIN/cryoscape" simulate -o "$OUT/states" -n 600 -D 32 --snr 0.5 --heterogeneity discrete --n-classes 3 \
    --hinge-range-deg 0 60 --seed 3
"$BIN/cryoscape" backproject "$OUT/states/particles.star" -o "$OUT/states/consensus" --no-progress
"$BIN/cryoscape" classify "$OUT/states/particles.star" -K 3 --initial-map "$OUT/states/consensus/map.mrc" \
    -o "$OUT/classes" --no-align
cat "$OUT/classes/model.tsv"

CEPOCHS=${DEMO_CF_EPOCHS:-6}
echo "== 10/10 the motion with CryoFormer (--decoder cryoformer, a CPU-sized network, $CEPOCHS epochs), its encoder started from the basis run (--init-encoder); analyze adds its attention maps"
"$BIN/cryoscape" train "$OUT/hinge/particles.star" --zdim 1 -n "$CEPOCHS" --beta 0.05 --decoder cryoformer \
    --init-encoder "$OUT/train" --enc-layers 2 --enc-dim 128 --decoder-opt n_levels=8 --decoder-opt log2_table_size=14 \
    --decoder-opt base_resolution=4 --decoder-opt n_queries=16 --decoder-opt query_dim=32 --decoder-opt n_blocks=2 \
    -o "$OUT/train_cf" --no-progress
"$BIN/cryoscape" evaluate "$OUT/train_cf" --truth "$OUT/hinge" --n-images 50 --no-progress
"$BIN/cryoscape" analyze "$OUT/train_cf" --ksample 3 --skip-umap

cat <<TXT

Done. Look at:
  $OUT/train/analysis.$LAST/report.html   the analysis report (open in a browser)
  cryoscape dashboard $OUT/train          explore the run in the browser: latents, maps at clicked
                                      particles, selections exported as .star (http://127.0.0.1:8050/)
  $OUT/train/evaluate.$LAST/report.html   the comparison with the ground truth
  $OUT/backproject/map.mrc            reconstructed map (open in ChimeraX)
  $OUT/backproject/fsc.png            half-map gold-standard FSC
  $OUT/backproject/fsc_vs_truth.png   FSC of the map against the ground truth
  $OUT/data/                          the simulated dataset (.mrcs, .star, poses.pkl, ctf.pkl, ground truth)
  $OUT/train/loss.png                 VAE learning curve; $OUT/train/z.$LAST.npy the latents
  $OUT/train/maps/vol_00*.mrc         maps along the latent axis: the domain swings
  $OUT/train_nf/                      the same with the neural field decoder (run.log: its img/s;
                                      evaluate.$((NEPOCHS - 1))/report.html: its comparison with the truth)
  $OUT/train_2proc/                   the basis run trained by 2 processes (config.yaml: world_size 2)
  $OUT/classes/                       3 class maps, classNNN.star subsets, particles.star with rlnClassNumber
  $OUT/train_cf/analysis.$((CEPOCHS - 1))/attention/   CryoFormer's attention maps (change.mrc: where the
                                      queries' attention moves with the latent; report.html shows them)
TXT

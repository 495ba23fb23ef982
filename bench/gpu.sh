#!/bin/bash
# The GPU checks, as one script for a lent GPU machine (see README "Benchmarks"): the CUDA tests
# (pytest -m gpu), then the speed and accuracy benchmarks with every tool on the GPU. Each part has
# its own time limit and writes its log to $OUT as it goes, so a part cut short loses only itself.
#
# Run from the repository root, with wheels of the packages the machine lacks in .whl/ (an ignored
# folder; the device tool carries it), fetched here once for the machine's Python 3.12:
#     echo /.whl/ >> .git/info/exclude
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#         --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#         -d .whl -r bench/gpu_wheels.txt
# then, there:
#     OUT=/tmp/gpu bash bench/gpu.sh           # PARTS="train_gpu" to rerun some parts only
# Python there is the machine's own python3 (its torch); cryoDRGN 4.3.1 runs from the same site
# folder through a small launcher at /tmp/cryodrgn-gpu/bin/cryodrgn. To check the script here first:
#     SCALE=quick PYTHON=.venv/bin/python CRYODRGN=/tmp/venv-cryodrgn OUT=/tmp/gpu bash bench/gpu.sh
set -u
OUT=${OUT:-/tmp/cryoscape-gpu}
SCALE=${SCALE:-full}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 OMP_WAIT_POLICY=PASSIVE
if ! $PY -c "import mrcfile, starfile, gemmi, healpy" 2>/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH=$PWD/src:/tmp/site
else
    export PYTHONPATH=$PWD/src
fi
mkdir -p /tmp/cryodrgn-gpu/bin
cat > /tmp/cryodrgn-gpu/bin/cryodrgn <<EOF
#!/bin/sh
exec $(command -v $PY) -c 'import sys; sys.argv[0] = "cryodrgn"; from cryodrgn.command_line import main_commands; sys.exit(main_commands())' "\$@"
EOF
chmod +x /tmp/cryodrgn-gpu/bin/cryodrgn
CRYODRGN=${CRYODRGN:-/tmp/cryodrgn-gpu}

PARTS=${PARTS:-"gpu_tests train_gpu cryoformer_gpu oracle_gpu"}  # a rerun may name fewer
part() {  # part NAME SECONDS COMMAND...: one part, its output in $OUT/NAME.txt
    local name=$1 limit=$2; shift 2
    case " $PARTS " in *" $name "*) ;; *) return ;; esac
    local start=$SECONDS
    echo "== $name (limit ${limit} s)"
    timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
    local rc=$?
    echo "== $name: exit $rc after $((SECONDS - start)) s"
    tail -n 4 "$OUT/$name.txt"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
  $PY -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available())'
  lscpu | grep "Model name"; nproc; } > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

if [ "$SCALE" = quick ]; then
    TRAIN=(--quick --no-128) FORMER=(--quick --skip cryodrgn) ORACLE=(-n 400 -D 32 --epochs 2 --fsc-images 10)
else
    TRAIN=(--n-images-64 4000 --epochs 2 --no-128 --fsc-images 50 --fsc-images-extra 25)
    FORMER=(--snr 0.01 --n-images 2000 --epochs 2 --fsc-images 50 --skip cryodrgn)
    ORACLE=(--epochs 20 --fsc-images 100)
fi
part gpu_tests 120 $PY -m pytest -q -m gpu -p no:cacheprovider tests/train/test_gpu.py tests/models/test_cryoformer.py
part train_gpu 150 $PY bench/train.py --gpu --threads 8 --cryodrgn "$CRYODRGN" --workdir /tmp/bench-train "${TRAIN[@]}"
part cryoformer_gpu ${FORMER_LIMIT:-130} $PY bench/cryoformer.py --gpu --threads 8 --workdir /tmp/bench-former "${FORMER[@]}"
part oracle_gpu 150 $PY bench/oracle.py --gpu --threads 8 --datasets hinge --decoders basis neural_field --no-cryodrgn \
    --workdir /tmp/bench-oracle "${ORACLE[@]}"
echo "== total ${SECONDS} s"

#!/usr/bin/env bash
# The accelerator checks in one call: the Pallas kernels compiled (not interpreted) against the
# float32 reference and timed against the `xla` path, then training and storage throughput.
#
#     bash scripts/accelerator_check.sh OUT_DIR
#
# Run from the repository root on a machine with a GPU (or TPU) whose Python has jax and the
# packages of setup.cfg (PYTHON=... picks the interpreter; default python3). Each step has its own
# time limit (590 s in all, inside the 10 minutes a device call may run; on one H200 the first three
# steps took 183, 133 and 36 s) and a failing step does not stop the next; the exit status is 1
# if any step failed
# (`benchmarks.kernels` fails when a variant's error vs the reference is above its tolerance).
# Writes into OUT_DIR: run.log (the machine, versions and every step's output),
# kernels_<backend>.json (bfloat16 inputs) and kernels_<backend>_float32.json,
# train_throughput.{json,md,png} and storage.{json,md}. Copy what you keep into results/.
set -u -o pipefail
OUT=${1:?usage: bash scripts/accelerator_check.sh OUT_DIR}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
exec > >(tee "$OUT/run.log") 2>&1
export PYTHONUNBUFFERED=1
status=0
step() {  # step SECONDS ARGS...: run one step under a time limit, remember a failure
  local limit=$1; shift
  echo "== $(date -u +%H:%M:%S) $*"
  timeout "$limit" "$@" || { echo "== FAILED (exit $?): $*"; status=1; }
}

nvidia-smi 2>/dev/null || true
$PY -c "import sys, jax, flax, optax; print(sys.version); print('jax', jax.__version__, \
'flax', flax.__version__, 'optax', optax.__version__); print(jax.devices())"
backend=$($PY -c "from pallas_kernels import config; print(config.backend())") || backend=unknown

PRESETS=transformer,swa,mamba,hybrid,bmojo_f,bmojo

step 200 $PY -m benchmarks.kernels --rounds=7 --out="$OUT/kernels_${backend}.json"
step 150 $PY -m benchmarks.train_throughput --contexts=8192 --tokens_per_step=65536 \
  --presets="$PRESETS,bmojo/implementation=pallas,bmojo/dtype=bfloat16" \
  --rss=false --growth_contexts= --peak_size=8192 --out="$OUT/train_throughput"
step 60 $PY -m benchmarks.storage --contexts=4096,32768 --capacities=0,4096 \
  --out="$OUT/storage"
step 180 $PY -m benchmarks.kernels --dtype=float32 --rounds=1 \
  --out="$OUT/kernels_${backend}_float32.json"
echo "== $(date -u +%H:%M:%S) done, status $status"
exit $status

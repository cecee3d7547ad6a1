#!/usr/bin/env bash
# LARS on a GPU with the JAX backend: the optimizer-step benchmark
# (benchmarks.jax_optimizer_step: LARS, Keras SGD-momentum, optax.lars, optax
# SGD on ResNet-50's shapes) and a short ResNet-50 model.fit throughput run
# (benchmarks.jax_training_throughput: LARS against SGD-momentum,
# mixed_bfloat16, synthetic images), each under its own time limit (240 s and
# 300 s). Their printed tables and JSON figures go to $OUT (or /tmp/gpu_check).
#
# Made for a machine with JAX (CUDA), optax and NumPy but without Keras,
# TensorFlow or network: when Keras does not import, it installs the wheels in
# .whl/ (Keras and the dependencies such a machine lacks). Fetch them once on a
# machine with pip, from the repository root:
#
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 \
#     --platform manylinux_2_17_x86_64 -d .whl \
#     keras==3.15.1 namex==0.1.0 optree==0.20.0
#
# Then run it there from the repository root:
#
#   bash benchmarks/gpu_check.sh
#
# GPU_CHECK_TINY=1 runs both parts at tiny sizes (a check of the script on a
# CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
results=${OUT:-/tmp/gpu_check}
mkdir -p "$results"
export KERAS_BACKEND=jax PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
python=${PYTHON:-python3}

if ! "$python" -c "import keras" 2>/dev/null; then
  if ! ls .whl/*.whl >/dev/null 2>&1; then
    echo "gpu_check.sh: keras does not import and .whl/ holds no wheels;" \
      "fetch them as this script's header says" >&2
    exit 2
  fi
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

if [ "${GPU_CHECK_TINY:-0}" = 1 ]; then
  step_flags=(--scale=0.05 --rounds=2 --steps=2)
  fit_flags=(--image_size=32 --batch_size=4 --steps=2 --rounds=1
    --dtype_policy=float32)
else
  step_flags=(--rounds=20 --steps=20)
  fit_flags=(--batch_size=256 --steps=20 --rounds=4)
fi

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv ||
    echo "no nvidia-smi"
  "$python" -c "import jax, keras, optax, numpy
print('jax', jax.__version__, 'keras', keras.__version__, 'optax',
      optax.__version__, 'numpy', numpy.__version__, jax.devices())"
} 2>&1 | tee "$results/environment.txt"

# LARS must import without TensorFlow (none on the GPU machine); if it cannot,
# the peers still run and the message says why LARS is missing.
candidates=lars,sgd,optax_lars,optax_sgd,jnp_lars
if ! "$python" -c "import lars_tf" 2>"$results/lars_import_error.txt"; then
  echo "lars_tf does not import here; LARS left out:" >&2
  tail -n 3 "$results/lars_import_error.txt" >&2
  candidates=sgd,optax_lars,optax_sgd
fi

# Each part has its own time limit; a failed part does not stop the next.
timeout 240 "$python" -m benchmarks.jax_optimizer_step "${step_flags[@]}" \
  --candidates=$candidates --output="$results/optimizer_step.json" 2>&1 | tee "$results/optimizer_step.txt" ||
  echo "gpu_check.sh: the optimizer-step benchmark failed or timed out" >&2
if [[ $candidates == lars* ]]; then
  timeout 300 "$python" -m benchmarks.jax_training_throughput "${fit_flags[@]}" \
    --output="$results/training_throughput.json" 2>&1 | tee "$results/training_throughput.txt" ||
    echo "gpu_check.sh: the model.fit throughput run failed or timed out" >&2
fi

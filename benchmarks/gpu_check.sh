#!/usr/bin/env bash
# keras_bn's checks on a GPU, in one go (under 8 minutes on one GPU):
#   0. the numerics grid (tests/test_numerics.py): every path, eagerly, in
#      a graph and under jit_compile (model.fit's default on a GPU), on
#      inputs with a large mean against a small spread, against float64
#      and core Keras; where cuDNN's kernel serves the eager calls;
#   1. the path-equivalence and NumPy-reference tests of the batch-
#      normalization layers, where the fused path is cuDNN, the XLA paths
#      compile for the GPU, and the mixed_float16 / mixed_bfloat16 cases
#      run in half precision on the device;
#   2. the batch-normalization, renormalization and BNLSTM rows of
#      benchmarks/run.py, and profile_step.py's pieces.
# Every result goes into the folder given as the only argument.
#
#   pip install -e ".[tests]" && bash benchmarks/gpu_check.sh out/gpu
#
# It stops at once if TensorFlow sees no GPU (GPU_CHECK_ALLOW_CPU=1 runs it
# anyway, to try the script on a CPU).
set -uo pipefail
out=${1:?"usage: bash benchmarks/gpu_check.sh OUTPUT_FOLDER"}
cd "$(dirname "$0")/.."
mkdir -p "$out"
out=$(cd "$out" && pwd)
export TF_CPP_MIN_LOG_LEVEL=3 KERAS_BACKEND=tensorflow
status=0

{
  date -u
  nvidia-smi 2>&1 || echo "nvidia-smi: not found"
  python - <<'PY'
import keras, tensorflow as tf
import keras_bn
print("TensorFlow", tf.__version__, "Keras", keras.__version__,
      "keras_bn", keras_bn.__version__)
print("GPUs:", tf.config.list_physical_devices("GPU"))
print("built with CUDA:", tf.test.is_built_with_cuda())
PY
} > "$out/device.txt" 2>&1
cat "$out/device.txt"
if ! grep -q "GPUs: \[Physical" "$out/device.txt" \
    && [ "${GPU_CHECK_ALLOW_CPU:-0}" != 1 ]; then
  echo "TensorFlow sees no GPU; see $out/device.txt" >&2
  exit 2
fi

# 0. The numerics contract first: it matters most where XLA is the default.
timeout 240 python -m pytest -q -p no:cacheprovider tests/test_numerics.py \
  --junitxml="$out/numerics.xml" > "$out/numerics.txt" 2>&1 || status=1
tail -n 3 "$out/numerics.txt"

# 1. Every path against NumPy and core Keras, the kernels against the
# keras.ops path, the dispatch's graph ops, XLA and mixed precision.
timeout 300 python -m pytest -q -p no:cacheprovider \
  tests/test_batch_normalization.py tests/test_batch_renormalization.py \
  -k "Reference or CoreKeras or FusedPath or EveryPath or GraphOps or XLA \
or Mixed or mixed or Precision" \
  --junitxml="$out/tests.xml" > "$out/tests.txt" 2>&1 || status=1
tail -n 3 "$out/tests.txt"

# 2. The speed rows: one image, one wide and one sequence tensor for BN and
# renorm, the 128-unit BNLSTM row, and the kernel pieces.
timeout 240 python benchmarks/run.py --repeats 20 --out "$out/benchmarks" \
  --only "^Batch(Normalization|Renormalization)[^ ]* \((64, 32, 32, 64|4096, 1024|64, 100, 256)\)" \
  --only "^LSTM \(64, 100, 128\)" \
  > "$out/benchmarks.md" 2> "$out/benchmarks.log" || status=1
timeout 60 python benchmarks/profile_step.py --repeats 30 \
  > "$out/profile.md" 2> "$out/profile.log" || status=1
echo "Results in $out (exit status $status)"
exit $status

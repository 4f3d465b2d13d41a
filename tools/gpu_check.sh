#!/usr/bin/env bash
# One-run GPU check of the CUDA kernels (issue 16): builds the harness with nvcc, then runs
# tools/gpu_check.py (correctness against the numpy references, decode speed against cuBLAS).
# Usage: tools/gpu_check.sh OUT_DIR [gpu_check.py options, e.g. --quick --require-device]
# Writes OUT_DIR/gpu_check.json and OUT_DIR/gpu_check.md (also when the build fails; nothing else:
# build files go to $GPU_CHECK_BUILD, default ${TMPDIR:-/tmp}/nm_onnx_gpu_check). Needs nvcc (CUDA >= 12),
# Python 3 with numpy, and PyTorch with CUDA for the device part; no ONNX Runtime, no ORT headers, no
# network.
# Exit status: 0 pass or no CUDA device (gpu_check.md says which), 1 a mismatch, 2 the build failed,
# 3 no CUDA device with --require-device.
# Environment: PYTHON (default python3), CUDACXX or nvcc on PATH, GPU_CHECK_ARCHS (default "80 90").
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
OUT="${1:?usage: tools/gpu_check.sh OUT_DIR [gpu_check.py options]}"
shift
PYTHON="${PYTHON:-python3}"
NVCC="${CUDACXX:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}"
BUILD="${GPU_CHECK_BUILD:-${TMPDIR:-/tmp}/nm_onnx_gpu_check}"
mkdir -p "$OUT" "$BUILD"
OUT="$(cd "$OUT" && pwd)"
export PYTHONUNBUFFERED=1
cd "$ROOT"

gencode=()
for arch in ${GPU_CHECK_ARCHS:-80 90}; do gencode+=(-gencode "arch=compute_$arch,code=sm_$arch"); done
# The compile rules of custom_ops/CMakeLists.txt's CUDA sources: C++17, -O3, no FMA contraction
# (bit-exact scores), static cudart (loads without a GPU).
NVFLAGS=(-std=c++17 -O3 --fmad=false -cudart static --threads 0 "${gencode[@]}"
  -I"$ROOT/custom_ops/include" -I"$ROOT/custom_ops/cuda")
CU="$ROOT/custom_ops/cuda"
LOG="$BUILD/build.log"
start=$(date +%s)
if ! { "$NVCC" "${NVFLAGS[@]}" -Xcompiler -fPIC -shared "$CU/kernels.cu" "$CU/sparse_gemv.cu" \
         "$ROOT/custom_ops/tests/gpu_check_capi.cu" -o "$BUILD/libnm_onnx_gpu_check.so" &&
       "$NVCC" "${NVFLAGS[@]}" "$ROOT/custom_ops/tests/sparse_gemv_test.cu" "$CU/sparse_gemv.cu" \
         -o "$BUILD/sparse_gemv_test"; } >"$LOG" 2>&1; then
  cat "$LOG" >&2
  echo "gpu_check.sh: the build failed ($NVCC); see $OUT/gpu_check.md" >&2
  "$PYTHON" tools/gpu_check.py --out "$OUT" --build-failed "$LOG" --build-info "$NVCC ${NVFLAGS[*]}" "$@" || true
  exit 2
fi
info="$("$NVCC" --version | tail -1), archs ${GPU_CHECK_ARCHS:-80 90}, built in $(($(date +%s) - start)) s"
echo "gpu_check.sh: built $BUILD/libnm_onnx_gpu_check.so and sparse_gemv_test ($info)"
exec "$PYTHON" tools/gpu_check.py --out "$OUT" --lib "$BUILD/libnm_onnx_gpu_check.so" \
  --gemv-test "$BUILD/sparse_gemv_test" --build-info "$info" "$@"

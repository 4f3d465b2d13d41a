#!/usr/bin/env bash
# Build libnm_onnx_ops.so with AddressSanitizer + UBSan (custom_ops/build-asan, CPU kernels only) and
# run the op tests against it. The Python interpreter is not instrumented, so libasan is preloaded;
# leak detection is off (CPython and onnxruntime keep allocations alive at exit by design).
# Any ASan/UBSan report aborts the process and fails the run. Usage: bash custom_ops/test_asan.sh [pytest args]
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
BUILD_DIR="$HERE/build-asan"

BUILD_DIR="$BUILD_DIR" BUILD_TYPE=RelWithDebInfo NM_ONNX_CUDA=0 CMAKE_ARGS="-DNM_ONNX_SANITIZE=ON" \
  bash "$HERE/build.sh"

ASAN_LIB="$(${CXX:-g++} -print-file-name=libasan.so)"
UBSAN_LIB="$(${CXX:-g++} -print-file-name=libubsan.so)"
export LD_PRELOAD="$ASAN_LIB:$UBSAN_LIB${LD_PRELOAD:+:$LD_PRELOAD}"
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:halt_on_error=1:detect_odr_violation=0:${ASAN_OPTIONS:-}"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:${UBSAN_OPTIONS:-}"
export NM_ONNX_OPS_LIB="$BUILD_DIR/libnm_onnx_ops.so"
cd "$ROOT"
"$PYTHON" -m pytest -q -p no:cacheprovider tests/test_ops_kernels.py tests/test_ops_errors.py \
  tests/test_ops_functions.py tests/test_sparse_matmul_perf_path.py tests/test_ops_nbits_kernels.py \
  -k "not harness and not cuda" "$@"
echo "test_asan.sh: op tests clean under ASan + UBSan"

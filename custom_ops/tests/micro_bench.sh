#!/usr/bin/env bash
# Build and run custom_ops/tests/micro_bench.cc (CPU row kernels without ORT; kernel development only).
# Same compile rules as the library (no fast-math, no FP contraction). Usage: micro_bench.sh [build dir]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-${TMPDIR:-/tmp}/nm_onnx_micro_bench}"
mkdir -p "$out"
${CXX:-g++} -std=c++17 -O3 -fno-fast-math -ffp-contract=off -Wall -Wextra -Wno-psabi -pthread \
  -I"$here/../include" -I"$here/../cpu" "$here/micro_bench.cc" "$here"/../cpu/kernels.cc \
  "$here"/../cpu/row_stats.cc "$here"/../cpu/sparse_gemm*.cc -o "$out/micro_bench"
exec "$out/micro_bench"

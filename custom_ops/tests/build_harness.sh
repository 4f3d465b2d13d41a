#!/usr/bin/env bash
# Builds the standalone sparse GEMM library for custom_ops/tests/harness.py (no ORT headers needed).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-$here/build}"
mkdir -p "$out"
${CXX:-g++} -std=c++17 -O3 -fPIC -shared -Wall -Wextra -pthread ${CXXFLAGS:-} \
  "$here/sparse_gemm_capi.cc" "$here"/../cpu/sparse_gemm.cc "$here"/../cpu/sparse_gemm_avx2.cc \
  "$here"/../cpu/sparse_gemm_avx512.cc -o "$out/libsparse_gemm_harness.so"
echo "$out/libsparse_gemm_harness.so"

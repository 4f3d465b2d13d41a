#!/usr/bin/env bash
# Build custom_ops/build/libnm_onnx_ops.so (the nm_onnx custom op library). Usage:
#   bash custom_ops/build.sh            # release build; CUDA kernels too when nvcc is found
# Environment:
#   ORT_INCLUDE_DIR  directory with onnxruntime_cxx_api.h (C API >= 21); otherwise the headers of
#                    Debian trixie's libonnxruntime-dev (1.21) are downloaded once (private apt state)
#                    and cached in custom_ops/third_party/onnxruntime-1.21/include
#   NM_ONNX_CUDA=0   skip the CUDA kernels;  CUDACXX / nvcc on PATH / /usr/local/cuda/bin/nvcc
#   BUILD_DIR        build directory (default custom_ops/build);  CMAKE_ARGS extra cmake arguments
#   JOBS             parallel compile jobs (default 2)
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
BUILD_DIR="${BUILD_DIR:-$HERE/build}"
JOBS="${JOBS:-2}"

fetch_ort_headers() {
  local dest="$1" tmp
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' RETURN
  mkdir -p "$tmp/state/lists/partial" "$tmp/cache/archives/partial" "$tmp/etc"
  echo "deb http://deb.debian.org/debian trixie main" >"$tmp/etc/sources.list"
  local apt_opts=(-o "Dir::State=$tmp/state" -o "Dir::Cache=$tmp/cache"
    -o "Dir::Etc::SourceList=$tmp/etc/sources.list" -o "Dir::Etc::SourceParts=/dev/null"
    -o "Debug::NoLocking=1" -o "APT::Sandbox::User=root")
  echo "build.sh: downloading ONNX Runtime 1.21 headers (Debian trixie libonnxruntime-dev)" >&2
  apt-get "${apt_opts[@]}" update >/dev/null
  (cd "$tmp" && apt-get "${apt_opts[@]}" download libonnxruntime-dev >/dev/null)
  dpkg-deb -x "$tmp"/libonnxruntime-dev_*.deb "$tmp/x"
  mkdir -p "$dest"
  cp "$tmp"/x/usr/include/onnxruntime/*.h "$dest/"
  mkdir -p "$dest/core/providers" && cp -r "$tmp"/x/usr/include/onnxruntime/core/providers/*.h "$dest/core/providers/"
}

if [[ -z "${ORT_INCLUDE_DIR:-}" ]]; then
  ORT_INCLUDE_DIR="$HERE/third_party/onnxruntime-1.21/include"
  if [[ ! -f "$ORT_INCLUDE_DIR/onnxruntime_cxx_api.h" ]]; then
    fetch_ort_headers "$ORT_INCLUDE_DIR"
  fi
fi
if [[ ! -f "$ORT_INCLUDE_DIR/onnxruntime_cxx_api.h" ]]; then
  echo "build.sh: no onnxruntime_cxx_api.h in ORT_INCLUDE_DIR=$ORT_INCLUDE_DIR" >&2
  exit 2
fi

cuda_args=(-DNM_ONNX_CUDA=OFF)
if [[ "${NM_ONNX_CUDA:-1}" != "0" ]]; then
  nvcc="${CUDACXX:-$(command -v nvcc || true)}"
  [[ -z "$nvcc" && -x /usr/local/cuda/bin/nvcc ]] && nvcc=/usr/local/cuda/bin/nvcc
  if [[ -n "$nvcc" ]]; then
    cuda_args=(-DNM_ONNX_CUDA=ON "-DCMAKE_CUDA_COMPILER=$nvcc")
  fi
fi

generator=()
command -v ninja >/dev/null && generator=(-G Ninja)
# shellcheck disable=SC2086
cmake -S "$HERE" -B "$BUILD_DIR" "${generator[@]}" -DCMAKE_BUILD_TYPE="${BUILD_TYPE:-Release}" \
  "-DORT_INCLUDE_DIR=$ORT_INCLUDE_DIR" "${cuda_args[@]}" ${CMAKE_ARGS:-} >/dev/null
cmake --build "$BUILD_DIR" -j "$JOBS"
echo "build.sh: built $BUILD_DIR/libnm_onnx_ops.so"

// C entry points to the CUDA launchers for the GPU check (tools/gpu_check.py, through ctypes): the same
// launch code the ORT CUDA kernels call (cuda/launch.h), plus the split-K GEMV alone (sparse_gemv.cuh)
// to time the GEMV apart from the selection. No ORT needed: the harness builds from kernels.cu,
// sparse_gemv.cu and this file (tools/gpu_check.sh).
//
// Pointers are device pointers of the given dtype (0 float32, 1 float16, 2 bfloat16; launch.h's DType),
// the stream a cudaStream_t (e.g. torch.cuda.current_stream().cuda_stream). Each returns 0, or 1 with a
// message in err (what a kernel would have reported to ORT).
#include <cstdio>
#include <exception>

#include "launch.h"
#include "sparse_gemv.cuh"

namespace {

template <typename F>
int guarded(char* err, size_t err_len, F&& body) {
  try {
    body();
    return 0;
  } catch (const std::exception& e) {
    if (err && err_len) std::snprintf(err, err_len, "%s", e.what());
    return 1;
  }
}

nm_onnx::cuda::DType dtype(int d) { return static_cast<nm_onnx::cuda::DType>(d); }

}  // namespace

extern "C" {

int nm_check_token_shift(int dt, const void* x, void* xc, void* eta, int64_t T, int64_t K, int mode, void* stream,
                         char* err, size_t err_len) {
  return guarded(err, err_len, [&] {
    nm_onnx::TokenShiftAttrs a;
    a.mode = static_cast<nm_onnx::Shift>(mode);
    nm_onnx::cuda::token_shift(dtype(dt), x, xc, eta, T, K, a, stream);
  });
}

int nm_check_nm_mask(int dt, const void* x, const void* channel_scale, void* y, int64_t T, int64_t K, int n, int m,
                     int criterion, void* stream, char* err, size_t err_len) {
  return guarded(err, err_len, [&] {
    nm_onnx::NMMaskAttrs a;
    a.n = n;
    a.m = m;
    a.criterion = static_cast<nm_onnx::Criterion>(criterion);
    nm_onnx::cuda::nm_mask(dtype(dt), x, channel_scale, y, T, K, a, stream);
  });
}

int nm_check_nm_sparse_matmul(int dt, const void* x, const void* b, const void* channel_scale, const void* shift_bias,
                              const void* bias, void* y, int64_t T, int64_t K, int64_t O, int n, int m, int shift,
                              int variance_correction, void* stream, char* err, size_t err_len) {
  return guarded(err, err_len, [&] {
    nm_onnx::NMSparseMatMulAttrs a;
    a.n = n;
    a.m = m;
    a.shift = static_cast<nm_onnx::Shift>(shift);
    a.variance_correction = variance_correction != 0;
    nm_onnx::cuda::nm_sparse_matmul(dtype(dt), x, b, channel_scale, shift_bias, bias, y, T, K, O, a, stream);
  });
}

// Y [rows, O] float32 = the split-K GEMV over idx [rows, kept] of X [rows, K] float32 and B [K, O] of dtype dt.
int nm_check_sparse_gemv(int dt, const float* x, const int32_t* idx, int64_t rows, int64_t K, int64_t kept,
                         const void* b, int64_t O, float* y, void* stream, char* err, size_t err_len) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  cudaError_t e = cudaErrorInvalidValue;
  switch (dtype(dt)) {
    case nm_onnx::cuda::DType::kF32:
      e = nm_onnx::cuda::sparse_gemv(x, idx, rows, K, kept, static_cast<const float*>(b), O, y, s);
      break;
    case nm_onnx::cuda::DType::kF16:
      e = nm_onnx::cuda::sparse_gemv(x, idx, rows, K, kept, static_cast<const __half*>(b), O, y, s);
      break;
    case nm_onnx::cuda::DType::kBF16:
      e = nm_onnx::cuda::sparse_gemv(x, idx, rows, K, kept, static_cast<const __nv_bfloat16*>(b), O, y, s);
      break;
  }
  if (e == cudaSuccess) return 0;
  if (err && err_len) std::snprintf(err, err_len, "sparse_gemv: %s", cudaGetErrorString(e));
  return 1;
}

// Number of CUDA devices this harness's runtime sees (0 without a GPU or driver).
int nm_check_device_count() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess ? n : 0;
}

}  // extern "C"

// Split-K GEMV over the kept rows of B for decode (1..16 tokens) on CUDA: the GPU twin of
// custom_ops/cpu/sparse_gemm.h.
//
// A decode step is bound by reading the weight B [K, O]; with N:M activation sparsity each token
// needs only its kept rows, so only kept/K of B is read. Work is split over (column tiles of O) x
// (chunks of the kept indices: split-K) x (tokens), so even one token fills the GPU; the partial
// sums of the K chunks are added with float atomics into a float32 accumulator, which the caller's
// epilogue (variance correction, shift bias, bias, cast to the output type) reads.
#pragma once
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace nm_onnx {
namespace cuda {

// idx[t, :] = the ascending j with keep[t, j] != 0, for t in [0, rows). keep: [rows, K] uint8 on the
// device with exactly `kept` nonzero entries per row (an N:M keep mask); idx: [rows, kept] int32.
cudaError_t keep_to_indices(const uint8_t* keep, int64_t rows, int64_t K, int64_t kept, int32_t* idx,
                            cudaStream_t stream);

// Y[t, o] = sum over j < kept of X[t, idx[t, j]] * B[idx[t, j], o], for t < rows, o < O; all on device.
// X: [rows, K] float32 (already shifted; pruned entries are never read), idx: [rows, kept] int32
// (any order; each in [0, K)), B: [K, O] row-major TB = float, __half or __nv_bfloat16,
// Y: [rows, O] float32, overwritten (zeroed on `stream`, then accumulated with atomics: the order of
// the split-K partial sums, and so the last bits, may vary run to run). A kept NaN or 0 * inf
// propagates as in a dense product over the kept rows. Meant for rows <= 16 (any rows works).
// Returns cudaErrorInvalidValue for negative sizes or a null pointer with nonzero work, else the
// launch status; asynchronous on `stream`.
template <typename TB>
cudaError_t sparse_gemv(const float* X, const int32_t* idx, int64_t rows, int64_t K, int64_t kept, const TB* B,
                        int64_t O, float* Y, cudaStream_t stream);

extern template cudaError_t sparse_gemv<float>(const float*, const int32_t*, int64_t, int64_t, int64_t,
                                               const float*, int64_t, float*, cudaStream_t);
extern template cudaError_t sparse_gemv<__half>(const float*, const int32_t*, int64_t, int64_t, int64_t,
                                                const __half*, int64_t, float*, cudaStream_t);
extern template cudaError_t sparse_gemv<__nv_bfloat16>(const float*, const int32_t*, int64_t, int64_t, int64_t,
                                                       const __nv_bfloat16*, int64_t, float*, cudaStream_t);

}  // namespace cuda
}  // namespace nm_onnx

// Sparse GEMM over the kept rows of B: the inner loop of NMSparseMatMul on CPU.
//
// With N:M activation sparsity only N/M of each token's input features survive, so only those
// rows of the weight B ([K, O]) need to be read. Decode (T = 1..16) is bound by reading B, so
// skipping rows makes it up to M/N times faster than a dense GEMV. The caller (the NMSparseMatMul
// kernel) selects the kept indices and applies the epilogue (variance correction, shift bias, bias).
#pragma once
#include <cstddef>
#include <cstdint>
#include <functional>
namespace nm_onnx {
// Y[t, o] = sum over the kept k of row t: X[t, k] * B[k, o], for t in [0, T), o in [0, O).
// X: [T, K] row-major, already shifted (pruned entries need not be zero: only idx is used).
// idx: [T, kept] int32, kept = K / M * N column indices per row, ascending.
// B: [K, O] row-major, float32 or IEEE float16 (read as stored: a float16 model's decode reads
// a quarter of the bytes of a float32 dense GEMV, and nothing converts the whole weight per call).
// Y: [T, O] float32 (overwritten).
// parallel_for(n_tasks, fn(task_begin, task_end)) splits work (e.g. ORT's intra-op pool).
using ParallelFor = std::function<void(std::ptrdiff_t, const std::function<void(std::ptrdiff_t, std::ptrdiff_t)>&)>;

// The weight B: exactly one of f32 / f16 (float16 bits) is set.
struct Weight {
  const float* f32 = nullptr;
  const uint16_t* f16 = nullptr;
};

void sparse_gemm(const float* X, const int32_t* idx, int64_t T, int64_t K, int64_t kept, Weight B,
                 int64_t O, float* Y, const ParallelFor& parallel_for);

inline void sparse_gemm_f32(const float* X, const int32_t* idx, int64_t T, int64_t K, int64_t kept,
                            const float* B, int64_t O, float* Y, const ParallelFor& parallel_for) {
  sparse_gemm(X, idx, T, K, kept, Weight{B, nullptr}, O, Y, parallel_for);
}
}

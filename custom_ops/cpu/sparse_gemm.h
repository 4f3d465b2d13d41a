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
// B: [K, O] row-major float32. Y: [T, O] float32 (overwritten).
// parallel_for(n_tasks, fn(task_begin, task_end)) splits work (e.g. ORT's intra-op pool).
using ParallelFor = std::function<void(std::ptrdiff_t, const std::function<void(std::ptrdiff_t, std::ptrdiff_t)>&)>;
void sparse_gemm_f32(const float* X, const int32_t* idx, int64_t T, int64_t K, int64_t kept,
                     const float* B, int64_t O, float* Y, const ParallelFor& parallel_for);
}

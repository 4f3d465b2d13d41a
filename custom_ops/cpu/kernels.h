// CPU row kernels of TokenShift, NMMask and NMSparseMatMul on float32 data (no ONNX Runtime types).
//
// The ORT glue (ops_cpu.cc) converts float16 to float32, validates shapes and attributes, and calls
// these with a ParallelFor over token rows. The selection logic itself is nm_select.h.
#pragma once
#include <cstdint>

#include "nm_select.h"
#include "op_attrs.h"
#include "sparse_gemm.h"
#include "sparse_gemm_nbits.h"

namespace nm_onnx {

// Per-row shift eta[t] of X [T, K] (median or mean; kNone gives 0).
void row_shifts(const float* x, int64_t T, int64_t K, Shift mode, float* eta, const ParallelFor& pf);

// Column norms sqrt(sum_t x_tj^2) (float64 accumulation in row order), colnorm [K].
void column_norms(const float* x, int64_t T, int64_t K, float* colnorm, const ParallelFor& pf);

// keep [T, K] (0/1) of the N:M selection of X by |x| * scale * colnorm (scale/colnorm may be null).
void nm_keep_rows(const float* x, int64_t T, int64_t K, int n, int m, const float* scale,
                  const float* colnorm, uint8_t* keep, const ParallelFor& pf);

// NMMask on float32: Y = X where kept, +0 elsewhere.
void nm_mask_f32(const float* x, int64_t T, int64_t K, int n, int m, const float* scale,
                 const float* colnorm, float* y, const ParallelFor& pf);

// The node's attributes plus its optional float32 inputs.
struct SparseMatMulArgs : NMSparseMatMulAttrs {
  const float* channel_scale = nullptr;  // [K] or null
  const float* shift_bias = nullptr;     // [O] or null
  const float* bias = nullptr;           // [O] or null
};

// NMSparseMatMul computed in float32: X [T, K], B [K, O] (float32 or float16, read as stored) -> Y [T, O].
void nm_sparse_matmul_f32(const float* x, Weight b, int64_t T, int64_t K, int64_t O,
                          const SparseMatMulArgs& args, float* y, const ParallelFor& pf);

// NMSparseMatMulNBits computed in float32: X [T, K], the K-major quantized weight w (K, O in w) -> Y [T, O].
void nm_sparse_matmul_nbits_f32(const float* x, const NBitsWeight& w, int64_t T, const SparseMatMulArgs& args,
                                float* y, const ParallelFor& pf);

// The steps both share: shift, selection and kept indices of each row (xs = x - eta, idx [T, kept] ascending),
// then gemm(xs, idx, kept, y) writes the raw sums y [T, O], then the epilogue (shift bias, v, bias) in place.
using KeptGemm = std::function<void(const float* xs, const int32_t* idx, int64_t kept, float* y)>;
void nm_sparse_matmul_rows(const float* x, int64_t T, int64_t K, int64_t O, const SparseMatMulArgs& args,
                           const KeptGemm& gemm, float* y, const ParallelFor& pf);

}  // namespace nm_onnx

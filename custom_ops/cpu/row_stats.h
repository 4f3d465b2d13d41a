// Per-row statistics of the CPU kernels: the shift (lower median or mean), the variance-correction
// factor, and the kept-index list of a keep mask.
//
// They run once per token row in every NMSparseMatMul / TokenShift call, so they must cost little
// next to the sparse GEMM of that row: the median is an exact selection by bisection on the order
// keys of nm_select.h (branch-free counting, AVX-512 compress; no data-dependent branches, which made
// std::nth_element cost ~10x the GEMM row at prefill), variances use independent float64
// accumulators that vectorise, index lists are built without branches.
#pragma once
#include <cstdint>
#include <vector>

#include "nm_select.h"

namespace nm_onnx {

// eta of one row: 0 (kNone or K = 0), the lower median (NaN if the row holds a NaN; -0 -> +0) or
// the float64 mean rounded to float32. scratch: reused buffer of the caller's worker.
float row_shift(const float* x, int64_t K, Shift mode, std::vector<uint32_t>& scratch);

// The lower median alone (K >= 1), same rules.
float lower_median(const float* x, int64_t K, std::vector<uint32_t>& scratch);

// Variance-correction factor v = sqrt(var(x) / max(var(xh), 1e-9)) (unbiased float64 variances,
// 1 when K < 2), where xh[j] = keep[j] ? xs[j] : 0 is the pruned shifted row. As xs = x - eta with
// a constant eta, var(x - eta) = var(x) up to rounding; the kernel uses x itself (METHOD.md item 5).
float variance_factor(const float* x, const float* xs, const uint8_t* keep, int64_t K);

// Ascending indices j with keep[j] != 0 written to out; returns how many. out needs room for K + 16
// entries (the writes run past the last kept index).
int64_t kept_indices(const uint8_t* keep, int64_t K, int32_t* out);

}  // namespace nm_onnx

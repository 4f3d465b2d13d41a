// Internal interface between the quantized sparse GEMM driver (sparse_gemm_nbits.cc) and its per-ISA kernels
// (sparse_gemm_nbits_avx2.cc, sparse_gemm_nbits_avx512.cc; the kernels themselves: sparse_gemm_nbits_kernels.h).
// Same rules as sparse_gemm_internal.h: function target attributes, no standard-library templates in the ISA
// files.
#pragma once
#include <cstdint>

#include "sparse_gemm_nbits.h"

namespace nm_onnx {
namespace detail {

// One column chunk [o0, o1) of Y [T, O] for tokens [t0, t1) and K blocks [blk0, blk1): Y zeroed there, then
// those blocks' kept rows added. o0 is a multiple of 128 (a whole number of bytes and vector pieces in every
// layout).
struct NBitsBlock {
  const float* X;
  const int32_t* idx;
  const NBitsWeight* W;
  float* Y;
  int64_t kept;
  int64_t t0, t1, o0, o1, blk0, blk1;
};

// The first j with id[j] >= k (id ascending, kept entries).
inline int64_t first_at_or_after(const int32_t* id, int64_t kept, int64_t k) {
  int64_t lo = 0, hi = kept;
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (id[mid] < k) lo = mid + 1; else hi = mid;
  }
  return lo;
}

void sparse_gemm_nbits_chunk_scalar(const NBitsBlock& g);
void sparse_gemm_nbits_chunk_avx2(const NBitsBlock& g);
void sparse_gemm_nbits_chunk_avx512(const NBitsBlock& g);

// y[c0, c1) += scale[c] * sum_{j in [j0, j1)} x[id[j]] * (q[id[j], c] - zp[c]) for K block `blk`: the scalar
// form of one block's step (the column tails of the vector kernels; compiled for the baseline ISA only).
void nbits_block_cols_scalar(const NBitsWeight& W, const float* x, const int32_t* id, int64_t j0, int64_t j1,
                             int64_t blk, float* y, int64_t c0, int64_t c1);

}  // namespace detail
}  // namespace nm_onnx

// Internal interface between the quantized sparse GEMM driver (sparse_gemm_nbits.cc) and its per-ISA kernels
// (sparse_gemm_nbits_avx2.cc, sparse_gemm_nbits_avx512.cc; the kernels themselves: sparse_gemm_nbits_kernels.h).
// Same rules as sparse_gemm_internal.h: function target attributes, no standard-library templates in the ISA
// files.
#pragma once
#include <cstdint>

#include "sparse_gemm_nbits.h"

namespace nm_onnx {
namespace detail {

// One column chunk [o0, o1) of Y for tokens [t0, t1): Y zeroed there, then every K block's kept rows added.
// o0 is a multiple of 128 (a whole number of bytes and vector pieces in every layout).
struct NBitsBlock {
  const float* X;
  const int32_t* idx;
  const NBitsWeight* W;
  float* Y;
  int64_t kept;
  int64_t t0, t1, o0, o1;
};

void sparse_gemm_nbits_chunk_scalar(const NBitsBlock& g);
void sparse_gemm_nbits_chunk_avx2(const NBitsBlock& g);
void sparse_gemm_nbits_chunk_avx512(const NBitsBlock& g);

// y[c0, c1) += scale[c] * sum_{j in [j0, j1)} x[id[j]] * (q[id[j], c] - zp[c]) for K block `blk`: the scalar
// form of one block's step (the column tails of the vector kernels; compiled for the baseline ISA only).
void nbits_block_cols_scalar(const NBitsWeight& W, const float* x, const int32_t* id, int64_t j0, int64_t j1,
                             int64_t blk, float* y, int64_t c0, int64_t c1);

}  // namespace detail
}  // namespace nm_onnx

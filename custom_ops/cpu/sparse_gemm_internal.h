// Internal interface between the sparse GEMM driver (sparse_gemm.cc) and its per-ISA kernels.
//
// Each ISA file compiles its kernels with function-level target attributes, so the library needs
// no special compile flags and the driver only calls a kernel after checking the CPU supports it.
// The kernel files use no standard-library templates, so no AVX code can leak into shared
// inline functions (an ODR merge could otherwise run AVX-512 code on an AVX2-only CPU).
#pragma once
#include <cstdint>

namespace nm_onnx {
namespace detail {

// One block of work: Y[t, o] for t in [t0, t1), o in [o0, o1), reading all kept rows of each token.
struct GemmBlock {
  const float* X;
  const int32_t* idx;
  const float* B;
  float* Y;
  int64_t K, kept, O;
  int64_t t0, t1, o0, o1;
};

// Many tokens (prefill): register tiles of Y, see sparse_gemm_avx512.cc.
void sparse_gemm_block_scalar(const GemmBlock& blk);
void sparse_gemm_block_avx2(const GemmBlock& blk);
void sparse_gemm_block_avx512(const GemmBlock& blk);

// Few tokens: y rows accumulated in L1 while groups of four kept rows of B stream through;
// kept indices in blocks of jb so rows shared by several tokens are still in cache.
void sparse_gemm_stream_scalar(const GemmBlock& blk, int64_t jb);
void sparse_gemm_stream_avx2(const GemmBlock& blk, int64_t jb);
void sparse_gemm_stream_avx512(const GemmBlock& blk, int64_t jb);

}  // namespace detail
}  // namespace nm_onnx

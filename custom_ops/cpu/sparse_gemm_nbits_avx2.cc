// AVX2 kernel of the quantized sparse GEMM over kept rows (sparse_gemm_nbits_kernels.h): 8 float lanes,
// register tiles of 4 pieces (64 columns at 4 bits: 8 accumulators, the zero points mostly from L1).
// Compiled with a function target attribute: only called after a runtime AVX2+FMA check (sparse_gemm_nbits.cc).
#include <immintrin.h>

#include "sparse_gemm_nbits_internal.h"

#define NM_NBITS_TARGET __attribute__((target("avx2,fma,f16c")))

namespace nm_onnx {
namespace detail {
namespace {

struct Avx2 {
  static constexpr int L = 8, NP = 4, NP_SYM = 4;
  typedef float vf __attribute__((vector_size(32)));
  typedef int32_t vi __attribute__((vector_size(32)));
  NM_NBITS_TARGET static vf set1(float a) { return reinterpret_cast<vf>(_mm256_set1_ps(a)); }
  NM_NBITS_TARGET static vi load_bytes(const uint8_t* p) {
    return reinterpret_cast<vi>(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  }
  NM_NBITS_TARGET static vf fma(vf a, vf b, vf c) {
    return reinterpret_cast<vf>(_mm256_fmadd_ps(reinterpret_cast<__m256>(a), reinterpret_cast<__m256>(b),
                                                reinterpret_cast<__m256>(c)));
  }
  NM_NBITS_TARGET static vf zip_lo(vf a, vf b) { return __builtin_shuffle(a, b, vi{0, 8, 1, 9, 2, 10, 3, 11}); }
  NM_NBITS_TARGET static vf zip_hi(vf a, vf b) { return __builtin_shuffle(a, b, vi{4, 12, 5, 13, 6, 14, 7, 15}); }
};

}  // namespace
}  // namespace detail
}  // namespace nm_onnx

#include "sparse_gemm_nbits_kernels.h"

namespace nm_onnx {
namespace detail {

NM_NBITS_TARGET void sparse_gemm_nbits_chunk_avx2(const NBitsBlock& g) { chunk_any<Avx2>(g); }

}  // namespace detail
}  // namespace nm_onnx

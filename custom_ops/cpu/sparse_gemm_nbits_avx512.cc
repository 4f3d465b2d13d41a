// AVX-512 kernel of the quantized sparse GEMM over kept rows (sparse_gemm_nbits_kernels.h): 16 float lanes,
// register tiles of 4 pieces (128 columns at 4 bits: 8 accumulators and 8 zero-point vectors). Compiled with
// a function target attribute: only called after a runtime AVX-512 F/BW/VL check (sparse_gemm_nbits.cc).
// GCC 12's AVX-512 headers trip -W(maybe-)uninitialized on _mm512_undefined_* (GCC bug 105593, a false positive).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop

#include "sparse_gemm_nbits_internal.h"

#define NM_NBITS_TARGET __attribute__((target("avx512f,avx512bw,avx512vl")))

namespace nm_onnx {
namespace detail {
namespace {

struct Avx512 {
  static constexpr int L = 16, NP = 4, NP_SYM = 4;
  typedef float vf __attribute__((vector_size(64)));
  typedef int32_t vi __attribute__((vector_size(64)));
  NM_NBITS_TARGET static vf set1(float a) { return reinterpret_cast<vf>(_mm512_set1_ps(a)); }
  NM_NBITS_TARGET static vi load_bytes(const uint8_t* p) {
    return reinterpret_cast<vi>(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }
  NM_NBITS_TARGET static vf fma(vf a, vf b, vf c) {
    return reinterpret_cast<vf>(_mm512_fmadd_ps(reinterpret_cast<__m512>(a), reinterpret_cast<__m512>(b),
                                                reinterpret_cast<__m512>(c)));
  }
  NM_NBITS_TARGET static vf zip_lo(vf a, vf b) {
    return __builtin_shuffle(a, b, vi{0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23});
  }
  NM_NBITS_TARGET static vf zip_hi(vf a, vf b) {
    return __builtin_shuffle(a, b, vi{8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31});
  }
};

}  // namespace
}  // namespace detail
}  // namespace nm_onnx

#include "sparse_gemm_nbits_kernels.h"

namespace nm_onnx {
namespace detail {

NM_NBITS_TARGET void sparse_gemm_nbits_chunk_avx512(const NBitsBlock& g) { chunk_any<Avx512>(g); }

}  // namespace detail
}  // namespace nm_onnx

// AVX2+FMA kernels of the sparse GEMM over kept rows: 8-wide ymm vectors, 16 registers; the kernels
// themselves are sparse_gemm_kernels.h, shared with AVX-512. B is float32 or float16 (F16C conversion
// as it is loaded, or when a block is packed). Compiled with a function target attribute: only called
// after a runtime AVX2+FMA+F16C check (sparse_gemm.cc).
#include <immintrin.h>

#include "sparse_gemm_internal.h"

#define NM_SPARSE_GEMM_TARGET __attribute__((target("avx2,fma,f16c")))

namespace nm_onnx {
namespace detail {
namespace {

struct Avx2 {
  using Vec = __m256;
  using Mask = __m256i;  // all bits set in a lane: the lane is used
  static constexpr int kLanes = 8;
  static constexpr int64_t kPackFloats = 16384;  // 64 KiB packing buffer per thread
  NM_SPARSE_GEMM_TARGET static Vec zero() { return _mm256_setzero_ps(); }
  NM_SPARSE_GEMM_TARGET static Vec set1(float a) { return _mm256_set1_ps(a); }
  NM_SPARSE_GEMM_TARGET static Mask full() { return _mm256_set1_epi32(-1); }
  NM_SPARSE_GEMM_TARGET static Mask first(int64_t n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n < 8 ? n : 8)),
                              _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  NM_SPARSE_GEMM_TARGET static Vec load(const float* p) { return _mm256_loadu_ps(p); }
  NM_SPARSE_GEMM_TARGET static Vec load(const uint16_t* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  NM_SPARSE_GEMM_TARGET static Vec load(const float* p, Mask m) { return _mm256_maskload_ps(p, m); }
  NM_SPARSE_GEMM_TARGET static Vec load(const uint16_t* p, Mask m) {  // no 16-bit masked load: copy the lanes
    alignas(16) uint16_t h[8];
    for (int l = 0; l < 8; ++l) h[l] = _mm256_movemask_ps(_mm256_castsi256_ps(m)) >> l & 1 ? p[l] : 0;
    return _mm256_cvtph_ps(_mm_load_si128(reinterpret_cast<const __m128i*>(h)));
  }
  NM_SPARSE_GEMM_TARGET static Vec load_aligned(const float* p) { return _mm256_load_ps(p); }
  NM_SPARSE_GEMM_TARGET static void store(float* p, Vec v) { _mm256_storeu_ps(p, v); }
  NM_SPARSE_GEMM_TARGET static void store(float* p, Mask m, Vec v) { _mm256_maskstore_ps(p, m, v); }
  NM_SPARSE_GEMM_TARGET static void store_aligned(float* p, Vec v) { _mm256_store_ps(p, v); }
  NM_SPARSE_GEMM_TARGET static Vec fmadd(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
};

}  // namespace
}  // namespace detail
}  // namespace nm_onnx

#include "sparse_gemm_kernels.h"

namespace nm_onnx {
namespace detail {

NM_SPARSE_GEMM_TARGET void sparse_gemm_stream_avx2(const GemmBlock& g, int64_t jb) { stream_any<Avx2>(g, jb); }

// 3 tokens x 32 columns = 12 ymm accumulators; 64 kept indices per block (packed B: 16 KiB at 50%).
NM_SPARSE_GEMM_TARGET void sparse_gemm_block_avx2(const GemmBlock& g) { block_any<Avx2, 3, 4, 64>(g); }

}  // namespace detail
}  // namespace nm_onnx

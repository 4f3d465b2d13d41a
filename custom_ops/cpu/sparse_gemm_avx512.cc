// AVX-512 kernels of the sparse GEMM over kept rows: 16-wide zmm vectors, 32 registers; the kernels
// themselves are sparse_gemm_kernels.h, shared with AVX2. B is float32 or float16 (converted as it is
// loaded, or when a block is packed). Compiled with a function target attribute: only called after a
// runtime AVX-512 F/BW/VL check (sparse_gemm.cc).
// GCC 12's AVX-512 headers trip -W(maybe-)uninitialized on _mm512_undefined_* (GCC bug 105593, a false positive).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop

#include "sparse_gemm_internal.h"

#define NM_SPARSE_GEMM_TARGET __attribute__((target("avx512f,avx512bw,avx512vl")))

namespace nm_onnx {
namespace detail {
namespace {

struct Avx512 {
  using Vec = __m512;
  using Mask = __mmask16;
  static constexpr int kLanes = 16;
  static constexpr int64_t kPackFloats = 32768;  // 128 KiB packing buffer per thread
  NM_SPARSE_GEMM_TARGET static Vec zero() { return _mm512_setzero_ps(); }
  NM_SPARSE_GEMM_TARGET static Vec set1(float a) { return _mm512_set1_ps(a); }
  NM_SPARSE_GEMM_TARGET static Mask full() { return 0xFFFF; }
  NM_SPARSE_GEMM_TARGET static Mask first(int64_t n) { return n >= 16 ? Mask(0xFFFF) : Mask((1u << n) - 1u); }
  NM_SPARSE_GEMM_TARGET static Vec load(const float* p) { return _mm512_loadu_ps(p); }
  NM_SPARSE_GEMM_TARGET static Vec load(const uint16_t* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  NM_SPARSE_GEMM_TARGET static Vec load(const float* p, Mask m) { return _mm512_maskz_loadu_ps(m, p); }
  NM_SPARSE_GEMM_TARGET static Vec load(const uint16_t* p, Mask m) {
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p));
  }
  NM_SPARSE_GEMM_TARGET static Vec load_aligned(const float* p) { return _mm512_load_ps(p); }
  NM_SPARSE_GEMM_TARGET static void store(float* p, Vec v) { _mm512_storeu_ps(p, v); }
  NM_SPARSE_GEMM_TARGET static void store(float* p, Mask m, Vec v) { _mm512_mask_storeu_ps(p, m, v); }
  NM_SPARSE_GEMM_TARGET static void store_aligned(float* p, Vec v) { _mm512_store_ps(p, v); }
  NM_SPARSE_GEMM_TARGET static Vec fmadd(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
};

}  // namespace
}  // namespace detail
}  // namespace nm_onnx

#include "sparse_gemm_kernels.h"

namespace nm_onnx {
namespace detail {

NM_SPARSE_GEMM_TARGET void sparse_gemm_stream_avx512(const GemmBlock& g, int64_t jb) { stream_any<Avx512>(g, jb); }

// 6 tokens x 64 columns = 24 zmm accumulators; 64 kept indices per block (about 128 rows of B at 50%,
// 32 KiB packed). Tuned on Zen 4/5 (T = 512, Llama-7B MLP shapes): see benchmarks/RESULTS.md.
NM_SPARSE_GEMM_TARGET void sparse_gemm_block_avx512(const GemmBlock& g) { block_any<Avx512, 6, 4, 64>(g); }

}  // namespace detail
}  // namespace nm_onnx

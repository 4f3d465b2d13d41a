// AVX2+FMA kernels of the sparse GEMM over kept rows (see sparse_gemm_internal.h).
//
// Same scheme as sparse_gemm_avx512.cc with 8-wide ymm vectors and 16 registers: decode streams four
// kept rows at a time into an L1-resident piece of Y; prefill keeps a tile of R tokens x NV vectors of
// Y in registers and streams packed blocks of kept rows of B through it.
// B is float32 or float16 (F16C conversion as it is loaded, or when a block is packed).
// Compiled with a function target attribute: only called after a runtime AVX2+FMA+F16C check.
#include <immintrin.h>

#include "sparse_gemm_internal.h"

#define NM_AVX2 __attribute__((target("avx2,fma,f16c")))

namespace nm_onnx {
namespace detail {
namespace {

// 8 consecutive elements of a row of B as float32: all, or the lanes of `mask` (others 0).
NM_AVX2 inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
NM_AVX2 inline __m256 load8(const uint16_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
NM_AVX2 inline __m256 load8(const float* p, __m256i mask) { return _mm256_maskload_ps(p, mask); }
NM_AVX2 inline __m256 load8(const uint16_t* p, __m256i mask) {  // no 16-bit masked load: copy the lanes
  alignas(16) uint16_t h[8];
  for (int l = 0; l < 8; ++l) h[l] = _mm256_movemask_ps(_mm256_castsi256_ps(mask)) >> l & 1 ? p[l] : 0;
  return _mm256_cvtph_ps(_mm_load_si128(reinterpret_cast<const __m128i*>(h)));
}

// Y[t..t+R, o..o+8*NV) (+)= sum_{j in [j0, j1)} X[t, idx[t, j]] * B[idx[t, j], o..]; the last
// vector uses the lane mask `tail` (all lanes set for a full vector).
// Row k of B's column block is at bp + (k - klo) * ldb: B itself (klo = 0, ldb = O) or a packed copy.
template <int R, int NV, typename BT>
NM_AVX2 inline void micro(const GemmBlock& g, int64_t t, int64_t o, int64_t j0, int64_t j1, bool first,
                          __m256i tail, const BT* bp, int64_t klo, int64_t ldb) {
  __m256 acc[R][NV];
  float* y[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    y[r] = g.Y + (t + r) * g.O + o;
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) {
      if (first)
        acc[r][v] = _mm256_setzero_ps();
      else if (v == NV - 1)
        acc[r][v] = _mm256_maskload_ps(y[r] + 8 * v, tail);
      else
        acc[r][v] = _mm256_loadu_ps(y[r] + 8 * v);
    }
  }
  const float* x[R];
  const int32_t* id[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    x[r] = g.X + (t + r) * g.K;
    id[r] = g.idx + (t + r) * g.kept;
  }
  for (int64_t j = j0; j < j1; ++j) {
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const int64_t k = id[r][j];
      const __m256 a = _mm256_set1_ps(x[r][k]);
      const BT* b = bp + (k - klo) * ldb;
#pragma GCC unroll 16
      for (int v = 0; v < NV - 1; ++v) acc[r][v] = _mm256_fmadd_ps(a, load8(b + 8 * v), acc[r][v]);
      acc[r][NV - 1] = _mm256_fmadd_ps(a, load8(b + 8 * (NV - 1), tail), acc[r][NV - 1]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 16
    for (int v = 0; v < NV - 1; ++v) _mm256_storeu_ps(y[r] + 8 * v, acc[r][v]);
    _mm256_maskstore_ps(y[r] + 8 * (NV - 1), tail, acc[r][NV - 1]);
  }
}

// Lane mask for the first `n` (< 8 counts as partial) of 8 floats.
NM_AVX2 inline __m256i lane_mask(int64_t n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n < 8 ? n : 8)),
                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// y[0, n) += a0 * b0[0, n) + ... + a3 * b3[0, n): four kept rows streamed at once, y in L1.
template <typename BT>
NM_AVX2 inline void stream4(float* y, const BT* b0, const BT* b1, const BT* b2, const BT* b3, float a0,
                            float a1, float a2, float a3, int64_t n) {
  const __m256 v0 = _mm256_set1_ps(a0), v1 = _mm256_set1_ps(a1), v2 = _mm256_set1_ps(a2),
               v3 = _mm256_set1_ps(a3);
  int64_t c = 0;
  for (; c + 16 <= n; c += 16) {
    __m256 p = _mm256_loadu_ps(y + c), q = _mm256_loadu_ps(y + c + 8);
    p = _mm256_fmadd_ps(v0, load8(b0 + c), p);
    q = _mm256_fmadd_ps(v0, load8(b0 + c + 8), q);
    p = _mm256_fmadd_ps(v1, load8(b1 + c), p);
    q = _mm256_fmadd_ps(v1, load8(b1 + c + 8), q);
    p = _mm256_fmadd_ps(v2, load8(b2 + c), p);
    q = _mm256_fmadd_ps(v2, load8(b2 + c + 8), q);
    p = _mm256_fmadd_ps(v3, load8(b3 + c), p);
    q = _mm256_fmadd_ps(v3, load8(b3 + c + 8), q);
    _mm256_storeu_ps(y + c, p);
    _mm256_storeu_ps(y + c + 8, q);
  }
  for (; c < n; c += 8) {
    const __m256i m = lane_mask(n - c);
    __m256 p = _mm256_maskload_ps(y + c, m);
    p = _mm256_fmadd_ps(v0, load8(b0 + c, m), p);
    p = _mm256_fmadd_ps(v1, load8(b1 + c, m), p);
    p = _mm256_fmadd_ps(v2, load8(b2 + c, m), p);
    p = _mm256_fmadd_ps(v3, load8(b3 + c, m), p);
    _mm256_maskstore_ps(y + c, m, p);
  }
}

// y[0, n) += a * b[0, n): one kept row.
template <typename BT>
NM_AVX2 inline void stream1(float* y, const BT* b, float a, int64_t n) {
  const __m256 v = _mm256_set1_ps(a);
  for (int64_t c = 0; c < n; c += 8) {
    const __m256i m = lane_mask(n - c);
    _mm256_maskstore_ps(y + c, m, _mm256_fmadd_ps(v, load8(b + c, m), _mm256_maskload_ps(y + c, m)));
  }
}

template <int R, int NV, typename BT>
NM_AVX2 inline void column_block(const GemmBlock& g, int64_t o, int64_t j0, int64_t j1, bool first, __m256i tail,
                                 const BT* bp, int64_t klo, int64_t ldb) {
  int64_t t = g.t0;
  for (; t + R <= g.t1; t += R) micro<R, NV>(g, t, o, j0, j1, first, tail, bp, klo, ldb);
  for (; t < g.t1; ++t) micro<1, NV>(g, t, o, j0, j1, first, tail, bp, klo, ldb);
}

// Packed copy of B[klo..khi, o..o+W) per thread (rows of B alias in the L1 sets; packed they fit).
constexpr int64_t kPackFloats = 16384;
thread_local float pack_buf[kPackFloats] __attribute__((aligned(32)));

template <int R, int NV, typename BT>
NM_AVX2 void run(const GemmBlock& g, const BT* B, int64_t jb) {
  constexpr int64_t W = 8 * NV;
  const __m256i full = _mm256_set1_epi32(-1);
  for (int64_t j0 = 0; j0 < g.kept || j0 == 0; j0 += jb) {
    const int64_t j1 = j0 + jb < g.kept ? j0 + jb : g.kept;
    const bool first = j0 == 0;
    int64_t klo = g.K, khi = -1;  // rows of B that the block's tokens read (indices ascend per row)
    for (int64_t t = g.t0; t < g.t1 && j1 > j0; ++t) {
      const int32_t* id = g.idx + t * g.kept;
      klo = id[j0] < klo ? id[j0] : klo;
      khi = id[j1 - 1] > khi ? id[j1 - 1] : khi;
    }
    const bool pack = khi >= klo && (khi - klo + 1) * W <= kPackFloats;
    int64_t o = g.o0;
    for (; o + W <= g.o1; o += W) {
      if (pack) {
        for (int64_t k = klo; k <= khi; ++k) {
          const BT* src = B + k * g.O + o;
          float* dst = pack_buf + (k - klo) * W;
#pragma GCC unroll 16
          for (int v = 0; v < NV; ++v) _mm256_store_ps(dst + 8 * v, load8(src + 8 * v));
        }
        column_block<R, NV>(g, o, j0, j1, first, full, static_cast<const float*>(pack_buf), klo, W);
      } else {
        column_block<R, NV>(g, o, j0, j1, first, full, B + o, 0, g.O);
      }
    }
    for (; o < g.o1; o += 8) {
      const __m256i tail = lane_mask(g.o1 - o);
      column_block<R, 1>(g, o, j0, j1, first, tail, B + o, 0, g.O);
    }
  }
}

template <typename BT>
NM_AVX2 void stream(const GemmBlock& g, const BT* Bfull, int64_t jb) {
  const int64_t n = g.o1 - g.o0;
  for (int64_t t = g.t0; t < g.t1; ++t)
    for (int64_t c = 0; c < n; ++c) g.Y[t * g.O + g.o0 + c] = 0.0f;
  const BT* B = Bfull + g.o0;
  const int64_t O = g.O;
  for (int64_t j0 = 0; j0 < g.kept; j0 += jb) {
    const int64_t j1 = j0 + jb < g.kept ? j0 + jb : g.kept;
    for (int64_t t = g.t0; t < g.t1; ++t) {
      const float* x = g.X + t * g.K;
      const int32_t* id = g.idx + t * g.kept;
      float* y = g.Y + t * O + g.o0;
      int64_t j = j0;
      for (; j + 4 <= j1; j += 4) {
        const int64_t k0 = id[j], k1 = id[j + 1], k2 = id[j + 2], k3 = id[j + 3];
        stream4(y, B + k0 * O, B + k1 * O, B + k2 * O, B + k3 * O, x[k0], x[k1], x[k2], x[k3], n);
      }
      for (; j < j1; ++j) stream1(y, B + id[j] * O, x[id[j]], n);
    }
  }
}

}  // namespace

NM_AVX2 void sparse_gemm_stream_avx2(const GemmBlock& g, int64_t jb) {
  if (g.Bh)
    stream(g, g.Bh, jb);
  else
    stream(g, g.B, jb);
}

NM_AVX2 void sparse_gemm_block_avx2(const GemmBlock& g) {
  // 3 tokens x 32 columns = 12 ymm accumulators; 64 kept indices per block (packed B: 16 KiB at 50%).
  if (g.Bh)
    run<3, 4>(g, g.Bh, 64);
  else
    run<3, 4>(g, g.B, 64);
}

}  // namespace detail
}  // namespace nm_onnx

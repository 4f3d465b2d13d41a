// AVX-512 kernels of the sparse GEMM over kept rows (see sparse_gemm_internal.h).
//
// Prefill (many tokens): register-blocked "sparse outer product". A tile of R tokens x NV vectors of 16
// columns of Y stays in zmm registers while the kept rows of each token stream through; each kept row
// costs one broadcast of x and NV fused multiply-adds with a contiguous piece of a row of B. Kept
// indices are walked in blocks of JB; the B rows such a block touches (for all tokens of the task)
// are first copied into a small contiguous per-thread buffer, so they stay in L1 while every token
// tile uses them (B's own rows are O floats apart and alias in the L1 sets).
// Decode (few tokens): stream4/stream1, see sparse_gemm_stream_avx512.
// B is float32 or float16 (converted to float32 as it is loaded, or when a block is packed).
// Compiled with a function target attribute: only called after a runtime AVX-512 F/BW/VL check.
// GCC 12's AVX-512 headers trip -W(maybe-)uninitialized on _mm512_undefined_* (GCC bug 105593, a false positive).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop

#include "sparse_gemm_internal.h"

#define NM_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl")))

namespace nm_onnx {
namespace detail {
namespace {

// 16 consecutive elements of a row of B as float32 (all, or the lanes of m; the others 0).
NM_AVX512 inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
NM_AVX512 inline __m512 load16(const uint16_t* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
NM_AVX512 inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
NM_AVX512 inline __m512 load16(const uint16_t* p, __mmask16 m) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p));
}

// Y[t..t+R, o..o+16*NV) (+)= sum_{j in [j0, j1)} X[t, idx[t, j]] * B[idx[t, j], o..]; the last
// vector is masked with `tail` so odd widths need no scalar loop.
// Row k of B's column block is at bp + (k - klo) * ldb: B itself (klo = 0, ldb = O) or a packed copy.
template <int R, int NV, typename BT>
NM_AVX512 inline void micro(const GemmBlock& g, int64_t t, int64_t o, int64_t j0, int64_t j1, bool first,
                            __mmask16 tail, const BT* bp, int64_t klo, int64_t ldb) {
  __m512 acc[R][NV];
  float* y[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    y[r] = g.Y + (t + r) * g.O + o;
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) {
      const __mmask16 m = v == NV - 1 ? tail : __mmask16(0xFFFF);
      acc[r][v] = first ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(m, y[r] + 16 * v);
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
      const __m512 a = _mm512_set1_ps(x[r][k]);
      const BT* b = bp + (k - klo) * ldb;
#pragma GCC unroll 16
      for (int v = 0; v < NV; ++v) {
        const __mmask16 m = v == NV - 1 ? tail : __mmask16(0xFFFF);
        acc[r][v] = _mm512_fmadd_ps(a, load16(b + 16 * v, m), acc[r][v]);
      }
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) {
      const __mmask16 m = v == NV - 1 ? tail : __mmask16(0xFFFF);
      _mm512_mask_storeu_ps(y[r] + 16 * v, m, acc[r][v]);
    }
  }
}

// The packed full-width case of micro: row k of the block at base + k * W (compile-time stride, no
// masks, fewer address operations: the kernel is bound by loads, ~1 per FMA plus the index and x).
template <int R, int NV>
NM_AVX512 inline void micro_packed(const GemmBlock& g, int64_t t, int64_t o, int64_t j0, int64_t j1, bool first,
                                   uintptr_t base) {
  constexpr int64_t W = 16 * NV;
  __m512 acc[R][NV];
  float* y[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    y[r] = g.Y + (t + r) * g.O + o;
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) acc[r][v] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(y[r] + 16 * v);
  }
  const float* x = g.X + t * g.K;
  const int32_t* id = g.idx + t * g.kept;
  const int64_t K = g.K, kept = g.kept;
  for (int64_t j = j0; j < j1; ++j) {
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const int64_t k = id[r * kept + j];
      const __m512 a = _mm512_set1_ps(x[r * K + k]);
      const float* b = reinterpret_cast<const float*>(base + static_cast<uintptr_t>(k * W * 4));
#pragma GCC unroll 16
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_fmadd_ps(a, _mm512_load_ps(b + 16 * v), acc[r][v]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(y[r] + 16 * v, acc[r][v]);
  }
}

// One column block [o, o + width) over tokens [t0, t1): token tiles of R, then 1..R-1 leftovers.
template <int R, int NV, typename BT>
NM_AVX512 inline void column_block(const GemmBlock& g, int64_t o, int64_t j0, int64_t j1, bool first,
                                   __mmask16 tail, const BT* bp, int64_t klo, int64_t ldb) {
  int64_t t = g.t0;
  for (; t + R <= g.t1; t += R) micro<R, NV>(g, t, o, j0, j1, first, tail, bp, klo, ldb);
  for (; t < g.t1; ++t) micro<1, NV>(g, t, o, j0, j1, first, tail, bp, klo, ldb);
}

// Packed copy of B[klo..khi, o..o+W) per thread: rows of B are O floats apart, often a multiple of
// 4 KiB, so a column block of them maps to few L1 sets; contiguous, they all fit.
constexpr int64_t kPackFloats = 32768;
thread_local float pack_buf[kPackFloats] __attribute__((aligned(64)));

// Kept-index blocks of jb; in each, full-width column blocks of 16*NV (B packed when the rows the
// block's tokens touch fit the buffer), then the remainder one (possibly partial) vector at a time.
template <int R, int NV, typename BT>
NM_AVX512 void run(const GemmBlock& g, const BT* B, int64_t jb) {
  constexpr int64_t W = 16 * NV;
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
          for (int v = 0; v < NV; ++v) _mm512_store_ps(dst + 16 * v, load16(src + 16 * v));
        }
        // address arithmetic in integers: base itself lies before the buffer (k >= klo)
        const uintptr_t base = reinterpret_cast<uintptr_t>(pack_buf) - static_cast<uintptr_t>(klo * W * 4);
        int64_t t = g.t0;
        for (; t + R <= g.t1; t += R) micro_packed<R, NV>(g, t, o, j0, j1, first, base);
        for (; t < g.t1; ++t) micro_packed<1, NV>(g, t, o, j0, j1, first, base);
      } else {
        column_block<R, NV>(g, o, j0, j1, first, 0xFFFF, B + o, 0, g.O);
      }
    }
    for (; o < g.o1; o += 16) {
      const int64_t rem = g.o1 - o;
      const __mmask16 tail = rem >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << rem) - 1u);
      column_block<R, 1>(g, o, j0, j1, first, tail, B + o, 0, g.O);
    }
  }
}

// y[0, n) += a0 * b0[0, n) + a1 * b1[0, n) + a2 * b2[0, n) + a3 * b3[0, n): four kept rows of B
// streamed at once (long contiguous runs for the hardware prefetcher), y stays in L1.
template <typename BT>
NM_AVX512 inline void stream4(float* y, const BT* b0, const BT* b1, const BT* b2, const BT* b3, float a0,
                              float a1, float a2, float a3, int64_t n) {
  const __m512 v0 = _mm512_set1_ps(a0), v1 = _mm512_set1_ps(a1), v2 = _mm512_set1_ps(a2),
               v3 = _mm512_set1_ps(a3);
  int64_t c = 0;
  for (; c + 32 <= n; c += 32) {
    __m512 p = _mm512_loadu_ps(y + c), q = _mm512_loadu_ps(y + c + 16);
    p = _mm512_fmadd_ps(v0, load16(b0 + c), p);
    q = _mm512_fmadd_ps(v0, load16(b0 + c + 16), q);
    p = _mm512_fmadd_ps(v1, load16(b1 + c), p);
    q = _mm512_fmadd_ps(v1, load16(b1 + c + 16), q);
    p = _mm512_fmadd_ps(v2, load16(b2 + c), p);
    q = _mm512_fmadd_ps(v2, load16(b2 + c + 16), q);
    p = _mm512_fmadd_ps(v3, load16(b3 + c), p);
    q = _mm512_fmadd_ps(v3, load16(b3 + c + 16), q);
    _mm512_storeu_ps(y + c, p);
    _mm512_storeu_ps(y + c + 16, q);
  }
  for (; c < n; c += 16) {
    const __mmask16 m = n - c >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - c)) - 1u);
    __m512 p = _mm512_maskz_loadu_ps(m, y + c);
    p = _mm512_fmadd_ps(v0, load16(b0 + c, m), p);
    p = _mm512_fmadd_ps(v1, load16(b1 + c, m), p);
    p = _mm512_fmadd_ps(v2, load16(b2 + c, m), p);
    p = _mm512_fmadd_ps(v3, load16(b3 + c, m), p);
    _mm512_mask_storeu_ps(y + c, m, p);
  }
}

// y[0, n) += a * b[0, n): one kept row (the last 1..3 of a token's block).
template <typename BT>
NM_AVX512 inline void stream1(float* y, const BT* b, float a, int64_t n) {
  const __m512 v = _mm512_set1_ps(a);
  for (int64_t c = 0; c < n; c += 16) {
    const __mmask16 m = n - c >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - c)) - 1u);
    _mm512_mask_storeu_ps(y + c, m, _mm512_fmadd_ps(v, load16(b + c, m), _mm512_maskz_loadu_ps(m, y + c)));
  }
}

template <typename BT>
NM_AVX512 void stream(const GemmBlock& g, const BT* Bfull, int64_t jb) {
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

NM_AVX512 void sparse_gemm_stream_avx512(const GemmBlock& g, int64_t jb) {
  if (g.Bh)
    stream(g, g.Bh, jb);
  else
    stream(g, g.B, jb);
}

NM_AVX512 void sparse_gemm_block_avx512(const GemmBlock& g) {
  // 6 tokens x 64 columns = 24 zmm accumulators; 64 kept indices per block (about 128 rows of B at
  // 50%, 32 KiB packed). Tuned on Zen 4/5 (T = 512, Llama-7B MLP shapes): see benchmarks/RESULTS.md.
  if (g.Bh)
    run<6, 4>(g, g.Bh, 64);
  else
    run<6, 4>(g, g.B, 64);
}

}  // namespace detail
}  // namespace nm_onnx

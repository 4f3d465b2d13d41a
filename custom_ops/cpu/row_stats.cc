// Per-row statistics of the CPU kernels (see row_stats.h): lower median, mean, variance factor,
// kept-index lists. Each hot loop exists as portable C++ compiled for baseline x86-64 and AVX2
// (function target attributes) plus an AVX-512 version, picked by cpu_isa() (NM_ONNX_ISA caps it).
#include "row_stats.h"

#include <cmath>
#include <limits>

#include "isa.h"

#if defined(__x86_64__) || defined(__i386__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop
#define NM_STATS_X86 1
#endif

namespace nm_onnx {
namespace {

// ---- Lower median: the key of rank r = (K - 1) / 2 in ascending order of score_key (an order-
// preserving map of float to uint32: -0 -> +0, NaN -> 0xFFFFFFFF). Bisection over the 32 key bits:
// with lo the largest key known to have at most r smaller elements, test mid = lo + 2^b by counting
// the candidates below it; the count decides the half. The candidates are compacted into the
// interval [lo, hi) whenever that drops at least a quarter of them, so the passes shrink quickly.
// Exact (the answer is the key of a row element), O(32 K) worst case, no data-dependent branches
// inside the passes.

// Fills keys[0, K) and says whether the row holds a NaN.
#define NM_KEYS_BODY                                        \
  uint32_t nan = 0;                                         \
  for (int64_t j = 0; j < K; ++j) {                         \
    const uint32_t k = score_key(x[j]);                     \
    keys[j] = k;                                            \
    nan |= k == 0xFFFFFFFFu;                                \
  }                                                         \
  return nan != 0;

// Candidates below mid (portable).
#define NM_COUNT_BODY                                 \
  int64_t c = 0;                                      \
  for (int64_t i = 0; i < n; ++i) c += keys[i] < mid; \
  return c;

// Keeps the candidates in [lo, hi) (hi may be 2^32), in place; returns how many (portable).
#define NM_COMPACT_BODY                                                    \
  int64_t w = 0;                                                           \
  for (int64_t i = 0; i < n; ++i) {                                        \
    const uint32_t s = keys[i];                                            \
    keys[w] = s;                                                           \
    w += static_cast<int64_t>((s >= lo) & (static_cast<uint64_t>(s) < hi)); \
  }                                                                        \
  return w;

struct MedianOps {
  bool (*keys)(const float* x, int64_t K, uint32_t* keys);
  int64_t (*count_below)(const uint32_t* keys, int64_t n, uint32_t mid);
  int64_t (*compact)(uint32_t* keys, int64_t n, uint32_t lo, uint64_t hi);
};

bool keys_base(const float* x, int64_t K, uint32_t* keys) { NM_KEYS_BODY }
int64_t count_base(const uint32_t* keys, int64_t n, uint32_t mid) { NM_COUNT_BODY }
int64_t compact_base(uint32_t* keys, int64_t n, uint32_t lo, uint64_t hi) { NM_COMPACT_BODY }

#ifdef NM_STATS_X86
#define NM_AVX2 __attribute__((target("avx2")))
#define NM_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,popcnt")))
NM_AVX2 bool keys_avx2(const float* x, int64_t K, uint32_t* keys) { NM_KEYS_BODY }
NM_AVX2 int64_t count_avx2(const uint32_t* keys, int64_t n, uint32_t mid) { NM_COUNT_BODY }
NM_AVX2 int64_t compact_avx2(uint32_t* keys, int64_t n, uint32_t lo, uint64_t hi) { NM_COMPACT_BODY }

NM_AVX512 inline __mmask16 tail_mask(int64_t left) {
  return left >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << left) - 1u);
}

// score_key on 16 lanes: -0 -> +0, negative: all bits flipped, else the sign bit set; NaN -> ~0.
NM_AVX512 bool keys_avx512(const float* x, int64_t K, uint32_t* keys) {
  __mmask16 nan = 0;
  for (int64_t j = 0; j < K; j += 16) {
    const __mmask16 t = tail_mask(K - j);
    const __m512 v = _mm512_add_ps(_mm512_maskz_loadu_ps(t, x + j), _mm512_setzero_ps());
    const __m512i b = _mm512_castps_si512(v);
    const __m512i k = _mm512_xor_si512(b, _mm512_or_si512(_mm512_srai_epi32(b, 31), _mm512_set1_epi32(INT32_MIN)));
    nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    _mm512_mask_storeu_epi32(keys + j, t, k);
  }
  return nan != 0;
}

NM_AVX512 int64_t count_avx512(const uint32_t* keys, int64_t n, uint32_t mid) {
  const __m512i m = _mm512_set1_epi32(static_cast<int>(mid));
  int64_t c = 0, i = 0;
  for (; i + 16 <= n; i += 16) c += _mm_popcnt_u32(_mm512_cmplt_epu32_mask(_mm512_loadu_si512(keys + i), m));
  if (i < n) {
    const __mmask16 t = tail_mask(n - i);
    c += _mm_popcnt_u32(_mm512_mask_cmplt_epu32_mask(t, _mm512_maskz_loadu_epi32(t, keys + i), m));
  }
  return c;
}

// In-place compress: the store at w <= i covers [w, w + 16) within the 16 already-loaded lanes or
// below, so it never clobbers an unread key (the buffer has 16 keys of slack at the end).
NM_AVX512 int64_t compact_avx512(uint32_t* keys, int64_t n, uint32_t lo, uint64_t hi) {
  const __m512i vlo = _mm512_set1_epi32(static_cast<int>(lo));
  const __m512i vlast = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(hi - 1)));  // hi > lo
  int64_t w = 0;
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 t = tail_mask(n - i);
    const __m512i s = _mm512_maskz_loadu_epi32(t, keys + i);
    const __mmask16 in = _mm512_mask_cmple_epu32_mask(_mm512_mask_cmpge_epu32_mask(t, s, vlo), s, vlast);
    _mm512_storeu_si512(keys + w, _mm512_maskz_compress_epi32(in, s));
    w += _mm_popcnt_u32(in);
  }
  return w;
}
#endif

// The variant of name##_avx512 / _avx2 / _base this CPU runs (only _base off x86).
#ifdef NM_STATS_X86
#define NM_BY_ISA(name) by_isa(name##_avx512, name##_avx2, name##_base)
#else
#define NM_BY_ISA(name) name##_base
#endif

const MedianOps& median_ops() {
  static const MedianOps ops{NM_BY_ISA(keys), NM_BY_ISA(count), NM_BY_ISA(compact)};
  return ops;
}

// ---- Variances: float64, two passes (mean, then squared deviations), 8 independent accumulators
// per quantity combined in a fixed order (vectorises; the result does not depend on threads).
constexpr int kLanes = 8;

inline double combine(const double* a) {
  return ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
}

// xs[j] where kept, +0 elsewhere (a bit mask, so the loops vectorise).
inline float kept_value(const float* xs, const uint8_t* keep, int64_t j) {
  return bit_cast<float>(bit_cast<uint32_t>(xs[j]) & (0u - static_cast<uint32_t>(keep[j] != 0)));
}

#define NM_VARIANCE_BODY                                                              \
  double sx[kLanes] = {}, sh[kLanes] = {};                                            \
  int64_t j = 0;                                                                      \
  for (; j + kLanes <= K; j += kLanes)                                                \
    for (int l = 0; l < kLanes; ++l) {                                                \
      sx[l] += static_cast<double>(x[j + l]);                                         \
      sh[l] += static_cast<double>(kept_value(xs, keep, j + l));                   \
    }                                                                                 \
  for (int l = 0; j < K; ++j, ++l) {                                                  \
    sx[l] += static_cast<double>(x[j]);                                               \
    sh[l] += static_cast<double>(kept_value(xs, keep, j));                             \
  }                                                                                   \
  const double mx = combine(sx) / static_cast<double>(K), mh = combine(sh) / static_cast<double>(K); \
  double qx[kLanes] = {}, qh[kLanes] = {};                                            \
  for (j = 0; j + kLanes <= K; j += kLanes)                                           \
    for (int l = 0; l < kLanes; ++l) {                                                \
      const double dx = static_cast<double>(x[j + l]) - mx;                           \
      const double dh = static_cast<double>(kept_value(xs, keep, j + l)) - mh;     \
      qx[l] += dx * dx;                                                               \
      qh[l] += dh * dh;                                                               \
    }                                                                                 \
  for (int l = 0; j < K; ++j, ++l) {                                                  \
    const double dx = static_cast<double>(x[j]) - mx;                                 \
    const double dh = static_cast<double>(kept_value(xs, keep, j)) - mh;               \
    qx[l] += dx * dx;                                                                 \
    qh[l] += dh * dh;                                                                 \
  }                                                                                   \
  const double d = static_cast<double>(K - 1);                                        \
  return variance_scale(combine(qx) / d, combine(qh) / d, K);

using VarianceFn = float (*)(const float*, const float*, const uint8_t*, int64_t);
float variance_base(const float* x, const float* xs, const uint8_t* keep, int64_t K) { NM_VARIANCE_BODY }
#ifdef NM_STATS_X86
NM_AVX2 float variance_avx2(const float* x, const float* xs, const uint8_t* keep, int64_t K) { NM_VARIANCE_BODY }
// The same sums as NM_VARIANCE_BODY (lane l of the 8-double accumulators takes elements j = l mod 8
// in order; the zero padding of a tail adds +0): one summation order on every variant.
NM_AVX512 float variance_avx512(const float* x, const float* xs, const uint8_t* keep, int64_t K) {
  __m512d sx = _mm512_setzero_pd(), sh = _mm512_setzero_pd();
  for (int64_t j = 0; j < K; j += 8) {
    const __mmask8 t = static_cast<__mmask8>(tail_mask(K - j));
    const __mmask8 k = _mm_mask_test_epi8_mask(t, _mm_maskz_loadu_epi8(t, keep + j), _mm_set1_epi8(-1));
    sx = _mm512_add_pd(sx, _mm512_cvtps_pd(_mm256_maskz_loadu_ps(t, x + j)));
    sh = _mm512_add_pd(sh, _mm512_cvtps_pd(_mm256_maskz_loadu_ps(k, xs + j)));
  }
  alignas(64) double a[kLanes];
  _mm512_store_pd(a, sx);
  const double mx = combine(a) / static_cast<double>(K);
  _mm512_store_pd(a, sh);
  const double mh = combine(a) / static_cast<double>(K);
  const __m512d vmx = _mm512_set1_pd(mx), vmh = _mm512_set1_pd(mh);
  __m512d qx = _mm512_setzero_pd(), qh = _mm512_setzero_pd();
  for (int64_t j = 0; j < K; j += 8) {
    const __mmask8 t = static_cast<__mmask8>(tail_mask(K - j));
    const __mmask8 k = _mm_mask_test_epi8_mask(t, _mm_maskz_loadu_epi8(t, keep + j), _mm_set1_epi8(-1));
    const __m512d dx = _mm512_maskz_sub_pd(t, _mm512_cvtps_pd(_mm256_maskz_loadu_ps(t, x + j)), vmx);
    const __m512d dh = _mm512_maskz_sub_pd(t, _mm512_cvtps_pd(_mm256_maskz_loadu_ps(k, xs + j)), vmh);
    qx = _mm512_add_pd(qx, _mm512_mul_pd(dx, dx));
    qh = _mm512_add_pd(qh, _mm512_mul_pd(dh, dh));
  }
  _mm512_store_pd(a, qx);
  const double vx = combine(a);
  _mm512_store_pd(a, qh);
  const double vh = combine(a);
  const double d = static_cast<double>(K - 1);
  return variance_scale(vx / d, vh / d, K);
}
#endif

// ---- Kept indices: branch-free append (portable), 16-lane compress (AVX-512). Both write past the
// last kept index (out needs K + 16 entries of room).
using KeptFn = int64_t (*)(const uint8_t*, int64_t, int32_t*);
#define NM_KEPT_BODY                  \
  int64_t c = 0;                      \
  for (int64_t j = 0; j < K; ++j) {   \
    out[c] = static_cast<int32_t>(j); \
    c += keep[j] != 0;                \
  }                                   \
  return c;
int64_t kept_base(const uint8_t* keep, int64_t K, int32_t* out) { NM_KEPT_BODY }
#ifdef NM_STATS_X86
NM_AVX2 int64_t kept_avx2(const uint8_t* keep, int64_t K, int32_t* out) { NM_KEPT_BODY }
NM_AVX512 int64_t kept_avx512(const uint8_t* keep, int64_t K, int32_t* out) {
  const __m512i step = _mm512_set1_epi32(16);
  __m512i ids = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  int64_t c = 0;
  for (int64_t j = 0; j < K; j += 16) {
    const __mmask16 t = tail_mask(K - j);
    const __mmask16 k = _mm_mask_test_epi8_mask(t, _mm_maskz_loadu_epi8(t, keep + j), _mm_set1_epi8(-1));
    _mm512_storeu_si512(out + c, _mm512_maskz_compress_epi32(k, ids));
    c += _mm_popcnt_u32(k);
    ids = _mm512_add_epi32(ids, step);
  }
  return c;
}
#endif

}  // namespace

float lower_median(const float* x, int64_t K, std::vector<uint32_t>& scratch) {
  const MedianOps& ops = median_ops();
  scratch.resize(static_cast<size_t>(K + 16));
  uint32_t* keys = scratch.data();
  if (ops.keys(x, K, keys)) return std::numeric_limits<float>::quiet_NaN();
  const int64_t r = lower_median_rank(K);
  int64_t base = 0;           // elements known to lie below lo and dropped from the candidates
  int64_t n = K;              // candidates keys[0, n): a superset of the row's elements in [lo, hi)
  int64_t below_lo = 0;       // candidates below lo
  int64_t below_hi = K;       // candidates below hi
  uint32_t lo = 0;
  uint64_t hi = uint64_t{1} << 32;
  for (int b = 31; b >= 0; --b) {
    const uint32_t mid = lo + (1u << b);
    const int64_t c = ops.count_below(keys, n, mid);
    if (base + c > r) {
      hi = mid;
      below_hi = c;
    } else {
      lo = mid;
      below_lo = c;
    }
    const int64_t inside = below_hi - below_lo;
    if (4 * inside <= 3 * n) {
      n = ops.compact(keys, n, lo, hi);
      base += below_lo;
      below_lo = 0;
      below_hi = n;
      if (n == 1) return canonical_shift(key_score(keys[0]));
    }
  }
  return canonical_shift(key_score(lo));
}

float row_shift(const float* x, int64_t K, Shift mode, std::vector<uint32_t>& scratch) {
  if (mode == Shift::kNone || K == 0) return 0.0f;
  if (mode == Shift::kMean) {
    double sum = 0.0;
    for (int64_t j = 0; j < K; ++j) sum += static_cast<double>(x[j]);
    return mean_shift(sum, K);
  }
  return lower_median(x, K, scratch);
}

float variance_factor(const float* x, const float* xs, const uint8_t* keep, int64_t K) {
  if (K < 2) return 1.0f;
  static const VarianceFn fn = NM_BY_ISA(variance);
  return fn(x, xs, keep, K);
}

int64_t kept_indices(const uint8_t* keep, int64_t K, int32_t* out) {
  static const KeptFn fn = NM_BY_ISA(kept);
  return fn(keep, K, out);
}

}  // namespace nm_onnx

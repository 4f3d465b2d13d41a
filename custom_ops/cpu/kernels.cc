// CPU row kernels of the nm_onnx ops (see kernels.h); selection and shift rules come from nm_select.h.
#include "kernels.h"

#include <algorithm>
#include <cmath>
#include <utility>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
// GCC 12's AVX-512 headers trip -W(maybe-)uninitialized on _mm512_undefined_* (GCC bug 105593, a false positive).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop
#endif

#include "isa.h"
#include "nm_select.h"
#include "row_stats.h"

namespace nm_onnx {
namespace {

// keys of one group: score_key(|x| * scale * colnorm), in the exact operation order of the reference.
inline void group_keys(const float* x, int m, const float* scale, const float* colnorm, uint32_t* keys) {
  for (int j = 0; j < m; ++j) {
    float s = std::fabs(x[j]);
    if (scale) s = s * scale[j];
    if (colnorm) s = s * colnorm[j];
    keys[j] = score_key(s);
  }
}

// keep flags of one group; M is a compile-time constant for the common sizes (vectorised loops).
template <int M>
inline void group_keep_fixed(const uint32_t* keys, int n, uint8_t* keep) {
  for (int j = 0; j < M; ++j) {
    const uint32_t kj = keys[j];
    int r = 0;
    for (int i = 0; i < M; ++i) r += (keys[i] > kj) | ((keys[i] == kj) & (i < j));
    keep[j] = r < n;
  }
}

inline void group_keep_any(const uint32_t* keys, int m, int n, uint8_t* keep) {
  switch (m) {
    case 2: group_keep_fixed<2>(keys, n, keep); break;
    case 4: group_keep_fixed<4>(keys, n, keep); break;
    case 8: group_keep_fixed<8>(keys, n, keep); break;
    case 16: group_keep_fixed<16>(keys, n, keep); break;
    case 32: group_keep_fixed<32>(keys, n, keep); break;
    case 64: group_keep_fixed<64>(keys, n, keep); break;
    default: group_keep(keys, m, n, keep); break;
  }
}

// keep flags of one large group (m > kMaxM, e.g. unstructured top-k with m = K): selection, O(m).
inline void group_keep_large(const uint32_t* keys, int m, int n, uint8_t* keep, std::vector<int32_t>& order) {
  order.resize(static_cast<size_t>(m));
  for (int j = 0; j < m; ++j) order[j] = j;
  if (n > 0 && n < m)
    std::nth_element(order.begin(), order.begin() + (n - 1), order.end(), [keys](int32_t a, int32_t b) {
      return ranks_before(keys[a], a, keys[b], b);
    });
  std::fill(keep, keep + m, uint8_t{0});
  for (int j = 0; j < n; ++j) keep[order[j]] = 1;
}

// Scratch of one worker for row_keep.
struct RowScratch {
  std::vector<uint32_t> keys;
  std::vector<int32_t> order;
};

// keep flags of one row.
inline void row_keep(const float* x, int64_t K, int n, int m, const float* scale, const float* colnorm,
                     uint8_t* keep, RowScratch& sc) {
  uint32_t small[kMaxM];
  if (m > kMaxM) sc.keys.resize(static_cast<size_t>(m));
  uint32_t* keys = m > kMaxM ? sc.keys.data() : small;
  for (int64_t g = 0; g < K; g += m) {
    group_keys(x + g, m, scale ? scale + g : nullptr, colnorm ? colnorm + g : nullptr, keys);
    if (m > kMaxM)
      group_keep_large(keys, m, n, keep + g, sc.order);
    else
      group_keep_any(keys, m, n, keep + g);
  }
}

}  // namespace

void row_shifts(const float* x, int64_t T, int64_t K, Shift mode, float* eta, const ParallelFor& pf) {
  pf(T, [&](std::ptrdiff_t t0, std::ptrdiff_t t1) {
    std::vector<uint32_t> scratch;
    for (std::ptrdiff_t t = t0; t < t1; ++t) eta[t] = row_shift(x + t * K, K, mode, scratch);
  });
}

void column_norms(const float* x, int64_t T, int64_t K, float* colnorm, const ParallelFor& pf) {
  pf(K, [&](std::ptrdiff_t j0, std::ptrdiff_t j1) {
    for (std::ptrdiff_t j = j0; j < j1; ++j) {
      double acc = 0.0;
      for (int64_t t = 0; t < T; ++t) {
        const double v = x[t * K + j];
        acc += v * v;
      }
      colnorm[j] = static_cast<float>(std::sqrt(acc));
    }
  });
}

// ---- NMMask fast path for M in {2, 4, ..., 64}: keys of a row stored transposed ([M][G]) so that the
// pairwise ranking runs over contiguous group vectors; compiled for AVX-512, AVX2 and baseline and
// chosen at run time. Same keys and the same rank definition as group_keep (bit-identical masks).
namespace {

struct MaskScratch {
  std::vector<uint32_t> keys, ranks;
};

// Batcher's odd-even merge sort network on M keys, as compare-exchange pairs (the AVX2 threshold select
// below; the compiler drops the comparators its one output, the N-th largest key, does not depend on).
template <int M>
struct SortNet {
  int a[M * M], b[M * M], count;  // compare-exchange (a[i], b[i]): the smaller to a[i]; ascending
};

template <int M>
constexpr SortNet<M> odd_even_merge_sort() {
  SortNet<M> s{};
  for (int p = 1; p < M; p <<= 1)
    for (int k = p; k >= 1; k >>= 1)
      for (int j = k % p; j + k < M; j += 2 * k)
        for (int i = 0; i < std::min(k, M - j - k); ++i)
          if ((i + j) / (2 * p) == (i + j + k) / (2 * p)) {
            s.a[s.count] = i + j;
            s.b[s.count] = i + j + k;
            ++s.count;
          }
  return s;
}

typedef uint32_t v8u __attribute__((vector_size(32)));

template <int M>
__attribute__((always_inline)) inline void mask_rows_fixed(const float* x, std::ptrdiff_t t0, std::ptrdiff_t t1,
                                                           int64_t K, int n, const float* scale, const float* colnorm,
                                                           float* y, uint8_t* keep_out, MaskScratch& sc) {
  const int64_t G = K / M;
  sc.keys.resize(static_cast<size_t>(2 * K));
  sc.ranks.resize(static_cast<size_t>(K));
  uint32_t* __restrict kn = sc.keys.data();      // keys, natural layout [G][M] (vectorised)
  uint32_t* __restrict kt = sc.keys.data() + K;  // keys, transposed [M][G]
  uint32_t* __restrict rt = sc.ranks.data();
  for (std::ptrdiff_t t = t0; t < t1; ++t) {
    const float* __restrict xr = x + t * K;
    if (scale || colnorm) {
      for (int64_t e = 0; e < K; ++e) {
        float s = std::fabs(xr[e]);
        if (scale) s = s * scale[e];
        if (colnorm) s = s * colnorm[e];
        kn[e] = score_key(s);
      }
    } else {
      for (int64_t e = 0; e < K; ++e) kn[e] = score_key(std::fabs(xr[e]));
    }
    for (int64_t g = 0; g < G; ++g)
      for (int j = 0; j < M; ++j) kt[j * G + g] = kn[g * M + j];
    for (int64_t i = 0; i < K; ++i) rt[i] = 0;
    for (int i = 0; i < M; ++i)
      for (int j = i + 1; j < M; ++j) {
        const uint32_t* __restrict ki = kt + i * G;
        const uint32_t* __restrict kj = kt + j * G;
        uint32_t* __restrict ri = rt + i * G;
        uint32_t* __restrict rj = rt + j * G;
        for (int64_t g = 0; g < G; ++g) {
          const uint32_t c = ki[g] >= kj[g];  // i beats j (ties: the lower index i wins)
          rj[g] += c;
          ri[g] += 1u - c;
        }
      }
    if (y) {  // branch-free masked copy of the bits (a data-dependent branch mispredicts ~50%)
      using bits_t = uint32_t __attribute__((may_alias));  // float storage read and written as bits
      bits_t* __restrict yr = reinterpret_cast<bits_t*>(y + t * K);
      const bits_t* __restrict xb = reinterpret_cast<const bits_t*>(xr);
      for (int64_t g = 0; g < G; ++g)
        for (int j = 0; j < M; ++j)
          yr[g * M + j] = xb[g * M + j] & (0u - static_cast<uint32_t>(rt[j * G + g] < static_cast<uint32_t>(n)));
    } else {
      uint8_t* __restrict kr = keep_out + t * K;
      for (int64_t g = 0; g < G; ++g)
        for (int j = 0; j < M; ++j) kr[g * M + j] = rt[j * G + g] < static_cast<uint32_t>(n);
    }
  }
}

// ---- In-register path (AVX-512 only) for M in {2, 4, 8, 16} (groups inside one 16-lane vector, K % 16 == 0): for each
// offset d = 1..M-1 the lane of partner q = (j + d) mod M is brought in with a lane permute; the entry's
// rank counts partners with a larger key, or an equal key at a lower index (q < j <=> j + d >= M).
// Used for n = 0, n = M and as the exact fallback of the threshold path below (ties at the threshold).
typedef uint32_t v16u __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));
typedef float v16f __attribute__((vector_size(64)));
typedef uint8_t v16b __attribute__((vector_size(16)));

// Output of 16 lanes: the masked bits of x (y) or 0/1 keep flags (keep).
__attribute__((always_inline)) inline void lane_store(v16u xb, v16i kept, float* y, uint8_t* keep) {
  if (y) {
    const v16u out = xb & reinterpret_cast<v16u>(kept);
    __builtin_memcpy(y, &out, 64);
  } else {
    const v16b flags = __builtin_convertvector(kept, v16b) & 1;
    __builtin_memcpy(keep, &flags, 16);
  }
}

// Keys of 16 consecutive elements (the vector form of score_key(|x| * scale * colnorm)).
__attribute__((always_inline)) inline void lane_keys(const float* xr, const float* scale, const float* colnorm,
                                                     int64_t e, v16u* key, v16u* bits) {
  v16u xb;
  __builtin_memcpy(&xb, xr + e, 64);
  *bits = xb;
  v16f s = reinterpret_cast<v16f>(xb & 0x7FFFFFFFu);
  if (scale) {
    v16f f;
    __builtin_memcpy(&f, scale + e, 64);
    s = s * f;
  }
  if (colnorm) {
    v16f f;
    __builtin_memcpy(&f, colnorm + e, 64);
    s = s * f;
  }
  s = s + 0.0f;
  const v16u b = reinterpret_cast<v16u>(s);
  const v16u k = b ^ (reinterpret_cast<v16u>(reinterpret_cast<v16i>(b) >> 31) | 0x80000000u);
  *key = k | reinterpret_cast<v16u>(s != s);  // NaN -> largest key
}

template <int M>
struct LanePerms {
  v16u perm[M];
  v16i lower[M];
  LanePerms() {
    for (int d = 0; d < M; ++d)
      for (int l = 0; l < 16; ++l) {
        const int j = l % M;
        perm[d][l] = static_cast<uint32_t>(l - j + (j + d) % M);
        lower[d][l] = j + d >= M ? -1 : 0;
      }
  }
};

// Elements [e0, e1) of one row (multiples of 16); yr / kr: the row's output (one of them is null).
template <int M>
__attribute__((always_inline)) inline void lanes_range(const float* xr, int64_t e0, int64_t e1, int n,
                                                       const float* scale, const float* colnorm, float* yr,
                                                       uint8_t* kr) {
  static const LanePerms<M> lp;
  const v16i nv = v16i{} + n;
  for (int64_t e = e0; e < e1; e += 16) {
    v16u xb, k;
    lane_keys(xr, scale, colnorm, e, &k, &xb);
    v16i rank = v16i{};
    for (int d = 1; d < M; ++d) {
      const v16u p = __builtin_shuffle(k, lp.perm[d]);
      rank -= reinterpret_cast<v16i>(p > k) | (reinterpret_cast<v16i>(p == k) & lp.lower[d]);
    }
    lane_store(xb, rank < nv, yr ? yr + e : nullptr, yr ? nullptr : kr + e);
  }
}

// M = 32: a group is two vectors (lo, hi); partners come from a two-source lane permute.
struct LanePerms32 {
  v16u perm_lo[32], perm_hi[32];
  v16i lower_lo[32], lower_hi[32];
  LanePerms32() {
    for (int d = 0; d < 32; ++d)
      for (int l = 0; l < 16; ++l) {
        perm_lo[d][l] = static_cast<uint32_t>((l + d) % 32);
        perm_hi[d][l] = static_cast<uint32_t>((16 + l + d) % 32);
        lower_lo[d][l] = l + d >= 32 ? -1 : 0;
        lower_hi[d][l] = 16 + l + d >= 32 ? -1 : 0;
      }
  }
};

// Elements [e0, e1) of one row (multiples of 32).
__attribute__((always_inline)) inline void lanes_range32(const float* xr, int64_t e0, int64_t e1, int n,
                                                         const float* scale, const float* colnorm, float* yr,
                                                         uint8_t* kr) {
  static const LanePerms32 lp;
  const v16i nv = v16i{} + n;
  for (int64_t e = e0; e < e1; e += 32) {
    v16u blo, bhi, klo, khi;
    lane_keys(xr, scale, colnorm, e, &klo, &blo);
    lane_keys(xr, scale, colnorm, e + 16, &khi, &bhi);
    v16i rlo = v16i{}, rhi = v16i{};
    for (int d = 1; d < 32; ++d) {
      const v16u plo = __builtin_shuffle(klo, khi, lp.perm_lo[d]);
      const v16u phi = __builtin_shuffle(klo, khi, lp.perm_hi[d]);
      rlo -= reinterpret_cast<v16i>(plo > klo) | (reinterpret_cast<v16i>(plo == klo) & lp.lower_lo[d]);
      rhi -= reinterpret_cast<v16i>(phi > khi) | (reinterpret_cast<v16i>(phi == khi) & lp.lower_hi[d]);
    }
    lane_store(blo, rlo < nv, yr ? yr + e : nullptr, yr ? nullptr : kr + e);
    lane_store(bhi, rhi < nv, yr ? yr + e + 16 : nullptr, yr ? nullptr : kr + e + 16);
  }
}

// Pairwise ranking of elements [e0, e1) of one row (exact under the tie rule; O(M) vector ops per vector).
template <int M>
__attribute__((always_inline)) inline void pairwise_range(const float* xr, int64_t e0, int64_t e1, int n,
                                                          const float* scale, const float* colnorm, float* yr,
                                                          uint8_t* kr) {
  if constexpr (M == 32)
    lanes_range32(xr, e0, e1, n, scale, colnorm, yr, kr);
  else
    lanes_range<(M < 16 ? M : 16)>(xr, e0, e1, n, scale, colnorm, yr, kr);
}

template <int M>
__attribute__((always_inline)) inline void mask_rows_lanes(const float* x, std::ptrdiff_t t0, std::ptrdiff_t t1,
                                                           int64_t K, int n, const float* scale, const float* colnorm,
                                                           float* y, uint8_t* keep) {
  for (std::ptrdiff_t t = t0; t < t1; ++t)
    pairwise_range<M>(x + t * K, 0, K, n, scale, colnorm, y ? y + t * K : nullptr, y ? nullptr : keep + t * K);
}

// ---- Threshold path (AVX-512, M in {2, 4, 8, 16, 32}, 0 < n < M, K % 16 == 0): a block of M vectors holds 16
// groups. The block's keys are shuffled so that each lane holds one whole group across the M vectors
// (a partial 16x16 transpose, log2(min(M, 16)) shuffle stages), a Batcher odd-even sorting network over the M
// vectors (unsigned min/max; the compiler drops the comparators that reach neither output n - 1 nor n) gives
// every group's n-th largest key tau and (n+1)-th largest key in one vector each, tau is permuted back to the
// natural layout, and the kept entries are key >= tau. That is exactly the rank rule whenever the (n+1)-th key
// is below tau (exactly n keys >= tau); a group where the two are equal (a tie at the threshold) is ranked by
// the pairwise code above instead. About 10-20 vector operations per 16 elements instead of 5 (M - 1) (see
// docs/ops.md, benchmarks/RESULTS.md).
#if defined(__x86_64__) || defined(__i386__)
#define NM_X86 1
#define NM_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,prfchw")))
#define NM_INLINE_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,prfchw"), always_inline)) inline

// Descending compare-exchange (unsigned keys): w[I] = max, w[J] = min.
template <int I, int J>
NM_INLINE_AVX512 void cmpx(__m512i* w) {
  const __m512i a = w[I], b = w[J];
  w[I] = _mm512_max_epu32(a, b);
  w[J] = _mm512_min_epu32(a, b);
}

// Batcher's odd-even merge of w[LO, LO + N) with stride R (Knuth 5.3.4; N, R powers of two).
template <int LO, int N, int R>
struct OddEvenMerge {
  template <int... Is>
  NM_INLINE_AVX512 static void tail(__m512i* w, std::integer_sequence<int, Is...>) {
    (cmpx<LO + R + 2 * R * Is, LO + 2 * R + 2 * R * Is>(w), ...);
  }
  NM_INLINE_AVX512 static void run(__m512i* w) {
    if constexpr (2 * R < N) {
      OddEvenMerge<LO, N, 2 * R>::run(w);
      OddEvenMerge<LO + R, N, 2 * R>::run(w);
      tail(w, std::make_integer_sequence<int, N / (2 * R) - 1>{});
    } else {
      cmpx<LO, LO + R>(w);
    }
  }
};

// Sorts w[LO, LO + N) in descending order (lane by lane).
template <int LO, int N>
struct OddEvenSort {
  NM_INLINE_AVX512 static void run(__m512i* w) {
    if constexpr (N > 1) {
      OddEvenSort<LO, N / 2>::run(w);
      OddEvenSort<LO + N / 2, N / 2>::run(w);
      OddEvenMerge<LO, N, 1>::run(w);
    }
  }
};

// Interleave of the pair (A, B): 32-bit (STAGE 0), 64-bit (STAGE 1) or 128-bit (STAGE 2) halves.
template <int STAGE, int A, int B>
NM_INLINE_AVX512 void shuffle_pair(__m512i* w) {
  const __m512i u = w[A], v = w[B];
  if constexpr (STAGE == 0) {
    w[A] = _mm512_unpacklo_epi32(u, v);
    w[B] = _mm512_unpackhi_epi32(u, v);
  } else if constexpr (STAGE == 1) {
    w[A] = _mm512_unpacklo_epi64(u, v);
    w[B] = _mm512_unpackhi_epi64(u, v);
  } else {
    w[A] = _mm512_shuffle_i32x4(u, v, 0x88);
    w[B] = _mm512_shuffle_i32x4(u, v, 0xDD);
  }
}

// One shuffle stage on the pairs (b + i, b + i + D), i < D, of each block of 2D vectors.
template <int D, int STAGE, int... Is>
NM_INLINE_AVX512 void shuffle_stage(__m512i* w, std::integer_sequence<int, Is...>) {
  (shuffle_pair<STAGE, (Is / D) * 2 * D + Is % D, (Is / D) * 2 * D + Is % D + D>(w), ...);
}

// Block vector loaded into slot r of w: natural order, except for M = 32 (first halves of the 16 groups, then
// the second halves).
template <int M>
constexpr int load_order(int r) {
  return M == 32 ? (r < 16 ? 2 * r : 2 * (r - 16) + 1) : r;
}

// Groups-to-lanes shuffle of the 16 groups of one block: afterwards every lane of w[0, M) holds one whole group
// (the lane of each group is found once by running this on group ids, see BlockLanes).
template <int M>
NM_INLINE_AVX512 void groups_to_lanes(__m512i* w) {
  if constexpr (M == 2) {
    const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
    const __m512i a = w[0], b = w[1];
    w[0] = _mm512_permutex2var_epi32(a, even, b);
    w[1] = _mm512_permutex2var_epi32(a, odd, b);
  } else if constexpr (M == 32) {  // two 16x16 transposes (see load_order)
    groups_to_lanes<16>(w);
    groups_to_lanes<16>(w + 16);
  } else {
    shuffle_stage<1, 0>(w, std::make_integer_sequence<int, M / 2>{});
    shuffle_stage<2, 1>(w, std::make_integer_sequence<int, M / 2>{});
    if constexpr (M >= 8) shuffle_stage<4, 2>(w, std::make_integer_sequence<int, M / 2>{});
    if constexpr (M >= 16) shuffle_stage<8, 2>(w, std::make_integer_sequence<int, M / 2>{});
  }
}

// Where the groups of a block sit after groups_to_lanes (found once by running it on group ids).
template <int M>
struct BlockLanes {
  __m512i back[M];           // per natural vector r: lane permute bringing each group's threshold to its elements
  int lane_of_group[16];     // lane of group g
  uint32_t vector_lanes[M];  // per natural vector r: bit mask of the lanes of its groups
  bool valid = true;         // every lane holds exactly one group (a property of groups_to_lanes; tested)
  NM_TARGET_AVX512 BlockLanes() {
    __m512i w[M];
    for (int r = 0; r < M; ++r) {
      alignas(64) int32_t ids[16];
      for (int l = 0; l < 16; ++l) ids[l] = (16 * load_order<M>(r) + l) / M;
      w[r] = _mm512_load_si512(ids);
    }
    groups_to_lanes<M>(w);
    alignas(64) int32_t got[M][16];
    for (int r = 0; r < M; ++r) _mm512_store_si512(got[r], w[r]);
    for (int l = 0; l < 16; ++l) {
      lane_of_group[got[0][l]] = l;
      for (int r = 1; r < M; ++r) valid = valid && got[r][l] == got[0][l];
    }
    for (int r = 0; r < M; ++r) {
      alignas(64) int32_t idx[16];
      vector_lanes[r] = 0;
      for (int l = 0; l < 16; ++l) {
        idx[l] = lane_of_group[(16 * r + l) / M];
        vector_lanes[r] |= 1u << idx[l];
      }
      back[r] = _mm512_load_si512(idx);
    }
  }
};

template <int M>
NM_TARGET_AVX512 const BlockLanes<M>& block_lanes() {
  static const BlockLanes<M> bl;
  return bl;
}

// Keys of the magnitude criterion: the |x| bits (integer order = float order, -0 = +0). NaNs (every |NaN| bit
// pattern is above +inf's) must all rank equal: tau is clamped to kClamp, one above +inf; as clamping is monotone,
// key >= min(tau, kClamp) selects the same entries as clamping every key would.
struct AbsKeys {
  static constexpr uint32_t kClamp = 0x7F800001u;
  NM_INLINE_AVX512 __m512i operator()(const float* x, const float*, const float*, int64_t i) const {
    return _mm512_and_si512(_mm512_loadu_si512(x + i), _mm512_set1_epi32(0x7FFFFFFF));
  }
  // The same order in 31 bits (every NaN one above +inf): what inlane4_rows subtracts without overflow.
  NM_INLINE_AVX512 static __m512i low31(__m512i k) { return _mm512_min_epu32(k, _mm512_set1_epi32(kClamp)); }
};

// Keys with a channel scale and/or clact column norms: score_key(|x| * scale * colnorm) (null factors skipped).
struct ScoreKeys {
  static constexpr uint32_t kClamp = 0xFFFFFFFFu;
  NM_INLINE_AVX512 __m512i operator()(const float* x, const float* s, const float* c, int64_t i) const {
    __m512 v = _mm512_castsi512_ps(_mm512_and_si512(_mm512_loadu_si512(x + i), _mm512_set1_epi32(0x7FFFFFFF)));
    if (s) v = _mm512_mul_ps(v, _mm512_loadu_ps(s + i));
    if (c) v = _mm512_mul_ps(v, _mm512_loadu_ps(c + i));
    v = _mm512_add_ps(v, _mm512_setzero_ps());  // -0 -> +0
    const __m512i b = _mm512_castps_si512(v);
    const __m512i k = _mm512_xor_si512(b, _mm512_or_si512(_mm512_srai_epi32(b, 31), _mm512_set1_epi32(INT32_MIN)));
    const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    return _mm512_mask_mov_epi32(k, nan, _mm512_set1_epi32(-1));
  }
  // Scores are >= +0 or NaN, so their keys lie in [2^31, 2^32): dropping the top bit keeps the order.
  NM_INLINE_AVX512 static __m512i low31(__m512i k) { return _mm512_xor_si512(k, _mm512_set1_epi32(INT32_MIN)); }
};

// The n-th and (n+1)-th largest of the sorted w (N > 0: compile-time n, lets the compiler drop every
// comparator that reaches neither).
template <int M, int N, int... Is>
NM_INLINE_AVX512 void nth_keys(const __m512i* w, int n, __m512i* tau, __m512i* next,
                               std::integer_sequence<int, Is...>) {
  if constexpr (N > 0) {
    *tau = w[N - 1];
    *next = w[N];
  } else {
    *tau = w[0];
    *next = w[1];
    ((*tau = (n - 1 == Is ? w[Is] : *tau), *next = (n == Is ? w[Is] : *next)), ...);
  }
}

// Keys of the M vectors of a block, in load_order.
template <int M, class Keys, int... Rs>
NM_INLINE_AVX512 void load_keys(const Keys& keys, const float* x, const float* s, const float* c, __m512i* w,
                                std::integer_sequence<int, Rs...>) {
  ((w[Rs] = keys(x, s, c, 16 * load_order<M>(Rs))), ...);
}

// The pairwise ranking out of line (rarely called from the hot loop of threshold_block).
template <int M>
__attribute__((target("avx512f,avx512bw,avx512vl"), noinline)) void pairwise_tie(
    const float* x, int64_t e0, int64_t e1, int n, const float* s, const float* c, float* y, uint8_t* keep) {
  pairwise_range<M>(x, e0, e1, n, s, c, y, keep);
}

// One block of M vectors of x / s / c (s, c may be null; 0 < n < M); the first nv (<= M, even for M = 32) are
// real, the rest zero padding. Writes y (or keep) for the nv real vectors. A group whose (n+1)-th largest key
// equals its n-th (a tie at the threshold) is ranked pairwise instead.
template <int M, int N, class Keys>
NM_INLINE_AVX512 void threshold_block(const Keys& keys, const float* x, const float* s, const float* c, int nv, int n,
                                      const BlockLanes<M>& bl, float* y, uint8_t* keep) {
  __m512i w[M];
  load_keys<M>(keys, x, s, c, w, std::make_integer_sequence<int, M>{});
  groups_to_lanes<M>(w);
  OddEvenSort<0, M>::run(w);
  __m512i tau, next;
  nth_keys<M, N>(w, n, &tau, &next, std::make_integer_sequence<int, M>{});
  const __m512i clamp = _mm512_set1_epi32(static_cast<int>(Keys::kClamp));
  tau = _mm512_min_epu32(tau, clamp);
  const uint32_t tie = _cvtmask16_u32(_mm512_cmpeq_epi32_mask(tau, _mm512_min_epu32(next, clamp)));
  alignas(64) uint32_t tau_lane[16];
  if constexpr (M >= 16) _mm512_store_si512(tau_lane, tau);
#pragma GCC unroll 32
  for (int r = 0; r < nv; ++r) {
    __m512i t;
    if constexpr (M >= 16)  // one group per vector: a broadcast load instead of a lane permute
      t = _mm512_set1_epi32(static_cast<int>(tau_lane[bl.lane_of_group[r * 16 / M]]));
    else
      t = _mm512_permutexvar_epi32(bl.back[r], tau);
    const __mmask16 kept = _mm512_cmpge_epu32_mask(keys(x, s, c, 16 * r), t);
    if (y)
      _mm512_storeu_si512(y + 16 * r, _mm512_maskz_loadu_epi32(kept, x + 16 * r));
    else
      _mm_storeu_si128(reinterpret_cast<__m128i*>(keep + 16 * r), _mm_maskz_mov_epi8(kept, _mm_set1_epi8(1)));
  }
  if (__builtin_expect(tie != 0, 0)) {  // rare: exact ranking of the vectors of the tied groups (padding never counts)
    for (int r = 0; r < nv; r += (M < 32 ? 1 : 2))
      if (tie & bl.vector_lanes[r]) pairwise_tie<M>(x, 16 * r, 16 * r + (M < 32 ? 16 : 32), n, s, c, y, keep);
  }
}

// Rows [t0, t1) by threshold blocks; the tail of a row (< 16 groups) runs as a zero-padded block.
template <int M, int N, class Keys>
NM_INLINE_AVX512 void threshold_rows(const Keys& keys, const float* x, std::ptrdiff_t t0, std::ptrdiff_t t1, int64_t K,
                                     int n, const float* scale, const float* colnorm, float* y, uint8_t* keep) {
  const BlockLanes<M>& bl = block_lanes<M>();
  constexpr int kBlock = 16 * M;
  const int64_t full = K / kBlock * kBlock;
  alignas(64) float pad[3][kBlock];
  for (std::ptrdiff_t t = t0; t < t1; ++t) {
    const float* xr = x + t * K;
    float* yr = y ? y + t * K : nullptr;
    uint8_t* kr = y ? nullptr : keep + t * K;
    for (int64_t e = 0; e < full; e += kBlock) {
      for (int v = 0; v < M; ++v) {  // one line per vector, a few KiB ahead (rows are contiguous)
        __builtin_prefetch(reinterpret_cast<const char*>(xr + e + 16 * v) + 4096, 0, 3);
        if (yr) __builtin_prefetch(reinterpret_cast<const char*>(yr + e + 16 * v) + 4096, 1, 3);
      }
      threshold_block<M, N>(keys, xr + e, scale ? scale + e : nullptr, colnorm ? colnorm + e : nullptr, M, n, bl,
                            yr ? yr + e : nullptr, kr ? kr + e : nullptr);
    }
    if (full < K) {
      const int64_t rest = K - full;
      auto padded = [&](int i, const float* src) -> const float* {
        if (!src) return nullptr;
        std::copy(src + full, src + K, pad[i]);
        std::fill(pad[i] + rest, pad[i] + kBlock, 0.0f);
        return pad[i];
      };
      const float* xp = padded(0, xr);
      const float* sp = padded(1, scale);
      const float* cp = padded(2, colnorm);
      threshold_block<M, N>(keys, xp, sp, cp, static_cast<int>(rest / 16), n, bl, yr ? yr + full : nullptr,
                            kr ? kr + full : nullptr);
    }
  }
}

// ---- 2:4 in lanes (AVX-512, M = 4, 0 < n < 4): each 128-bit lane holds one whole group, so an entry's
// three partners come from in-lane shuffles (no transpose, no network, no mask registers). With k the
// 31-bit key of entry j and p = (j + d) mod 4, p beats j iff k_p > k_j, or k_p == k_j and p < j
// (p < j <=> j + d >= 4, w_d = 1 there) <=> (k_j - w_d) - k_p < 0: the sign bit of that difference.
// d = 3 needs no compare: p = j - 1 beats j exactly when j does not beat p, i.e. the complement of the
// d = 1 sign at lane p. The entry is pruned when at least n partners beat it: one vpternlog on the three
// signs. Equal to the rank rule bit for bit (tie rule, NaN rule, -0 = +0); about 4 cycles per 16 entries
// in L2 (custom_ops/tests/micro_bench.sh).
// Rows are prefetched a few KiB ahead (and the output for writing): the kernel is bound by memory.
template <int N, class Keys>
NM_INLINE_AVX512 void inlane4_rows(const Keys& keys, const float* x, std::ptrdiff_t t0, std::ptrdiff_t t1, int64_t K,
                                   const float* scale, const float* colnorm, float* y, uint8_t* keep) {
  static_assert(N >= 1 && N <= 3, "0 < n < 4");
  constexpr int kTernlog = N == 1 ? 0xFD : N == 2 ? 0xD4 : 0x40;  // "at least N beats" of (a, b, ~c)
  constexpr int kAhead = 4096;                                      // prefetch distance, bytes
  const __m512i w1 = _mm512_set_epi32(1, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0);
  const __m512i w2 = _mm512_set_epi32(1, 1, 0, 0, 1, 1, 0, 0, 1, 1, 0, 0, 1, 1, 0, 0);
  for (std::ptrdiff_t t = t0; t < t1; ++t) {
    const float* xr = x + t * K;
    for (int64_t e = 0; e < K; e += 16) {
      __builtin_prefetch(reinterpret_cast<const char*>(xr + e) + kAhead, 0, 3);
      const __m512i k = Keys::low31(keys(xr, scale, colnorm, e));
      const __m512i d1 = _mm512_sub_epi32(_mm512_sub_epi32(k, w1), _mm512_shuffle_epi32(k, _MM_PERM_ADCB));
      const __m512i d2 = _mm512_sub_epi32(_mm512_sub_epi32(k, w2), _mm512_shuffle_epi32(k, _MM_PERM_BADC));
      const __m512i d3 = _mm512_shuffle_epi32(d1, _MM_PERM_CBAD);  // lane j <- d1 of lane (j + 3) mod 4
      const __m512i pruned = _mm512_srai_epi32(_mm512_ternarylogic_epi32(d1, d2, d3, kTernlog), 31);
      if (y) {
        float* yr = y + t * K + e;
        __builtin_prefetch(reinterpret_cast<const char*>(yr) + kAhead, 1, 3);
        _mm512_storeu_si512(yr, _mm512_andnot_si512(pruned, _mm512_loadu_si512(xr + e)));
      } else {
        _mm_storeu_si128(reinterpret_cast<__m128i*>(keep + t * K + e),
                         _mm512_cvtepi32_epi8(_mm512_add_epi32(pruned, _mm512_set1_epi32(1))));
      }
    }
  }
}

// AVX-512 rows of M: threshold blocks when they apply, else the pairwise lanes.
template <int M>
NM_INLINE_AVX512 void mask_rows_lanes_avx512(const float* x, std::ptrdiff_t t0, std::ptrdiff_t t1, int64_t K, int n,
                                             const float* scale, const float* colnorm, float* y, uint8_t* keep) {
  if constexpr (M == 4) {
    if (n > 0 && n < 4) {
      if (scale || colnorm) {
        if (n == 1) return inlane4_rows<1>(ScoreKeys{}, x, t0, t1, K, scale, colnorm, y, keep);
        if (n == 2) return inlane4_rows<2>(ScoreKeys{}, x, t0, t1, K, scale, colnorm, y, keep);
        return inlane4_rows<3>(ScoreKeys{}, x, t0, t1, K, scale, colnorm, y, keep);
      }
      if (n == 1) return inlane4_rows<1>(AbsKeys{}, x, t0, t1, K, scale, colnorm, y, keep);
      if (n == 2) return inlane4_rows<2>(AbsKeys{}, x, t0, t1, K, scale, colnorm, y, keep);
      return inlane4_rows<3>(AbsKeys{}, x, t0, t1, K, scale, colnorm, y, keep);
    }
  }
  if (n <= 0 || n >= M || !block_lanes<M>().valid) {
    mask_rows_lanes<M>(x, t0, t1, K, n, scale, colnorm, y, keep);
  } else if (scale || colnorm) {
    if (n == M / 2)
      threshold_rows<M, M / 2>(ScoreKeys{}, x, t0, t1, K, n, scale, colnorm, y, keep);
    else
      threshold_rows<M, 0>(ScoreKeys{}, x, t0, t1, K, n, scale, colnorm, y, keep);
  } else {
    if (n == M / 2)
      threshold_rows<M, M / 2>(AbsKeys{}, x, t0, t1, K, n, scale, colnorm, y, keep);
    else
      threshold_rows<M, 0>(AbsKeys{}, x, t0, t1, K, n, scale, colnorm, y, keep);
  }
}
#endif

using MaskRowsFn = void (*)(const float*, std::ptrdiff_t, std::ptrdiff_t, int64_t, int, const float*, const float*,
                            float*, uint8_t*, MaskScratch&);

#define NM_MASK_VARIANT(NAME, ATTR)                                                                          \
  template <int M>                                                                                          \
  ATTR void NAME(const float* x, std::ptrdiff_t t0, std::ptrdiff_t t1, int64_t K, int n, const float* scale, \
                 const float* colnorm, float* y, uint8_t* keep, MaskScratch& sc) {                           \
    mask_rows_fixed<M>(x, t0, t1, K, n, scale, colnorm, y, keep, sc);                                        \
  }
#ifdef NM_X86
template <int M>
NM_TARGET_AVX512 void mask_rows_avx512(const float* x, std::ptrdiff_t t0, std::ptrdiff_t t1, int64_t K, int n,
                                       const float* scale, const float* colnorm, float* y, uint8_t* keep,
                                       MaskScratch& sc) {
  if constexpr (M <= 32) {
    if (M == 32 || K % 16 == 0) return mask_rows_lanes_avx512<M>(x, t0, t1, K, n, scale, colnorm, y, keep);
  }
  mask_rows_fixed<M>(x, t0, t1, K, n, scale, colnorm, y, keep, sc);
}
// ---- AVX2 threshold blocks (M = 8, 16, 32; 0 < n < M): eight groups at a time, all in registers. The
// group-major keys of the block are turned lane-major by 8 x 8 transposes (vector j, lane r = key j of
// group r), the sorting network gives each group's n-th largest key tau, and two passes give the exact rule
// (every key > tau is kept; keys == tau in index order while fewer than n - #(key > tau) have been: the
// lower index wins a tie, as in the reference). The flags are transposed back to mask the 8 x M values.
// Groups past the last multiple of 8 go through the reference's per-group rank.
#define NM_INLINE_AVX2 __attribute__((target("avx2"), always_inline)) inline

NM_INLINE_AVX2 void transpose8(__m256i* r) {
  const __m256 a0 = _mm256_castsi256_ps(r[0]), a1 = _mm256_castsi256_ps(r[1]), a2 = _mm256_castsi256_ps(r[2]),
               a3 = _mm256_castsi256_ps(r[3]), a4 = _mm256_castsi256_ps(r[4]), a5 = _mm256_castsi256_ps(r[5]),
               a6 = _mm256_castsi256_ps(r[6]), a7 = _mm256_castsi256_ps(r[7]);
  const __m256 t0 = _mm256_unpacklo_ps(a0, a1), t1 = _mm256_unpackhi_ps(a0, a1), t2 = _mm256_unpacklo_ps(a2, a3),
               t3 = _mm256_unpackhi_ps(a2, a3), t4 = _mm256_unpacklo_ps(a4, a5), t5 = _mm256_unpackhi_ps(a4, a5),
               t6 = _mm256_unpacklo_ps(a6, a7), t7 = _mm256_unpackhi_ps(a6, a7);
  const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE),
               u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE),
               u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE),
               u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  r[0] = _mm256_castps_si256(_mm256_permute2f128_ps(u0, u4, 0x20));
  r[1] = _mm256_castps_si256(_mm256_permute2f128_ps(u1, u5, 0x20));
  r[2] = _mm256_castps_si256(_mm256_permute2f128_ps(u2, u6, 0x20));
  r[3] = _mm256_castps_si256(_mm256_permute2f128_ps(u3, u7, 0x20));
  r[4] = _mm256_castps_si256(_mm256_permute2f128_ps(u0, u4, 0x31));
  r[5] = _mm256_castps_si256(_mm256_permute2f128_ps(u1, u5, 0x31));
  r[6] = _mm256_castps_si256(_mm256_permute2f128_ps(u2, u6, 0x31));
  r[7] = _mm256_castps_si256(_mm256_permute2f128_ps(u3, u7, 0x31));
}

// score_key(|x| * scale * colnorm) of 8 consecutive values (the reference's operation order).
NM_INLINE_AVX2 __m256i keys8(__m256i xb, const float* scale, const float* colnorm, int64_t e) {
  __m256 s = _mm256_castsi256_ps(_mm256_and_si256(xb, _mm256_set1_epi32(0x7FFFFFFF)));
  if (scale) s = _mm256_mul_ps(s, _mm256_loadu_ps(scale + e));
  if (colnorm) s = _mm256_mul_ps(s, _mm256_loadu_ps(colnorm + e));
  s = _mm256_add_ps(s, _mm256_setzero_ps());
  const __m256i b = _mm256_castps_si256(s);
  const __m256i k = _mm256_xor_si256(b, _mm256_or_si256(_mm256_srai_epi32(b, 31), _mm256_set1_epi32(INT32_MIN)));
  return _mm256_or_si256(k, _mm256_castps_si256(_mm256_cmp_ps(s, s, _CMP_UNORD_Q)));  // NaN -> largest key
}

template <int M>
NM_INLINE_AVX2 void threshold_block_avx2(const float* xr, float* yr, uint8_t* kr, int n, const float* scale,
                                         const float* colnorm) {
  static constexpr SortNet<M> net = odd_even_merge_sort<M>();
  __m256i bits[M], k[M];  // bits: the block's values, group-major ([r][c] = 8 values of group r, tile c)
#pragma GCC unroll 4
  for (int c = 0; c < M / 8; ++c) {
#pragma GCC unroll 8
    for (int r = 0; r < 8; ++r) {
      const int64_t e = r * M + c * 8;
      bits[c * 8 + r] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr + e));
      k[c * 8 + r] = keys8(bits[c * 8 + r], scale ? scale + r * M : nullptr, colnorm ? colnorm + r * M : nullptr,
                           c * 8);
    }
    transpose8(k + c * 8);  // k[c * 8 + j]: key c * 8 + j of each group
  }
  v8u w[M];
#pragma GCC unroll 32
  for (int j = 0; j < M; ++j) w[j] = reinterpret_cast<v8u>(k[j]);
#pragma GCC unroll 1024
  for (int c = 0; c < net.count; ++c) {
    const v8u lo = w[net.a[c]] < w[net.b[c]] ? w[net.a[c]] : w[net.b[c]];
    const v8u hi = w[net.a[c]] < w[net.b[c]] ? w[net.b[c]] : w[net.a[c]];
    w[net.a[c]] = lo;
    w[net.b[c]] = hi;
  }
  v8u tau = w[0];
  for (int j = 1; j < M; ++j) tau = (M - n == j) ? w[j] : tau;
  v8u quota = v8u{} + static_cast<uint32_t>(n);
#pragma GCC unroll 32
  for (int j = 0; j < M; ++j) quota += reinterpret_cast<v8u>(reinterpret_cast<v8u>(k[j]) > tau);
  v8u seen = v8u{};
#pragma GCC unroll 32
  for (int j = 0; j < M; ++j) {
    const v8u kj = reinterpret_cast<v8u>(k[j]);
    const v8u eq = reinterpret_cast<v8u>(kj == tau);
    k[j] = reinterpret_cast<__m256i>(reinterpret_cast<v8u>(kj > tau) | (eq & reinterpret_cast<v8u>(seen < quota)));
    seen -= eq;
  }
#pragma GCC unroll 4
  for (int c = 0; c < M / 8; ++c) {
    transpose8(k + c * 8);  // back to group-major: k[c * 8 + r] = keep flags of group r, tile c
#pragma GCC unroll 8
    for (int r = 0; r < 8; ++r) {
      const int64_t e = r * M + c * 8;
      if (yr) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(yr + e), _mm256_and_si256(bits[c * 8 + r], k[c * 8 + r]));
      } else {
        const __m256i f = _mm256_and_si256(k[c * 8 + r], _mm256_set1_epi32(1));
        const __m128i h = _mm_packs_epi32(_mm256_castsi256_si128(f), _mm256_extracti128_si256(f, 1));
        _mm_storel_epi64(reinterpret_cast<__m128i*>(kr + e), _mm_packus_epi16(h, h));
      }
    }
  }
}

template <int M>
__attribute__((target("avx2"))) void mask_rows_avx2(const float* x, std::ptrdiff_t t0, std::ptrdiff_t t1, int64_t K,
                                                    int n, const float* scale, const float* colnorm, float* y,
                                                    uint8_t* keep, MaskScratch& sc) {
  if constexpr (M >= 8 && M <= 32) {
    if (n > 0 && n < M) {
      const int64_t G = K / M;
      for (std::ptrdiff_t t = t0; t < t1; ++t) {
        const float* xr = x + t * K;
        int64_t g = 0;
        for (; g + 8 <= G; g += 8) {
          const int64_t e = g * M;
          threshold_block_avx2<M>(xr + e, y ? y + t * K + e : nullptr, keep ? keep + t * K + e : nullptr, n,
                                  scale ? scale + e : nullptr, colnorm ? colnorm + e : nullptr);
        }
        for (; g < G; ++g) {  // the tail groups: the reference's rank
          const int64_t e = g * M;
          uint32_t keys[M];
          uint8_t flags[M];
          group_keys(xr + e, M, scale ? scale + e : nullptr, colnorm ? colnorm + e : nullptr, keys);
          group_keep_fixed<M>(keys, n, flags);
          for (int j = 0; j < M; ++j) {
            if (y) y[t * K + e + j] = flags[j] ? xr[e + j] : 0.0f;
            else keep[t * K + e + j] = flags[j];
          }
        }
      }
      return;
    }
  }
  mask_rows_fixed<M>(x, t0, t1, K, n, scale, colnorm, y, keep, sc);
}
#endif
NM_MASK_VARIANT(mask_rows_base, )
#undef NM_MASK_VARIANT

template <int M>
MaskRowsFn pick_mask_rows() {
#ifdef NM_X86
  static const MaskRowsFn fn = by_isa<MaskRowsFn>(&mask_rows_avx512<M>, &mask_rows_avx2<M>, &mask_rows_base<M>);
#else
  static const MaskRowsFn fn = &mask_rows_base<M>;
#endif
  return fn;
}

MaskRowsFn mask_rows_for(int m) {
  switch (m) {
    case 2: return pick_mask_rows<2>();
    case 4: return pick_mask_rows<4>();
    case 8: return pick_mask_rows<8>();
    case 16: return pick_mask_rows<16>();
    case 32: return pick_mask_rows<32>();
    case 64: return pick_mask_rows<64>();
    default: return nullptr;
  }
}

// The N:M selection of rows [0, T): keep flags (keep [T, K]) or the masked values (y [T, K]); the
// other pointer is null, as for the MaskRowsFn variants. M without a fast path: row_keep per row.
void select_rows(const float* x, int64_t T, int64_t K, int n, int m, const float* scale, const float* colnorm,
                 float* y, uint8_t* keep, const ParallelFor& pf) {
  const MaskRowsFn fast = mask_rows_for(m);
  pf(T, [&](std::ptrdiff_t t0, std::ptrdiff_t t1) {
    if (fast) {
      MaskScratch sc;
      fast(x, t0, t1, K, n, scale, colnorm, y, keep, sc);
      return;
    }
    RowScratch sc;
    std::vector<uint8_t> row(keep ? 0 : static_cast<size_t>(K));
    for (std::ptrdiff_t t = t0; t < t1; ++t) {
      uint8_t* kr = keep ? keep + t * K : row.data();
      row_keep(x + t * K, K, n, m, scale, colnorm, kr, sc);
      if (y)
        for (int64_t j = 0; j < K; ++j) y[t * K + j] = kr[j] ? x[t * K + j] : 0.0f;
    }
  });
}

}  // namespace

void nm_keep_rows(const float* x, int64_t T, int64_t K, int n, int m, const float* scale,
                  const float* colnorm, uint8_t* keep, const ParallelFor& pf) {
  select_rows(x, T, K, n, m, scale, colnorm, nullptr, keep, pf);
}

void nm_mask_f32(const float* x, int64_t T, int64_t K, int n, int m, const float* scale,
                 const float* colnorm, float* y, const ParallelFor& pf) {
  select_rows(x, T, K, n, m, scale, colnorm, y, nullptr, pf);
}

// NMSparseMatMul's steps around the GEMM, shared by every weight format: 1. per row the shift, the
// selection, the kept indices (ascending) and the variance-correction factor; 2. gemm(xs, idx, kept, y)
// over the kept rows; 3. the epilogue (z + eta * shift_bias) * v + bias.
void nm_sparse_matmul_rows(const float* x, int64_t T, int64_t K, int64_t O, const SparseMatMulArgs& a,
                           const KeptGemm& gemm, float* y, const ParallelFor& pf) {
  const int64_t kept = K / a.m * a.n;
  std::vector<float> xs(static_cast<size_t>(T * K));
  std::vector<int32_t> idx(static_cast<size_t>(T * kept));
  std::vector<float> eta(static_cast<size_t>(T), 0.0f), v(static_cast<size_t>(T), 1.0f);

  // 1. shift, selection, kept indices (ascending) and the variance-correction factor, per row.
  pf(T, [&](std::ptrdiff_t t0, std::ptrdiff_t t1) {
    std::vector<uint32_t> scratch;
    std::vector<uint8_t> keep(static_cast<size_t>(K));
    std::vector<int32_t> ids(static_cast<size_t>(K + 16));
    RowScratch sc;
    MaskScratch msc;
    const MaskRowsFn fast = mask_rows_for(a.m);
    for (std::ptrdiff_t t = t0; t < t1; ++t) {
      const float* xr = x + t * K;
      float* sr = xs.data() + t * K;
      const float e = row_shift(xr, K, a.shift, scratch);
      eta[t] = e;
      for (int64_t j = 0; j < K; ++j) sr[j] = xr[j] - e;
      if (fast)
        fast(sr, 0, 1, K, a.n, a.channel_scale, nullptr, nullptr, keep.data(), msc);
      else
        row_keep(sr, K, a.n, a.m, a.channel_scale, nullptr, keep.data(), sc);
      kept_indices(keep.data(), K, ids.data());  // exactly `kept` of them (N per group)
      std::copy(ids.begin(), ids.begin() + kept, idx.begin() + t * kept);
      if (a.variance_correction) v[t] = variance_factor(xr, sr, keep.data(), K);
    }
  });

  // 2. the sparse GEMM over the kept rows of the weight.
  gemm(xs.data(), idx.data(), kept, y);

  // 3. epilogue: (z + eta * shift_bias) * v + bias.
  pf(T, [&](std::ptrdiff_t t0, std::ptrdiff_t t1) {
    for (std::ptrdiff_t t = t0; t < t1; ++t) {
      float* yr = y + t * O;
      const float e = eta[t], vt = v[t];
      for (int64_t o = 0; o < O; ++o) {
        float z = yr[o];
        if (a.shift_bias) z = z + e * a.shift_bias[o];
        if (a.variance_correction) z = z * vt;
        if (a.bias) z = z + a.bias[o];
        yr[o] = z;
      }
    }
  });
}

void nm_sparse_matmul_f32(const float* x, Weight b, int64_t T, int64_t K, int64_t O,
                          const SparseMatMulArgs& a, float* y, const ParallelFor& pf) {
  nm_sparse_matmul_rows(x, T, K, O, a, [&](const float* xs, const int32_t* idx, int64_t kept, float* z) {
    sparse_gemm(xs, idx, T, K, kept, b, O, z, pf);
  }, y, pf);
}

void nm_sparse_matmul_nbits_f32(const float* x, const NBitsWeight& w, int64_t T, const SparseMatMulArgs& a,
                                float* y, const ParallelFor& pf) {
  nm_sparse_matmul_rows(x, T, w.K, w.O, a, [&](const float* xs, const int32_t* idx, int64_t kept, float* z) {
    sparse_gemm_nbits(xs, idx, T, kept, w, z, pf);
  }, y, pf);
}

}  // namespace nm_onnx

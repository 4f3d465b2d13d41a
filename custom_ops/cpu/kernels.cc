// CPU row kernels of the nm_onnx ops (see kernels.h); selection and shift rules come from nm_select.h.
#include "kernels.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <string>
#include <vector>

#include "nm_select.h"

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

float row_shift(const float* x, int64_t K, Shift mode, std::vector<float>& scratch) {
  if (mode == Shift::kNone || K == 0) return 0.0f;
  if (mode == Shift::kMean) {
    double sum = 0.0;
    for (int64_t j = 0; j < K; ++j) sum += static_cast<double>(x[j]);
    return mean_shift(sum, K);
  }
  for (int64_t j = 0; j < K; ++j)
    if (std::isnan(x[j])) return std::numeric_limits<float>::quiet_NaN();
  scratch.assign(x, x + K);
  const int64_t r = lower_median_rank(K);
  std::nth_element(scratch.begin(), scratch.begin() + r, scratch.end());
  return canonical_shift(scratch[r]);
}

double unbiased_variance(const float* x, int64_t K) {
  double mean = 0.0;
  for (int64_t j = 0; j < K; ++j) mean += x[j];
  mean /= static_cast<double>(K);
  double ss = 0.0;
  for (int64_t j = 0; j < K; ++j) {
    const double d = x[j] - mean;
    ss += d * d;
  }
  return ss / static_cast<double>(K - 1);
}

}  // namespace

void row_shifts(const float* x, int64_t T, int64_t K, Shift mode, float* eta, const ParallelFor& pf) {
  pf(T, [&](std::ptrdiff_t t0, std::ptrdiff_t t1) {
    std::vector<float> scratch;
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

void nm_keep_rows(const float* x, int64_t T, int64_t K, int n, int m, const float* scale,
                  const float* colnorm, uint8_t* keep, const ParallelFor& pf) {
  pf(T, [&](std::ptrdiff_t t0, std::ptrdiff_t t1) {
    RowScratch sc;
    for (std::ptrdiff_t t = t0; t < t1; ++t) row_keep(x + t * K, K, n, m, scale, colnorm, keep + t * K, sc);
  });  // (float16 NMMask and the tests' keep masks use the generic per-group ranking)
}

// ---- NMMask fast path for M in {2, 4, ..., 64}: keys of a row stored transposed ([M][G]) so that the
// pairwise ranking runs over contiguous group vectors; compiled for AVX-512, AVX2 and baseline and
// chosen at run time. Same keys and the same rank definition as group_keep (bit-identical masks).
namespace {

struct MaskScratch {
  std::vector<uint32_t> keys, ranks;
};

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

template <int M>
__attribute__((always_inline)) inline void mask_rows_lanes(const float* x, std::ptrdiff_t t0, std::ptrdiff_t t1,
                                                           int64_t K, int n, const float* scale, const float* colnorm,
                                                           float* y, uint8_t* keep) {
  static const LanePerms<M> lp;
  const v16i nv = v16i{} + n;
  for (std::ptrdiff_t t = t0; t < t1; ++t) {
    const float* xr = x + t * K;
    for (int64_t e = 0; e < K; e += 16) {
      v16u xb, k;
      lane_keys(xr, scale, colnorm, e, &k, &xb);
      v16i rank = v16i{};
      for (int d = 1; d < M; ++d) {
        const v16u p = __builtin_shuffle(k, lp.perm[d]);
        rank -= reinterpret_cast<v16i>(p > k) | (reinterpret_cast<v16i>(p == k) & lp.lower[d]);
      }
      lane_store(xb, rank < nv, y ? y + t * K + e : nullptr, y ? nullptr : keep + t * K + e);
    }
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

__attribute__((always_inline)) inline void mask_rows_lanes32(const float* x, std::ptrdiff_t t0, std::ptrdiff_t t1,
                                                             int64_t K, int n, const float* scale,
                                                             const float* colnorm, float* y, uint8_t* keep) {
  static const LanePerms32 lp;
  const v16i nv = v16i{} + n;
  for (std::ptrdiff_t t = t0; t < t1; ++t) {
    const float* xr = x + t * K;
    for (int64_t e = 0; e < K; e += 32) {
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
      lane_store(blo, rlo < nv, y ? y + t * K + e : nullptr, y ? nullptr : keep + t * K + e);
      lane_store(bhi, rhi < nv, y ? y + t * K + e + 16 : nullptr, y ? nullptr : keep + t * K + e + 16);
    }
  }
}

using MaskRowsFn = void (*)(const float*, std::ptrdiff_t, std::ptrdiff_t, int64_t, int, const float*, const float*,
                            float*, uint8_t*, MaskScratch&);

#define NM_MASK_VARIANT(NAME, ATTR, LANES)                                                                       \
  template <int M>                                                                                        \
  ATTR void NAME(const float* x, std::ptrdiff_t t0, std::ptrdiff_t t1, int64_t K, int n, const float* scale, \
                 const float* colnorm, float* y, uint8_t* keep, MaskScratch& sc) {                           \
    if (LANES && M <= 16 && K % 16 == 0)                                                                   \
      mask_rows_lanes<(M <= 16 ? M : 16)>(x, t0, t1, K, n, scale, colnorm, y, keep);                         \
    else if (LANES && M == 32)                                                                              \
      mask_rows_lanes32(x, t0, t1, K, n, scale, colnorm, y, keep);                                          \
    else                                                                                                    \
      mask_rows_fixed<M>(x, t0, t1, K, n, scale, colnorm, y, keep, sc);                                    \
  }
#if defined(__x86_64__) || defined(__i386__)
#define NM_X86 1
NM_MASK_VARIANT(mask_rows_avx512, __attribute__((target("avx512f,avx512bw,avx512vl"))), true)
NM_MASK_VARIANT(mask_rows_avx2, __attribute__((target("avx2"))), false)
#endif
NM_MASK_VARIANT(mask_rows_base, , false)
#undef NM_MASK_VARIANT

template <int M>
MaskRowsFn pick_mask_rows() {
  static const MaskRowsFn fn = [] {
#ifdef NM_X86
    __builtin_cpu_init();
    // NM_ONNX_ISA=avx2|base caps the instruction set (tests run every variant on one machine).
    const char* cap = std::getenv("NM_ONNX_ISA");
    const std::string isa = cap ? cap : "";
    if (isa == "base") return static_cast<MaskRowsFn>(&mask_rows_base<M>);
    if (isa == "avx2") return static_cast<MaskRowsFn>(&mask_rows_avx2<M>);
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl"))
      return static_cast<MaskRowsFn>(&mask_rows_avx512<M>);
    if (__builtin_cpu_supports("avx2")) return static_cast<MaskRowsFn>(&mask_rows_avx2<M>);
#endif
    return static_cast<MaskRowsFn>(&mask_rows_base<M>);
  }();
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

}  // namespace

void nm_mask_f32(const float* x, int64_t T, int64_t K, int n, int m, const float* scale,
                 const float* colnorm, float* y, const ParallelFor& pf) {
  if (const MaskRowsFn fn = mask_rows_for(m)) {
    pf(T, [&](std::ptrdiff_t t0, std::ptrdiff_t t1) {
      MaskScratch sc;
      fn(x, t0, t1, K, n, scale, colnorm, y, nullptr, sc);
    });
    return;
  }
  pf(T, [&](std::ptrdiff_t t0, std::ptrdiff_t t1) {
    RowScratch sc;
    std::vector<uint8_t> keep(static_cast<size_t>(K));
    for (std::ptrdiff_t t = t0; t < t1; ++t) {
      row_keep(x + t * K, K, n, m, scale, colnorm, keep.data(), sc);
      for (int64_t j = 0; j < K; ++j) y[t * K + j] = keep[j] ? x[t * K + j] : 0.0f;
    }
  });
}

void nm_sparse_matmul_f32(const float* x, const float* b, int64_t T, int64_t K, int64_t O,
                          const SparseMatMulArgs& a, float* y, const ParallelFor& pf) {
  const int64_t kept = K / a.m * a.n;
  std::vector<float> xs(static_cast<size_t>(T * K));
  std::vector<int32_t> idx(static_cast<size_t>(T * kept));
  std::vector<float> eta(static_cast<size_t>(T), 0.0f), v(static_cast<size_t>(T), 1.0f);

  // 1. shift, selection, kept indices (ascending) and the variance-correction factor, per row.
  pf(T, [&](std::ptrdiff_t t0, std::ptrdiff_t t1) {
    std::vector<float> scratch, xh;
    std::vector<uint8_t> keep(static_cast<size_t>(K));
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
      int32_t* ir = idx.data() + t * kept;
      int64_t c = 0;
      for (int64_t j = 0; j < K; ++j)
        if (keep[j]) ir[c++] = static_cast<int32_t>(j);
      if (a.variance_correction && K >= 2) {
        xh.assign(static_cast<size_t>(K), 0.0f);
        for (int64_t j = 0; j < K; ++j) xh[j] = keep[j] ? sr[j] : 0.0f;
        v[t] = variance_scale(unbiased_variance(xr, K), unbiased_variance(xh.data(), K), K);
      }
    }
  });

  // 2. the sparse GEMM over the kept rows of B.
  sparse_gemm_f32(xs.data(), idx.data(), T, K, kept, b, O, y, pf);

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

}  // namespace nm_onnx

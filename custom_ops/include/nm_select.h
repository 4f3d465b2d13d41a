// N:M selection and per-token shift logic shared by the CPU and CUDA kernels (METHOD.md, docs/ops.md).
//
// Everything that decides *which* entries survive lives here, once, as __host__ __device__ code, so
// the CPU test suite exercises the same logic the CUDA kernels run:
// - a score is mapped to an unsigned key whose integer order is the ranking order: NaN above every
//   number (+inf included), -0 == +0; equal keys <=> equal scores;
// - in a group of M keys, rank_j = #(keys > key_j) + #(keys == key_j with lower index); keep rank < N
//   (the tie rule: among equal scores the lower index wins);
// - the lower median of a row is the element of key rank (K-1)/2 from the bottom (no NaN in the row);
// - the variance-correction factor v = sqrt(var(x) / max(var(xh), 1e-9)), 1 when K < 2.
// Compile without -ffast-math (NaN tests) and with FP contraction off (bit-exact scores).
#pragma once
#include <stdint.h>
#include <string.h>
#include <math.h>

#if defined(__CUDACC__)
#define NM_HD __host__ __device__ __forceinline__
#else
#define NM_HD inline
#endif

namespace nm_onnx {

constexpr int kMaxM = 64;  // largest group size ranked by pairwise counting (larger M: selection)

enum class Criterion { kMagnitude = 0, kClact = 1 };
enum class Shift { kNone = 0, kMedian = 1, kMean = 2 };

// The bits of a value as another type of the same size: bit_cast<uint32_t>(f), bit_cast<float>(u)
// (memcpy is a register move on the host and on the device).
template <typename To, typename From>
NM_HD To bit_cast(From v) {
  static_assert(sizeof(To) == sizeof(From), "bit_cast needs types of equal size");
  To r;
  memcpy(&r, &v, sizeof r);
  return r;
}

// Order-preserving key of a score: a > b <=> key(a) > key(b); every NaN -> the largest key; -0 -> +0.
NM_HD uint32_t score_key(float s) {
  const uint32_t b = bit_cast<uint32_t>(s + 0.0f);  // -0 + 0 = +0 (round to nearest)
  // Negative: flip all bits; non-negative: set the sign bit (branch-free, vectorisable).
  const uint32_t k = b ^ (static_cast<uint32_t>(static_cast<int32_t>(b) >> 31) | 0x80000000u);
  return s != s ? 0xFFFFFFFFu : k;
}

// Inverse of score_key for non-NaN keys.
NM_HD float key_score(uint32_t k) {
  return bit_cast<float>((k & 0x80000000u) ? (k & 0x7FFFFFFFu) : ~k);
}

// Rank of entry j inside a group of m keys (tie rule: equal keys, lower index first).
NM_HD int group_rank(const uint32_t* keys, int m, int j) {
  const uint32_t kj = keys[j];
  int r = 0;
  for (int i = 0; i < m; ++i) r += (keys[i] > kj) | ((keys[i] == kj) & (i < j));
  return r;
}

// Ranking order of (key, index) pairs: larger key first, then lower index (the tie rule).
NM_HD bool ranks_before(uint32_t ka, int64_t ia, uint32_t kb, int64_t ib) {
  return ka > kb || (ka == kb && ia < ib);
}

// keep[j] = 1 for the n best of the m keys of one group, else 0.
NM_HD void group_keep(const uint32_t* keys, int m, int n, uint8_t* keep) {
  for (int j = 0; j < m; ++j) keep[j] = group_rank(keys, m, j) < n ? 1 : 0;
}

// Score of one element: |x| * scale (scale = channel factor, 1 when absent) * colnorm (clact, else 1).
NM_HD float element_score(float x, float scale, float colnorm) {
  return fabsf(x) * scale * colnorm;
}

// The shift that makes -0 a +0 (median) and rounds a float64 mean to float32.
NM_HD float canonical_shift(float eta) { return eta + 0.0f; }
NM_HD float mean_shift(double sum, int64_t k) { return k == 0 ? 0.0f : static_cast<float>(sum / static_cast<double>(k)); }

// Index (from the bottom) of the lower median of k values.
NM_HD int64_t lower_median_rank(int64_t k) { return (k - 1) / 2; }

// Variance-correction factor from the unbiased variances of x and of the pruned row.
NM_HD float variance_scale(double var_x, double var_h, int64_t k) {
  if (k < 2) return 1.0f;
  const double d = var_h > 1e-9 ? var_h : 1e-9;
  return static_cast<float>(sqrt(var_x / d));
}

}  // namespace nm_onnx

// The sparse GEMM kernels over kept rows, written once for every vector ISA (see sparse_gemm_internal.h).
//
// Included by sparse_gemm_avx2.cc and sparse_gemm_avx512.cc, each after defining
//   NM_SPARSE_GEMM_TARGET  the function target attribute of its ISA (every function here carries it,
//                          so the code is compiled for that ISA only and inlines into its callers), and
//   a vector traits type V (in the same unnamed namespace): Vec, Mask, kLanes, kPackFloats and the
//   static operations zero, set1, first (mask of the first n lanes), full, load (float32 or float16
//   row, plain or masked: masked-off lanes read as 0), load_aligned, store (plain or masked),
//   store_aligned, fmadd.
// Everything here lies in an unnamed namespace: each ISA file gets its own copy, so no AVX code can be
// merged into a function another ISA calls (and no standard-library templates are used, for the
// same reason).
//
// Prefill (many tokens), run(): register-blocked "sparse outer product". A tile of R tokens x NV
// vectors of Y stays in registers while the kept rows of each token stream through; each kept row
// costs one broadcast of x and NV fused multiply-adds with a contiguous piece of a row of B. Kept
// indices are walked in blocks of jb; the B rows such a block touches (for all tokens of the task)
// are first copied into a small contiguous per-thread buffer, so they stay in L1 while every token
// tile uses them (B's own rows are O floats apart, often a multiple of 4 KiB, and alias in the L1 sets).
// Decode (few tokens), stream(): each token's kept rows stream through its L1-resident piece of Y,
// four rows at a time (long contiguous runs for the hardware prefetcher).
#pragma once
#include <cstdint>

#include "sparse_gemm_internal.h"

#ifndef NM_SPARSE_GEMM_TARGET
#error "define NM_SPARSE_GEMM_TARGET (the ISA's target attribute) before including sparse_gemm_kernels.h"
#endif

namespace nm_onnx {
namespace detail {
namespace {

// Where row k of a column block of B lies and how its NV vectors load. Strided: B itself (klo = 0,
// ldb = O) or any copy, run-time stride, the last vector masked with `tail` (odd widths need no scalar
// loop). Packed: the packing buffer, compile-time stride W, full aligned vectors (fewer address
// operations: the kernel is bound by loads, ~1 per FMA plus the index and x).
template <class V, typename BT>
struct StridedRows {
  using Elem = BT;
  static constexpr bool kMasked = true;
  const BT* bp;
  int64_t klo, ldb;
  typename V::Mask tail;
  NM_SPARSE_GEMM_TARGET const BT* row(int64_t k) const { return bp + (k - klo) * ldb; }
  NM_SPARSE_GEMM_TARGET typename V::Vec load(const BT* b, int v, bool last) const {
    return last ? V::load(b + V::kLanes * v, tail) : V::load(b + V::kLanes * v);
  }
};

template <class V, int64_t W>
struct PackedRows {
  using Elem = float;
  static constexpr bool kMasked = false;
  uintptr_t base;  // address arithmetic in integers: base itself lies before the buffer (k >= klo)
  typename V::Mask tail;  // unused (full)
  NM_SPARSE_GEMM_TARGET const float* row(int64_t k) const {
    return reinterpret_cast<const float*>(base + static_cast<uintptr_t>(k * W * 4));
  }
  NM_SPARSE_GEMM_TARGET typename V::Vec load(const float* b, int v, bool) const {
    return V::load_aligned(b + V::kLanes * v);
  }
};

// Y[t..t+R, o..o+NV vectors) (+)= sum_{j in [j0, j1)} X[t, idx[t, j]] * B[idx[t, j], o..], the rows
// of B as `rows` places them; the last vector is masked where rows is.
template <class V, int R, int NV, class Rows>
NM_SPARSE_GEMM_TARGET inline void micro(const GemmBlock& g, int64_t t, int64_t o, int64_t j0, int64_t j1,
                                        bool first, const Rows& rows) {
  constexpr int L = V::kLanes;
  typename V::Vec acc[R][NV];
  float* y[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    y[r] = g.Y + (t + r) * g.O + o;
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) {
      if (first)
        acc[r][v] = V::zero();
      else if (Rows::kMasked && v == NV - 1)
        acc[r][v] = V::load(y[r] + L * v, rows.tail);
      else
        acc[r][v] = V::load(y[r] + L * v);
    }
  }
  const float* x = g.X + t * g.K;
  const int32_t* id = g.idx + t * g.kept;
  const int64_t K = g.K, kept = g.kept;
  for (int64_t j = j0; j < j1; ++j) {
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const int64_t k = id[r * kept + j];
      const typename V::Vec a = V::set1(x[r * K + k]);
      const typename Rows::Elem* b = rows.row(k);
#pragma GCC unroll 16
      for (int v = 0; v < NV; ++v) acc[r][v] = V::fmadd(a, rows.load(b, v, v == NV - 1), acc[r][v]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) {
      if (Rows::kMasked && v == NV - 1)
        V::store(y[r] + L * v, rows.tail, acc[r][v]);
      else
        V::store(y[r] + L * v, acc[r][v]);
    }
  }
}

// One column block over tokens [t0, t1): token tiles of R, then 1..R-1 leftovers.
template <class V, int R, int NV, class Rows>
NM_SPARSE_GEMM_TARGET inline void column_block(const GemmBlock& g, int64_t o, int64_t j0, int64_t j1, bool first,
                                               const Rows& rows) {
  int64_t t = g.t0;
  for (; t + R <= g.t1; t += R) micro<V, R, NV>(g, t, o, j0, j1, first, rows);
  for (; t < g.t1; ++t) micro<V, 1, NV>(g, t, o, j0, j1, first, rows);
}

// The per-thread packing buffer of run(): a copy of B[klo..khi, o..o+W), rows W floats apart.
template <class V>
alignas(64) thread_local float pack_buf[V::kPackFloats];

// Kept-index blocks of jb; in each, full-width column blocks of W = NV vectors (B packed when the rows
// the block's tokens touch fit the buffer), then the remainder one (possibly partial) vector at a time.
template <class V, int R, int NV, typename BT>
NM_SPARSE_GEMM_TARGET void run(const GemmBlock& g, const BT* B, int64_t jb) {
  constexpr int L = V::kLanes;
  constexpr int64_t W = L * NV;
  float* const pack = pack_buf<V>;
  for (int64_t j0 = 0; j0 < g.kept || j0 == 0; j0 += jb) {
    const int64_t j1 = j0 + jb < g.kept ? j0 + jb : g.kept;
    const bool first = j0 == 0;
    int64_t klo = g.K, khi = -1;  // rows of B that the block's tokens read (indices ascend per row)
    for (int64_t t = g.t0; t < g.t1 && j1 > j0; ++t) {
      const int32_t* id = g.idx + t * g.kept;
      klo = id[j0] < klo ? id[j0] : klo;
      khi = id[j1 - 1] > khi ? id[j1 - 1] : khi;
    }
    const bool packed = khi >= klo && (khi - klo + 1) * W <= V::kPackFloats;
    int64_t o = g.o0;
    for (; o + W <= g.o1; o += W) {
      if (packed) {
        for (int64_t k = klo; k <= khi; ++k) {
          const BT* src = B + k * g.O + o;
          float* dst = pack + (k - klo) * W;
#pragma GCC unroll 16
          for (int v = 0; v < NV; ++v) V::store_aligned(dst + L * v, V::load(src + L * v));
        }
        const uintptr_t base = reinterpret_cast<uintptr_t>(pack) - static_cast<uintptr_t>(klo * W * 4);
        column_block<V, R, NV>(g, o, j0, j1, first, PackedRows<V, W>{base, V::full()});
      } else {
        column_block<V, R, NV>(g, o, j0, j1, first, StridedRows<V, BT>{B + o, 0, g.O, V::full()});
      }
    }
    for (; o < g.o1; o += L)
      column_block<V, R, 1>(g, o, j0, j1, first, StridedRows<V, BT>{B + o, 0, g.O, V::first(g.o1 - o)});
  }
}

// y[0, n) += a0 * b0[0, n) + a1 * b1[0, n) + a2 * b2[0, n) + a3 * b3[0, n): four kept rows of B
// streamed at once, y stays in L1.
template <class V, typename BT>
NM_SPARSE_GEMM_TARGET inline void stream4(float* y, const BT* b0, const BT* b1, const BT* b2, const BT* b3, float a0,
                                          float a1, float a2, float a3, int64_t n) {
  constexpr int L = V::kLanes;
  const typename V::Vec v0 = V::set1(a0), v1 = V::set1(a1), v2 = V::set1(a2), v3 = V::set1(a3);
  int64_t c = 0;
  for (; c + 2 * L <= n; c += 2 * L) {
    typename V::Vec p = V::load(y + c), q = V::load(y + c + L);
    p = V::fmadd(v0, V::load(b0 + c), p);
    q = V::fmadd(v0, V::load(b0 + c + L), q);
    p = V::fmadd(v1, V::load(b1 + c), p);
    q = V::fmadd(v1, V::load(b1 + c + L), q);
    p = V::fmadd(v2, V::load(b2 + c), p);
    q = V::fmadd(v2, V::load(b2 + c + L), q);
    p = V::fmadd(v3, V::load(b3 + c), p);
    q = V::fmadd(v3, V::load(b3 + c + L), q);
    V::store(y + c, p);
    V::store(y + c + L, q);
  }
  for (; c < n; c += L) {
    const typename V::Mask m = V::first(n - c);
    typename V::Vec p = V::load(y + c, m);
    p = V::fmadd(v0, V::load(b0 + c, m), p);
    p = V::fmadd(v1, V::load(b1 + c, m), p);
    p = V::fmadd(v2, V::load(b2 + c, m), p);
    p = V::fmadd(v3, V::load(b3 + c, m), p);
    V::store(y + c, m, p);
  }
}

// y[0, n) += a * b[0, n): one kept row (the last 1..3 of a token's block).
template <class V, typename BT>
NM_SPARSE_GEMM_TARGET inline void stream1(float* y, const BT* b, float a, int64_t n) {
  const typename V::Vec v = V::set1(a);
  for (int64_t c = 0; c < n; c += V::kLanes) {
    const typename V::Mask m = V::first(n - c);
    V::store(y + c, m, V::fmadd(v, V::load(b + c, m), V::load(y + c, m)));
  }
}

template <class V, typename BT>
NM_SPARSE_GEMM_TARGET void stream(const GemmBlock& g, const BT* Bfull, int64_t jb) {
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
        stream4<V>(y, B + k0 * O, B + k1 * O, B + k2 * O, B + k3 * O, x[k0], x[k1], x[k2], x[k3], n);
      }
      for (; j < j1; ++j) stream1<V>(y, B + id[j] * O, x[id[j]], n);
    }
  }
}

// The entry points of one ISA (sparse_gemm_internal.h), B as float32 or float16 bits.
template <class V>
NM_SPARSE_GEMM_TARGET void stream_any(const GemmBlock& g, int64_t jb) {
  if (g.Bh)
    stream<V>(g, g.Bh, jb);
  else
    stream<V>(g, g.B, jb);
}

template <class V, int R, int NV, int64_t JB>
NM_SPARSE_GEMM_TARGET void block_any(const GemmBlock& g) {
  if (g.Bh)
    run<V, R, NV>(g, g.Bh, JB);
  else
    run<V, R, NV>(g, g.B, JB);
}

}  // namespace
}  // namespace detail
}  // namespace nm_onnx

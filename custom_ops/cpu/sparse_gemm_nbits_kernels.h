// The quantized sparse GEMM kernel over kept rows (decode), written once for AVX2 and AVX-512.
//
// Included by sparse_gemm_nbits_avx2.cc and sparse_gemm_nbits_avx512.cc, each after defining
//   NM_NBITS_TARGET  the function target attribute of its ISA, and
//   a traits type V (same unnamed namespace): L (float lanes), NP / NP_SYM (vector pieces per register tile
//   with / without zero points), the
//   GCC vector types vf (L floats), vi (L int32), load_bytes(p) (L bytes zero-extended to int32: one vpmovzxbd;
//   GCC's __builtin_convertvector of a byte vector compiles to scalar inserts), fma(a, b, c) = a * b + c fused (the
//   library is built with -ffp-contract=off, so a * b + c would round twice), zip_lo / zip_hi (interleave
//   the first / second halves of two vectors: even and odd columns back into column order).
// Everything lies in an unnamed namespace (one copy per ISA file, no standard-library templates).
//
// Per K block (block_size rows sharing one scale and zero point per column) and register tile of columns:
//   acc[o] = sum over the token's kept k in the block of x[k] * (q[k, o] - zp[o])   (NA vectors in registers)
//   y[o]  += scale[o] * acc[o]                                                     (once per block)
// q - zp is exact in float32: the byte (or nibble) q is OR-ed into the mantissa of 2^23 (the float 2^23 + q)
// and 2^23 + zp subtracted. A 4-bit piece is L bytes: the low nibbles are the even columns, the high nibbles
// the odd ones, kept in separate accumulators and interleaved once per block. Every product is a kept x
// times the exact q - zp, so an inf or NaN in x propagates as in the reference's x * ((q - zp) * scale).
// Loop order: K block, token, column tile (wide chunks: each kept row is read as one long contiguous run;
// the driver splits K, not the columns, between threads when O is narrow).
#pragma once
#include <cstdint>

#include "sparse_gemm_nbits_internal.h"

#ifndef NM_NBITS_TARGET
#error "define NM_NBITS_TARGET (the ISA's target attribute) before including sparse_gemm_nbits_kernels.h"
#endif

namespace nm_onnx {
namespace detail {
namespace {

constexpr uint32_t kMagic = 0x4B000000u;  // the float 2^23
constexpr float kMagicF = 8388608.0f;

template <class V>
NM_NBITS_TARGET inline typename V::vi load_bytes(const uint8_t* p) {
  return V::load_bytes(p);
}

template <class V>
NM_NBITS_TARGET inline typename V::vf as_magic(typename V::vi q) {  // 2^23 + q (q < 2^23)
  return reinterpret_cast<typename V::vf>(q | static_cast<int32_t>(kMagic));
}

template <class V>
NM_NBITS_TARGET inline typename V::vf loadf(const float* p) {
  typename V::vf v;
  __builtin_memcpy(&v, p, sizeof v);
  return v;
}

template <class V>
NM_NBITS_TARGET inline void storef(float* p, typename V::vf v) {
  __builtin_memcpy(p, &v, sizeof v);
}

// One register tile of NP pieces starting at column c (4-bit: 2L columns per piece, 8-bit: L) for kept
// entries [j0, j1) of one token in K block `blk`: y[c ..) += scale * sum x * (q - zp).
// The same columns of the token's kept rows in the next K block (id[j + (j1 - j0)], j < jend) are prefetched
// one block ahead: the tile reads one cache line of each of ~16 rows, too short a run for the hardware
// prefetchers when rows are a few KiB apart.
template <class V, int BITS, bool SYM, int NP>
NM_NBITS_TARGET inline void tile(const NBitsWeight& W, const float* x, const int32_t* id, int64_t j0, int64_t j1,
                                 int64_t jend, int64_t blk, float* y, int64_t c) {
  using vf = typename V::vf;
  using vi = typename V::vi;
  constexpr int L = V::L;
  constexpr int NA = BITS == 4 ? 2 * NP : NP;
  const int64_t width = W.width();
  const int64_t bo = c * BITS / 8;  // byte offset of column c in a packed row
  vf zpv[NA], acc[NA];
  if (!SYM) {
    const uint8_t* zr = W.zero_points + blk * width + bo;
#pragma GCC unroll 16
    for (int p = 0; p < NP; ++p) {
      const vi z = load_bytes<V>(zr + p * L);
      if (BITS == 4) {
        zpv[2 * p] = as_magic<V>(z & 15);
        zpv[2 * p + 1] = as_magic<V>(z >> 4);
      } else {
        zpv[p] = as_magic<V>(z);
      }
    }
  } else {
#pragma GCC unroll 16
    for (int a = 0; a < NA; ++a) zpv[a] = V::set1(kMagicF + static_cast<float>(1 << (BITS - 1)));
  }
#pragma GCC unroll 16
  for (int a = 0; a < NA; ++a) acc[a] = vf{};
  const uint8_t* B = W.b + bo;
  const int64_t ahead = j1 - j0;
  for (int64_t j = j0; j < j1; ++j) {
    const int64_t k = id[j];
    if (j + ahead < jend) {
      const uint8_t* next = B + static_cast<int64_t>(id[j + ahead]) * width;
#pragma GCC unroll 4
      for (int line = 0; line < NP * L; line += 64) __builtin_prefetch(next + line, 0, 2);
    }
    const vf xv = V::set1(x[k]);
    const uint8_t* row = B + k * width;
#pragma GCC unroll 16
    for (int p = 0; p < NP; ++p) {
      const vi q = load_bytes<V>(row + p * L);
      if (BITS == 4) {
        acc[2 * p] = V::fma(xv, as_magic<V>(q & 15) - zpv[2 * p], acc[2 * p]);
        acc[2 * p + 1] = V::fma(xv, as_magic<V>(q >> 4) - zpv[2 * p + 1], acc[2 * p + 1]);
      } else {
        acc[p] = V::fma(xv, as_magic<V>(q) - zpv[p], acc[p]);
      }
    }
  }
  const float* s = W.scales + blk * W.O;
#pragma GCC unroll 16
  for (int p = 0; p < NP; ++p) {
    if (BITS == 4) {
      const int64_t o = c + p * 2 * L;
      const vf lo = V::zip_lo(acc[2 * p], acc[2 * p + 1]), hi = V::zip_hi(acc[2 * p], acc[2 * p + 1]);
      storef<V>(y + o, V::fma(loadf<V>(s + o), lo, loadf<V>(y + o)));
      storef<V>(y + o + L, V::fma(loadf<V>(s + o + L), hi, loadf<V>(y + o + L)));
    } else {
      const int64_t o = c + p * L;
      storef<V>(y + o, V::fma(loadf<V>(s + o), acc[p], loadf<V>(y + o)));
    }
  }
}

// SYM: no zero points (one constant 2^23 + 2^(bits-1) instead of NA loaded vectors), tiles of V::NP_SYM pieces.
// Measured at T = 1 (benchmarks/sparse_nbits.py): 8 pieces on AVX-512 (two lines of each row per pass, the
// zero-point registers freed) was 10-25% slower than 4, so both are 4 there.
template <class V, int BITS, bool SYM>
NM_NBITS_TARGET void chunk(const NBitsBlock& g) {
  constexpr int NP = SYM ? V::NP_SYM : V::NP;
  constexpr int64_t CP = BITS == 4 ? 2 * V::L : V::L;  // columns of one piece
  constexpr int64_t CT = CP * NP;                      // columns of one register tile
  constexpr int64_t kTokens = 16;
  const NBitsWeight& W = *g.W;
  const int64_t O = W.O, K = W.K, bs = W.block_size, kept = g.kept;
  for (int64_t t = g.t0; t < g.t1; ++t)
    for (int64_t o = g.o0; o < g.o1; ++o) g.Y[t * O + o] = 0.0f;
  for (int64_t t0 = g.t0; t0 < g.t1; t0 += kTokens) {
    const int64_t t1 = t0 + kTokens < g.t1 ? t0 + kTokens : g.t1;
    int64_t cursor[kTokens];
    for (int64_t t = t0; t < t1; ++t) cursor[t - t0] = first_at_or_after(g.idx + t * kept, kept, g.blk0 * bs);
    for (int64_t blk = g.blk0; blk < g.blk1; ++blk) {
      const int64_t k1 = (blk + 1) * bs;
      for (int64_t t = t0; t < t1; ++t) {
        const int32_t* id = g.idx + t * kept;
        const int64_t j0 = cursor[t - t0];
        int64_t j1 = j0;
        while (j1 < kept && id[j1] < k1) ++j1;
        cursor[t - t0] = j1;
        if (j1 == j0) continue;
        const float* x = g.X + t * K;
        float* y = g.Y + t * O;
        int64_t c = g.o0;
        for (; c + CT <= g.o1; c += CT) tile<V, BITS, SYM, NP>(W, x, id, j0, j1, kept, blk, y, c);
        for (; c + CP <= g.o1; c += CP) tile<V, BITS, SYM, 1>(W, x, id, j0, j1, kept, blk, y, c);
        if (c < g.o1) nbits_block_cols_scalar(W, x, id, j0, j1, blk, y, c, g.o1);
      }
    }
  }
}

template <class V>
NM_NBITS_TARGET void chunk_any(const NBitsBlock& g) {
  const bool sym = g.W->zero_points == nullptr;
  if (g.W->bits == 4)
    sym ? chunk<V, 4, true>(g) : chunk<V, 4, false>(g);
  else
    sym ? chunk<V, 8, true>(g) : chunk<V, 8, false>(g);
}

}  // namespace
}  // namespace detail
}  // namespace nm_onnx

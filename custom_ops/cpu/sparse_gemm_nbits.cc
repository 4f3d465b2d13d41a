// Sparse GEMM over the kept rows of a block-quantized weight (see sparse_gemm_nbits.h): work split, ISA
// dispatch, the scalar kernel, and the prefill path.
//
// Decode (T <= 16 tokens): Y is split into column chunks of up to 16384 columns (a multiple of 128) and, when
// that gives fewer than two tasks, K into parts of whole blocks (split-K, partial sums added at the end), each
// run by the best kernel this CPU supports (sparse_gemm_nbits_kernels.h: AVX-512,
// AVX2; or the scalar one here), capped by NM_ONNX_SPARSE_GEMM_ISA like the float sparse GEMM.
// Prefill (more tokens): column tiles of 512 of W are dequantized to float32 exactly as the reference does
// ((q - zp) * scale, one rounding) and multiplied by the float sparse GEMM's register-tiled kernel.
#include "sparse_gemm_nbits.h"

#include <algorithm>
#include <vector>

#include "sparse_gemm_internal.h"
#include "sparse_gemm_nbits_internal.h"

namespace nm_onnx {
namespace detail {

namespace {
inline int q_at(const uint8_t* row, int64_t c, int bits) {
  if (bits == 8) return row[c];
  const uint8_t byte = row[c >> 1];
  return (c & 1) ? byte >> 4 : byte & 15;
}
}  // namespace

void nbits_block_cols_scalar(const NBitsWeight& W, const float* x, const int32_t* id, int64_t j0, int64_t j1,
                             int64_t blk, float* y, int64_t c0, int64_t c1) {
  constexpr int64_t kTile = 64;
  const int64_t width = W.width();
  const float* s = W.scales + blk * W.O;
  const uint8_t* zr = W.zero_points ? W.zero_points + blk * width : nullptr;
  const int zdef = 1 << (W.bits - 1);
  for (int64_t c = c0; c < c1; c += kTile) {
    const int64_t n = std::min(kTile, c1 - c);
    float acc[kTile], zp[kTile];
    for (int64_t i = 0; i < n; ++i) {
      acc[i] = 0.0f;
      zp[i] = static_cast<float>(zr ? q_at(zr, c + i, W.bits) : zdef);
    }
    for (int64_t j = j0; j < j1; ++j) {
      const float xv = x[id[j]];
      const uint8_t* row = W.b + static_cast<int64_t>(id[j]) * width;
      for (int64_t i = 0; i < n; ++i) acc[i] += xv * (static_cast<float>(q_at(row, c + i, W.bits)) - zp[i]);
    }
    for (int64_t i = 0; i < n; ++i) y[c + i] += s[c + i] * acc[i];
  }
}

void sparse_gemm_nbits_chunk_scalar(const NBitsBlock& g) {
  const NBitsWeight& W = *g.W;
  const int64_t O = W.O, K = W.K, bs = W.block_size;
  (void)K;
  for (int64_t t = g.t0; t < g.t1; ++t) {
    float* y = g.Y + t * O;
    std::fill(y + g.o0, y + g.o1, 0.0f);
    const int32_t* id = g.idx + t * g.kept;
    int64_t j0 = first_at_or_after(id, g.kept, g.blk0 * bs);
    for (int64_t blk = g.blk0; blk < g.blk1 && j0 < g.kept; ++blk) {
      int64_t j1 = j0;
      while (j1 < g.kept && id[j1] < (blk + 1) * bs) ++j1;
      if (j1 > j0) nbits_block_cols_scalar(W, g.X + t * K, id, j0, j1, blk, y, g.o0, g.o1);
      j0 = j1;
    }
  }
}

namespace {

using ChunkFn = void (*)(const NBitsBlock&);

ChunkFn pick_chunk() {
  switch (sparse_gemm_isa()) {
    case 2: return sparse_gemm_nbits_chunk_avx512;
    case 1: return sparse_gemm_nbits_chunk_avx2;
    default: return sparse_gemm_nbits_chunk_scalar;
  }
}

constexpr int64_t kSmallT = 16;      // up to this many tokens: the decode kernel
constexpr int64_t kMaxChunk = 16384;  // widest column chunk of the decode kernel
constexpr int64_t kTasks = 2;         // at least this many decode tasks (two threads)
constexpr int64_t kAlign = 128;      // chunk boundaries (whole bytes and vector tiles in every layout)
constexpr int64_t kTileCols = 512;   // prefill: columns of W dequantized at once

int64_t round_up(int64_t v, int64_t to) { return (v + to - 1) / to * to; }

// W[:, o0:o0+n) as float32 [K, n]: (q - zp) * scale, exactly the reference's dequantization.
void dequantize_cols(const NBitsWeight& W, int64_t o0, int64_t n, float* out, const ParallelFor& pf) {
  const int64_t width = W.width();
  const int zdef = 1 << (W.bits - 1);
  pf(static_cast<std::ptrdiff_t>(W.K), [&](std::ptrdiff_t k0, std::ptrdiff_t k1) {
    for (std::ptrdiff_t k = k0; k < k1; ++k) {
      const int64_t blk = k / W.block_size;
      const uint8_t* row = W.b + k * width;
      const uint8_t* zr = W.zero_points ? W.zero_points + blk * width : nullptr;
      const float* s = W.scales + blk * W.O + o0;
      float* dst = out + k * n;
      for (int64_t i = 0; i < n; ++i) {
        const float q = static_cast<float>(q_at(row, o0 + i, W.bits));
        const float z = static_cast<float>(zr ? q_at(zr, o0 + i, W.bits) : zdef);
        dst[i] = (q - z) * s[i];
      }
    }
  });
}

}  // namespace
}  // namespace detail

void sparse_gemm_nbits(const float* X, const int32_t* idx, int64_t T, int64_t kept, const NBitsWeight& W, float* Y,
                       const ParallelFor& parallel_for) {
  using namespace detail;
  const int64_t O = W.O, K = W.K;
  if (T <= 0 || O <= 0) return;
  if (T <= kSmallT) {
    // Column chunks as wide as possible (each kept row one long contiguous run: measured 1.2-1.3x faster
    // than two half-width chunks at T = 1), and K split into parts (whole blocks) so that there are at
    // least kTasks tasks; part s > 0 writes its own partial Y, added in part order at the end.
    static const ChunkFn chunk_fn = pick_chunk();
    const int64_t blocks = W.blocks();
    const int64_t n_col = (O + kMaxChunk - 1) / kMaxChunk;
    const int64_t chunk = round_up((O + n_col - 1) / n_col, kAlign);
    const int64_t n_k = std::max<int64_t>(1, std::min(blocks, (kTasks + n_col - 1) / n_col));
    std::vector<float> part(static_cast<size_t>((n_k - 1) * T * O));
    parallel_for(static_cast<std::ptrdiff_t>(n_col * n_k), [&](std::ptrdiff_t begin, std::ptrdiff_t end) {
      for (std::ptrdiff_t task = begin; task < end; ++task) {
        const int64_t c = task % n_col, s = task / n_col;
        float* y = s == 0 ? Y : part.data() + (s - 1) * T * O;
        const NBitsBlock g{X, idx, &W, y, kept, 0, T, c * chunk, std::min(O, (c + 1) * chunk),
                           blocks * s / n_k, blocks * (s + 1) / n_k};
        chunk_fn(g);
      }
    });
    if (n_k > 1)
      parallel_for(static_cast<std::ptrdiff_t>(T), [&](std::ptrdiff_t t0, std::ptrdiff_t t1) {
        for (int64_t s = 1; s < n_k; ++s)
          for (std::ptrdiff_t t = t0; t < t1; ++t) {
            const float* p = part.data() + (s - 1) * T * O + t * O;
            float* y = Y + t * O;
            for (int64_t o = 0; o < O; ++o) y[o] += p[o];
          }
      });
    return;
  }
  const int64_t tile = std::min(O, kTileCols);
  std::vector<float> wt(static_cast<size_t>(K * tile)), yt(static_cast<size_t>(T * tile));
  for (int64_t o0 = 0; o0 < O; o0 += tile) {
    const int64_t n = std::min(tile, O - o0);
    dequantize_cols(W, o0, n, wt.data(), parallel_for);
    sparse_gemm(X, idx, T, K, kept, Weight{wt.data(), nullptr}, n, yt.data(), parallel_for);
    parallel_for(static_cast<std::ptrdiff_t>(T), [&](std::ptrdiff_t t0, std::ptrdiff_t t1) {
      for (std::ptrdiff_t t = t0; t < t1; ++t) std::copy(yt.data() + t * n, yt.data() + (t + 1) * n, Y + t * O + o0);
    });
  }
}

}  // namespace nm_onnx

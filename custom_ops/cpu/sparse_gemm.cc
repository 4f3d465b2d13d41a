// Sparse GEMM over the kept rows of B (see sparse_gemm.h): work split and ISA dispatch.
//
// Decode (T <= 16 tokens): Y is split into a few wide column chunks (long contiguous runs of each
// kept row of B, which is what keeps a memory-bound GEMV at full bandwidth) and each token's kept
// rows stream through its L1-resident piece of Y, four rows at a time. One token over narrow rows
// (O <= 4096) splits the kept rows in two halves instead, each over the full width into its own y:
// whole rows, one ascending walk per half (benchmarks/RESULTS.md, "Decode of narrow rows"). Prefill (more tokens):
// register tiles of Y over column blocks of 256 and token blocks of 256. Each block runs the best
// kernel this CPU supports (AVX-512 F/BW/VL, AVX2+FMA+F16C, scalar), chosen once at run time;
// NM_ONNX_SPARSE_GEMM_ISA=scalar|avx2|avx512 caps the choice (tests use it to cover every path on
// one machine); a request the CPU cannot run falls back to what it can.
#include "sparse_gemm.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "sparse_gemm_internal.h"

namespace nm_onnx {
namespace detail {

namespace {
inline float load_b(const float* b, int64_t o) { return b[o]; }
inline float load_b(const uint16_t* b, int64_t o) { return half_to_float(b[o]); }

template <typename BT>
void block_scalar(const GemmBlock& g, const BT* B) {
  for (int64_t t = g.t0; t < g.t1; ++t) {
    float* y = g.Y + t * g.O;
    for (int64_t o = g.o0; o < g.o1; ++o) y[o] = 0.0f;
    const float* x = g.X + t * g.K;
    const int32_t* id = g.idx + t * g.kept;
    for (int64_t j = 0; j < g.kept; ++j) {
      const float a = x[id[j]];
      const BT* b = B + static_cast<int64_t>(id[j]) * g.O;
      for (int64_t o = g.o0; o < g.o1; ++o) y[o] += a * load_b(b, o);
    }
  }
}
}  // namespace

void sparse_gemm_block_scalar(const GemmBlock& g) {
  if (g.Bh)
    block_scalar(g, g.Bh);
  else
    block_scalar(g, g.B);
}

void sparse_gemm_stream_scalar(const GemmBlock& g, int64_t /*jb*/) { sparse_gemm_block_scalar(g); }

namespace {

struct Kernels {
  void (*stream)(const GemmBlock&, int64_t);
  void (*block)(const GemmBlock&);
};

}  // namespace

int sparse_gemm_isa() {
  static const int isa = [] {
    __builtin_cpu_init();
    const bool has512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                        __builtin_cpu_supports("avx512vl");
    const bool has2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                      __builtin_cpu_supports("f16c");
    const char* want = std::getenv("NM_ONNX_SPARSE_GEMM_ISA");
    const bool any = want == nullptr || *want == '\0';
    const bool cap512 = any || std::strcmp(want, "avx512") == 0;
    const bool cap2 = cap512 || std::strcmp(want, "avx2") == 0;
    if (has512 && cap512) return 2;
    if (has2 && cap2) return 1;
    return 0;
  }();
  return isa;
}

namespace {

Kernels pick_kernels() {
  switch (sparse_gemm_isa()) {
    case 2: return {sparse_gemm_stream_avx512, sparse_gemm_block_avx512};
    case 1: return {sparse_gemm_stream_avx2, sparse_gemm_block_avx2};
    default: return {sparse_gemm_stream_scalar, sparse_gemm_block_scalar};
  }
}

constexpr int64_t kSmallT = 16;           // up to this many tokens: the streaming (decode) kernel
constexpr int64_t kMaxChunk = 8192;       // widest column chunk of the streaming kernel
constexpr int64_t kBlockBytes = 256 << 10;  // B rows one K block of the streaming kernel touches
constexpr int64_t kSplitMaxO = 4096;      // one token up to this width: kept rows split in two, not columns
constexpr int64_t kSplitMinRows = 16;     // ... when each half has at least this many rows

int64_t round_up(int64_t v, int64_t to) { return (v + to - 1) / to * to; }

}  // namespace
}  // namespace detail

void sparse_gemm(const float* X, const int32_t* idx, int64_t T, int64_t K, int64_t kept, Weight B,
                 int64_t O, float* Y, const ParallelFor& parallel_for) {
  using namespace detail;
  if (T <= 0 || O <= 0) return;
  static const Kernels kernels = pick_kernels();
  if (T == 1 && O <= kSplitMaxO && kept >= 2 * kSplitMinRows) {
    // One token, narrow rows (SmolLM2: 576-1536 floats): split the KEPT ROWS in two halves, each
    // streamed over the full width into its own y (then summed). Every pass over B is then one
    // ascending walk over whole rows, where column chunks would walk all kept rows twice in short
    // pieces (what a narrow GEMV's prefetching dislikes most); two halves keep two threads busy.
    thread_local std::vector<float> part;  // this (the calling) thread's; workers get its address
    part.resize(static_cast<size_t>(O));
    float* const tmp = part.data();
    const int64_t half = kept / 2;
    parallel_for(2, [&](std::ptrdiff_t begin, std::ptrdiff_t end) {
      for (std::ptrdiff_t p = begin; p < end; ++p) {
        const int64_t j0 = p == 0 ? 0 : half, j1 = p == 0 ? half : kept;
        float* y = p == 0 ? Y : tmp;
        const GemmBlock g{X, idx + j0, B.f32, B.f16, y, K, j1 - j0, O, 0, 1, 0, O};
        kernels.stream(g, j1 - j0);
      }
    });
    for (int64_t o = 0; o < O; ++o) Y[o] += tmp[o];
    return;
  }
  if (T <= kSmallT) {
    // At least two chunks (two threads), each as wide as possible, a multiple of 16 columns.
    const int64_t n_chunks = std::max<int64_t>(2, (O + kMaxChunk - 1) / kMaxChunk);
    const int64_t chunk = std::max<int64_t>(16, round_up((O + n_chunks - 1) / n_chunks, 16));
    const int64_t n_col = (O + chunk - 1) / chunk;
    // One token: no K blocking. Several: blocks of kept indices whose B rows fit in L2.
    const int64_t rows = std::max<int64_t>(4, kBlockBytes / (chunk * 4));
    const int64_t jb = T == 1 ? std::max<int64_t>(kept, 1)
                              : std::max<int64_t>(4, rows * kept / std::max<int64_t>(K, 1) / 4 * 4);
    parallel_for(static_cast<std::ptrdiff_t>(n_col), [&](std::ptrdiff_t begin, std::ptrdiff_t end) {
      for (std::ptrdiff_t c = begin; c < end; ++c) {
        const GemmBlock g{X, idx, B.f32, B.f16, Y, K, kept, O, 0, T, c * chunk, std::min(O, (c + 1) * chunk)};
        kernels.stream(g, jb);
      }
    });
    return;
  }
  constexpr int64_t kCols = 256, kRows = 256;
  const int64_t n_col = (O + kCols - 1) / kCols;
  const int64_t n_row = (T + kRows - 1) / kRows;
  parallel_for(static_cast<std::ptrdiff_t>(n_col * n_row), [&](std::ptrdiff_t begin, std::ptrdiff_t end) {
    for (std::ptrdiff_t task = begin; task < end; ++task) {
      const int64_t c = task % n_col, r = task / n_col;
      const GemmBlock g{X, idx, B.f32, B.f16, Y, K, kept, O, r * kRows, std::min(T, (r + 1) * kRows),
                        c * kCols, std::min(O, (c + 1) * kCols)};
      kernels.block(g);
    }
  });
}

}  // namespace nm_onnx

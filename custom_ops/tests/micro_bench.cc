// Microbenchmarks of the CPU row kernels without ONNX Runtime (kernel development only; the real
// benchmarks are benchmarks/*.py): the per-row statistics of row_stats.cc against the std::nth_element
// median they replaced, and NMMask per 16 entries with its data in L2 and in L3, next to memcpy.
// Checks the median against nth_element on every row it times. Build and run: custom_ops/tests/micro_bench.sh
// (NM_ONNX_ISA=avx2|base caps the variant, as in the library).
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "kernels.h"
#include "row_stats.h"

using namespace nm_onnx;
using Clock = std::chrono::steady_clock;

namespace {

double seconds(Clock::time_point a, Clock::time_point b) { return std::chrono::duration<double>(b - a).count(); }

// Clock estimate from a chain of dependent 1-cycle integer adds.
double ghz() {
  const long n = 400000000;
  long v = 0;
  const auto t = Clock::now();
  for (long i = 0; i < n; ++i) asm volatile("add $1, %0" : "+r"(v));
  return n / seconds(t, Clock::now()) / 1e9;
}

float nth_element_median(const float* x, int64_t K, std::vector<float>& s) {
  for (int64_t j = 0; j < K; ++j)
    if (std::isnan(x[j])) return NAN;
  s.assign(x, x + K);
  const int64_t r = (K - 1) / 2;
  std::nth_element(s.begin(), s.begin() + r, s.end());
  return s[r] + 0.0f;
}

const ParallelFor serial = [](std::ptrdiff_t n, const std::function<void(std::ptrdiff_t, std::ptrdiff_t)>& fn) {
  fn(0, n);
};

}  // namespace

int main() {
  const double f = ghz();
  std::printf("clock ~%.2f GHz (dependent adds)\n\n", f);
  std::mt19937 rng(1);
  std::normal_distribution<float> normal;

  std::printf("per-row statistics (256 random rows, fastest of 5 passes, us per row)\n");
  std::printf("%6s %12s %12s %16s %14s\n", "K", "nth_element", "bisection", "variance_factor", "kept_indices");
  for (int64_t K : {576, 1536, 4096, 11008}) {
    const int rows = 256;
    std::vector<float> x(rows * K), sorted;
    for (auto& v : x) v = normal(rng);
    std::vector<uint8_t> keep(K);
    for (int64_t j = 0; j < K; ++j) keep[j] = (j * 7 + j / 3) % 2;
    std::vector<uint32_t> scratch;
    std::vector<int32_t> ids(K + 16);
    double t_nth = 1e9, t_bis = 1e9, t_var = 1e9, t_kept = 1e9;
    volatile float sink = 0;
    for (int pass = 0; pass < 5; ++pass) {
      auto a = Clock::now();
      for (int t = 0; t < rows; ++t) sink = sink + nth_element_median(&x[t * K], K, sorted);
      auto b = Clock::now();
      for (int t = 0; t < rows; ++t) sink = sink + lower_median(&x[t * K], K, scratch);
      auto c = Clock::now();
      for (int t = 0; t < rows; ++t) sink = sink + variance_factor(&x[t * K], &x[t * K], keep.data(), K);
      auto d = Clock::now();
      for (int t = 0; t < rows; ++t) sink = sink + static_cast<float>(kept_indices(keep.data(), K, ids.data()));
      auto e = Clock::now();
      t_nth = std::min(t_nth, seconds(a, b));
      t_bis = std::min(t_bis, seconds(b, c));
      t_var = std::min(t_var, seconds(c, d));
      t_kept = std::min(t_kept, seconds(d, e));
    }
    for (int t = 0; t < rows; ++t) {
      const float want = nth_element_median(&x[t * K], K, sorted), got = lower_median(&x[t * K], K, scratch);
      if (std::memcmp(&want, &got, sizeof want) != 0) {
        std::printf("median mismatch at K=%ld row %d: %a vs %a\n", static_cast<long>(K), t, want, got);
        return 1;
      }
    }
    std::printf("%6ld %12.2f %12.2f %16.2f %14.2f\n", static_cast<long>(K), t_nth / rows * 1e6, t_bis / rows * 1e6,
                t_var / rows * 1e6, t_kept / rows * 1e6);
  }

  std::printf("\nNMMask float32, K = 4096, one thread: ns (cycles) per 16 entries; L2: 16 rows, fastest of 2000;"
              " L3: 512 rows (8 MiB), median of 300; memcpy of the same bytes\n");
  std::printf("%6s %14s %14s %14s %14s\n", "N:M", "mask L2", "memcpy L2", "mask L3", "memcpy L3");
  const int64_t K = 4096, T = 512;
  std::vector<float> x(T * K), y(T * K), z(T * K);
  for (auto& v : x) v = normal(rng);
  const int patterns[4][2] = {{2, 4}, {4, 8}, {8, 16}, {16, 32}};
  for (const auto& p : patterns) {
    double l2m = 1e9, l2c = 1e9;
    for (int r = 0; r < 2000; ++r) {
      auto a = Clock::now();
      nm_mask_f32(x.data(), 16, K, p[0], p[1], nullptr, nullptr, y.data(), serial);
      auto b = Clock::now();
      std::memcpy(z.data(), x.data(), 16 * K * sizeof(float));
      auto c = Clock::now();
      l2m = std::min(l2m, seconds(a, b));
      l2c = std::min(l2c, seconds(b, c));
    }
    std::vector<double> l3m, l3c;
    for (int r = 0; r < 300; ++r) {
      auto a = Clock::now();
      std::memcpy(z.data(), x.data(), T * K * sizeof(float));
      auto b = Clock::now();
      nm_mask_f32(x.data(), T, K, p[0], p[1], nullptr, nullptr, y.data(), serial);
      auto c = Clock::now();
      l3c.push_back(seconds(a, b));
      l3m.push_back(seconds(b, c));
    }
    std::sort(l3m.begin(), l3m.end());
    std::sort(l3c.begin(), l3c.end());
    const double v2 = 16 * K / 16.0, v3 = T * K / 16.0;  // vectors of 16 entries
    auto cell = [&](double s, double vecs) {
      static char buf[4][32];
      static int i = 0;
      char* out = buf[i++ % 4];
      std::snprintf(out, 32, "%.2f (%.1f)", s / vecs * 1e9, s / vecs * f * 1e9);
      return out;
    };
    std::printf("%3d:%-2d %14s %14s %14s %14s\n", p[0], p[1], cell(l2m, v2), cell(l2c, v2), cell(l3m[150], v3),
                cell(l3c[150], v3));
  }
  return 0;
}

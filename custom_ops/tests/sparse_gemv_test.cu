// Standalone check of the CUDA split-K sparse GEMV (custom_ops/cuda/sparse_gemv.cu) against a CPU
// float64 reference: keep mask -> indices, then float32 / float16 / bfloat16 weights, 1..16 tokens,
// odd O, 2:4 / 8:16 / 16:32, a kept NaN and a kept 0 meeting an inf weight.
// Build: nvcc -std=c++17 -arch=sm_80 sparse_gemv_test.cu ../cuda/sparse_gemv.cu -o sparse_gemv_test
// Exit status: 0 pass, 1 mismatch or CUDA error, 77 no CUDA device (skipped).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "../cuda/sparse_gemv.cuh"

namespace {

#define CHECK(call)                                                                      \
  do {                                                                                   \
    cudaError_t e_ = (call);                                                             \
    if (e_ != cudaSuccess) {                                                             \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #call, cudaGetErrorString(e_)); \
      std::exit(1);                                                                      \
    }                                                                                    \
  } while (0)

float round_to(float v, const float*) { return v; }
float round_to(float v, const __half*) { return __half2float(__float2half(v)); }
float round_to(float v, const __nv_bfloat16*) { return __bfloat162float(__float2bfloat16(v)); }
__half convert(float v, const __half*) { return __float2half(v); }
__nv_bfloat16 convert(float v, const __nv_bfloat16*) { return __float2bfloat16(v); }
float convert(float v, const float*) { return v; }

template <typename TB>
bool run_case(std::mt19937& rng, int T, int K, int O, int n, int m, bool specials) {
  std::normal_distribution<float> nd;
  std::vector<float> x(size_t(T) * K), bf(size_t(K) * O);
  std::vector<TB> b(size_t(K) * O);
  for (auto& v : x) v = nd(rng);
  for (size_t i = 0; i < bf.size(); ++i) {
    bf[i] = round_to(nd(rng), static_cast<const TB*>(nullptr));
    b[i] = convert(bf[i], static_cast<const TB*>(nullptr));
  }
  const int kept = K / m * n;
  std::vector<uint8_t> keep(size_t(T) * K, 0);
  std::vector<int> order(m);
  for (int t = 0; t < T; ++t)
    for (int g = 0; g < K / m; ++g) {  // keep a random n of each group of m
      for (int i = 0; i < m; ++i) order[i] = i;
      std::shuffle(order.begin(), order.end(), rng);
      for (int i = 0; i < n; ++i) keep[size_t(t) * K + g * m + order[i]] = 1;
    }
  if (specials) {
    int first = 0;
    while (!keep[first]) ++first;
    x[first] = NAN;  // row 0: a kept NaN
    int k0 = 0;
    while (!keep[size_t(T - 1) * K + k0]) ++k0;
    x[size_t(T - 1) * K + k0] = 0.0f;  // last row: a kept 0 ...
    bf[size_t(k0) * O] = INFINITY;  // ... meets an inf weight: NaN in column 0
    b[size_t(k0) * O] = convert(INFINITY, static_cast<const TB*>(nullptr));
  }
  float *dx, *dy;
  TB* db;
  uint8_t* dkeep;
  int32_t* didx;
  CHECK(cudaMalloc(&dx, x.size() * sizeof(float)));
  CHECK(cudaMalloc(&db, b.size() * sizeof(TB)));
  CHECK(cudaMalloc(&dy, size_t(T) * O * sizeof(float)));
  CHECK(cudaMalloc(&dkeep, keep.size()));
  CHECK(cudaMalloc(&didx, size_t(T) * kept * sizeof(int32_t)));
  CHECK(cudaMemcpy(dx, x.data(), x.size() * sizeof(float), cudaMemcpyHostToDevice));
  CHECK(cudaMemcpy(db, b.data(), b.size() * sizeof(TB), cudaMemcpyHostToDevice));
  CHECK(cudaMemcpy(dkeep, keep.data(), keep.size(), cudaMemcpyHostToDevice));
  CHECK(nm_onnx::cuda::keep_to_indices(dkeep, T, K, kept, didx, nullptr));
  CHECK(nm_onnx::cuda::sparse_gemv<TB>(dx, didx, T, K, kept, db, O, dy, nullptr));
  std::vector<float> y(size_t(T) * O);
  std::vector<int32_t> idx(size_t(T) * kept);
  CHECK(cudaMemcpy(y.data(), dy, y.size() * sizeof(float), cudaMemcpyDeviceToHost));
  CHECK(cudaMemcpy(idx.data(), didx, idx.size() * sizeof(int32_t), cudaMemcpyDeviceToHost));
  cudaFree(dx);
  cudaFree(db);
  cudaFree(dy);
  cudaFree(dkeep);
  cudaFree(didx);
  bool ok = true;
  for (int t = 0; t < T && ok; ++t) {
    int c = 0;
    for (int k = 0; k < K; ++k)
      if (keep[size_t(t) * K + k]) ok &= idx[size_t(t) * kept + c++] == k;
  }
  if (!ok) std::fprintf(stderr, "keep_to_indices mismatch T=%d K=%d\n", T, K);
  for (int t = 0; t < T && ok; ++t)
    for (int o = 0; o < O; ++o) {
      double ref = 0, mag = 0;
      for (int k = 0; k < K; ++k)
        if (keep[size_t(t) * K + k]) {
          ref += double(x[size_t(t) * K + k]) * bf[size_t(k) * O + o];
          mag += std::fabs(double(x[size_t(t) * K + k]) * bf[size_t(k) * O + o]);
        }
      const float got = y[size_t(t) * O + o];
      const bool bad = std::isnan(ref) ? !std::isnan(got) : !(std::fabs(got - ref) <= 1e-5 * mag + 1e-30);
      if (bad) {
        std::fprintf(stderr, "mismatch T=%d K=%d O=%d %d:%d at (%d,%d): %g vs %g\n", T, K, O, n, m, t, o, got, ref);
        ok = false;
        break;
      }
    }
  return ok;
}

}  // namespace

int main() {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("no CUDA device: skipped\n");
    return 77;
  }
  std::mt19937 rng(0);
  const int pats[3][2] = {{2, 4}, {8, 16}, {16, 32}};
  const int tokens[] = {1, 2, 5, 16};
  bool ok = true;
  int cases = 0;
  for (int T : tokens)
    for (auto& p : pats)
      for (int O : {1, 513, 1031, 4096}) {
        const int K = p[1] * (T == 16 ? 40 : 150);
        const bool specials = O == 1031;
        ok &= run_case<float>(rng, T, K, O, p[0], p[1], specials);
        ok &= run_case<__half>(rng, T, K, O, p[0], p[1], specials);
        ok &= run_case<__nv_bfloat16>(rng, T, K, O, p[0], p[1], specials);
        cases += 3;
      }
  std::printf("%s: %d cases\n", ok ? "ok" : "FAILED", cases);
  return ok ? 0 : 1;
}

// C entry point to the CPU sparse GEMM for the standalone harness (ctypes): no ORT needed.
//
// Lets custom_ops/tests/harness.py check every ISA kernel against numpy and time it against ORT's
// dense MatMul before (and independently of) the full op library. `threads` plain std::threads
// stand in for ORT's intra-op pool.
#include <algorithm>
#include <thread>
#include <vector>

#include "../cpu/sparse_gemm.h"

extern "C" void nm_sparse_gemm_f32(const float* X, const int32_t* idx, int64_t T, int64_t K, int64_t kept,
                                   const float* B, int64_t O, float* Y, int threads) {
  nm_onnx::ParallelFor pf = [threads](std::ptrdiff_t n,
                                      const std::function<void(std::ptrdiff_t, std::ptrdiff_t)>& fn) {
    const std::ptrdiff_t nt = std::min<std::ptrdiff_t>(std::max(threads, 1), n);
    if (nt <= 1) {
      fn(0, n);
      return;
    }
    std::vector<std::thread> pool;
    for (std::ptrdiff_t i = 1; i < nt; ++i)
      pool.emplace_back([&, i] { fn(n * i / nt, n * (i + 1) / nt); });
    fn(0, n / nt);
    for (auto& th : pool) th.join();
  };
  nm_onnx::sparse_gemm_f32(X, idx, T, K, kept, B, O, Y, pf);
}

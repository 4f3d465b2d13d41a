// The instruction set the CPU kernels may use: the best this CPU supports, capped by $NM_ONNX_ISA.
//
// NM_ONNX_ISA=avx2|base lowers the choice (the tests run every variant on one machine); the answer
// is read once per process. The sparse GEMM has its own cap (NM_ONNX_SPARSE_GEMM_ISA, sparse_gemm.cc).
#pragma once
#include <cstdlib>
#include <cstring>

namespace nm_onnx {

enum class Isa { kBase = 0, kAvx2 = 1, kAvx512 = 2 };

inline Isa cpu_isa() {
  static const Isa isa = [] {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    const char* cap = std::getenv("NM_ONNX_ISA");
    if (cap && std::strcmp(cap, "base") == 0) return Isa::kBase;
    const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                        __builtin_cpu_supports("avx512vl");
    if (avx512 && !(cap && std::strcmp(cap, "avx2") == 0)) return Isa::kAvx512;
    if (__builtin_cpu_supports("avx2")) return Isa::kAvx2;
#endif
    return Isa::kBase;
  }();
  return isa;
}

// The variant of a kernel for cpu_isa(): by_isa(f_avx512, f_avx2, f_base).
template <typename F>
F by_isa(F avx512, F avx2, F base) {
  switch (cpu_isa()) {
    case Isa::kAvx512: return avx512;
    case Isa::kAvx2: return avx2;
    default: return base;
  }
}

}  // namespace nm_onnx

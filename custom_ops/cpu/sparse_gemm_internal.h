// Internal interface between the sparse GEMM driver (sparse_gemm.cc) and its per-ISA kernels.
//
// Each ISA file compiles its kernels with function-level target attributes, so the library needs
// no special compile flags and the driver only calls a kernel after checking the CPU supports it.
// The kernel files use no standard-library templates, so no AVX code can leak into shared
// inline functions (an ODR merge could otherwise run AVX-512 code on an AVX2-only CPU).
#pragma once
#include <cstdint>

namespace nm_onnx {
namespace detail {

// One block of work: Y[t, o] for t in [t0, t1), o in [o0, o1), reading all kept rows of each token.
// B is float32 (B) or float16 bits (Bh); the other pointer is null.
struct GemmBlock {
  const float* X;
  const int32_t* idx;
  const float* B;
  const uint16_t* Bh;
  float* Y;
  int64_t K, kept, O;
  int64_t t0, t1, o0, o1;
};

// Many tokens (prefill): register tiles of Y (sparse_gemm_kernels.h, written once for both ISAs).
void sparse_gemm_block_scalar(const GemmBlock& blk);
void sparse_gemm_block_avx2(const GemmBlock& blk);
void sparse_gemm_block_avx512(const GemmBlock& blk);

// Few tokens: y rows accumulated in L1 while groups of four kept rows of B stream through;
// kept indices in blocks of jb so rows shared by several tokens are still in cache.
void sparse_gemm_stream_scalar(const GemmBlock& blk, int64_t jb);
void sparse_gemm_stream_avx2(const GemmBlock& blk, int64_t jb);
void sparse_gemm_stream_avx512(const GemmBlock& blk, int64_t jb);

// The kernels' instruction set: 2 AVX-512 F/BW/VL, 1 AVX2+FMA+F16C, 0 scalar; the best this CPU supports,
// capped by NM_ONNX_SPARSE_GEMM_ISA=scalar|avx2|avx512 (read once per process; shared with sparse_gemm_nbits).
int sparse_gemm_isa();

// float16 bits -> float32 (exact; subnormals, infinities and NaN payloads kept).
inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1Fu, man = h & 0x3FFu, bits;
  if (exp == 0x1Fu) {
    bits = sign | 0x7F800000u | (man << 13);
  } else if (exp != 0) {
    bits = sign | ((exp + 112u) << 23) | (man << 13);
  } else if (man == 0) {
    bits = sign;
  } else {  // subnormal: normalise
    exp = 113;
    while ((man & 0x400u) == 0) {
      man <<= 1;
      --exp;
    }
    bits = sign | (exp << 23) | ((man & 0x3FFu) << 13);
  }
  float f;
  __builtin_memcpy(&f, &bits, sizeof f);
  return f;
}

}  // namespace detail
}  // namespace nm_onnx

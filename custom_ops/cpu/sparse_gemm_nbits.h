// Sparse GEMM over the kept rows of a block-quantized weight: the inner loop of NMSparseMatMulNBits on CPU.
//
// The weight is NMSparseMatMulNBits' K-major layout (nm_onnx/ops/nbits.py): row k of B holds q[k, 0..O)
// packed (4-bit: column 2j in the low nibble of byte j, 2j+1 in the high nibble; 8-bit: one byte each),
// and W[k, o] = (q[k, o] - zp[k / bs, o]) * scales[k / bs, o]. A token reads only its kept rows of B, so
// decode (memory bound) reads about n/m of the packed weight plus every row of scales.
#pragma once
#include <cstdint>

#include "sparse_gemm.h"  // ParallelFor

namespace nm_onnx {

struct NBitsWeight {
  const uint8_t* b = nullptr;            // [K, width] packed q
  const float* scales = nullptr;         // [blocks, O]
  const uint8_t* zero_points = nullptr;  // [blocks, width] packed like a row of B, or null (2^(bits-1))
  int64_t K = 0, O = 0;
  int bits = 4;                          // 4 or 8
  int64_t block_size = 32;               // a power of two >= 16
  int64_t width() const { return (O * bits + 7) / 8; }
  int64_t blocks() const { return (K + block_size - 1) / block_size; }
};

// Y[t, o] = sum over the kept k of row t: X[t, k] * W[k, o], for t in [0, T), o in [0, O); Y [T, O] float32
// (overwritten). X [T, K] (already shifted; only idx is used), idx [T, kept] ascending column indices per row.
// Few tokens (T <= 16): per K block and column piece, acc[o] = sum_{kept k in block} x[k] * (q[k, o] - zp[o])
// in registers, then y[o] += scale[o] * acc[o] (the scale row is read once per block). More tokens: column
// tiles of W dequantized to float32 and the float sparse GEMM (sparse_gemm.h). Same ISA cap as sparse_gemm
// (NM_ONNX_SPARSE_GEMM_ISA=scalar|avx2|avx512).
void sparse_gemm_nbits(const float* X, const int32_t* idx, int64_t T, int64_t kept, const NBitsWeight& W, float* Y,
                       const ParallelFor& parallel_for);

}  // namespace nm_onnx

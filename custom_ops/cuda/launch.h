// Host-callable launchers of the CUDA kernels (kernels.cu). No CUDA or ORT types here, so the ORT
// glue (ops_cuda.cc) is plain C++; the stream is ORT's compute stream (cudaStream_t as void*).
#pragma once
#include <cstdint>

#include "op_attrs.h"

namespace nm_onnx {
namespace cuda {

enum class DType { kF32 = 0, kF16 = 1, kBF16 = 2 };

// Each throws std::runtime_error on a CUDA error.
// Device pointers of the node's dtype dt; absent optional inputs are null.
void token_shift(DType dt, const void* x, void* xc, void* eta, int64_t T, int64_t K, const TokenShiftAttrs& a,
                 void* stream);
void nm_mask(DType dt, const void* x, const void* channel_scale, void* y, int64_t T, int64_t K, const NMMaskAttrs& a,
             void* stream);
void nm_sparse_matmul(DType dt, const void* x, const void* b, const void* channel_scale, const void* shift_bias,
                      const void* bias, void* y, int64_t T, int64_t K, int64_t O, const NMSparseMatMulAttrs& a,
                      void* stream);
// b, zero_points: uint8 (zero_points may be null), scales: float32; the rest of the node's dtype dt.
void nm_sparse_matmul_nbits(DType dt, const void* x, const uint8_t* b, const float* scales,
                            const uint8_t* zero_points, const void* channel_scale, const void* shift_bias,
                            const void* bias, void* y, int64_t T, int64_t K, int64_t O,
                            const NMSparseMatMulNBitsAttrs& a, void* stream);

}  // namespace cuda
}  // namespace nm_onnx

// CUDAExecutionProvider compute functions of TokenShift, NMMask, NMSparseMatMul and NMSparseMatMulNBits (float32, float16,
// bfloat16). Attributes and input shapes arrive validated (op_defs.h, shared with the CPU ops); the
// kernels (launch.h) run on ORT's compute stream.
#include "launch.h"
#include "op_defs.h"
#include "ops.h"

namespace nm_onnx {
namespace {

cuda::DType to_dtype(ONNXTensorElementDataType t) {
  switch (t) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: return cuda::DType::kF16;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16: return cuda::DType::kBF16;
    default: return cuda::DType::kF32;
  }
}

void token_shift(Ort::KernelContext& ctx, const TokenShiftAttrs& a, const TokenShiftDef::Shapes& s,
                 ONNXTensorElementDataType type) {
  auto xc = ctx.GetOutput(0, s.x.shape);
  auto eta = ctx.GetOutput(1, s.eta);
  cuda::token_shift(to_dtype(type), s.x.raw(), xc.GetTensorMutableRawData(), eta.GetTensorMutableRawData(), s.T,
                    s.K, a, ctx.GetGPUComputeStream());
}

void nm_mask(Ort::KernelContext& ctx, const NMMaskAttrs& a, const NMMaskDef::Shapes& s,
             ONNXTensorElementDataType type) {
  auto y = ctx.GetOutput(0, s.x.shape);
  cuda::nm_mask(to_dtype(type), s.x.raw(), s.channel_scale.raw(), y.GetTensorMutableRawData(), s.T, s.K, a,
                ctx.GetGPUComputeStream());
}

void nm_sparse_matmul(Ort::KernelContext& ctx, const NMSparseMatMulAttrs& a, const NMSparseMatMulDef::Shapes& s,
                      ONNXTensorElementDataType type) {
  auto y = ctx.GetOutput(0, s.y);
  cuda::nm_sparse_matmul(to_dtype(type), s.x.raw(), s.b.raw(), s.channel_scale.raw(), s.shift_bias.raw(),
                         s.bias.raw(), y.GetTensorMutableRawData(), s.T, s.K, s.O, a, ctx.GetGPUComputeStream());
}

void nm_sparse_matmul_nbits(Ort::KernelContext& ctx, const NMSparseMatMulNBitsAttrs& a,
                            const NMSparseMatMulNBitsDef::Shapes& s, ONNXTensorElementDataType type) {
  auto y = ctx.GetOutput(0, s.y);
  cuda::nm_sparse_matmul_nbits(to_dtype(type), s.x.raw(), s.b.data<uint8_t>(), s.scales.data<float>(),
                               s.zero_points.data<uint8_t>(), s.channel_scale.raw(), s.shift_bias.raw(), s.bias.raw(),
                               y.GetTensorMutableRawData(), s.T, s.K, s.O, a, ctx.GetGPUComputeStream());
}

using CudaOps = OpSet<token_shift, nm_mask, nm_sparse_matmul>;
using CudaNBitsOp = NBitsOp<nm_sparse_matmul_nbits>;

}  // namespace

void add_cuda_ops(Ort::CustomOpDomain& domain) {
  constexpr const char* kCuda = "CUDAExecutionProvider";
  static const CudaOps f32(ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, kCuda);
  static const CudaOps f16(ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16, kCuda);
  static const CudaOps bf16(ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16, kCuda);
  f32.add_to(domain);
  f16.add_to(domain);
  bf16.add_to(domain);
  static const CudaNBitsOp nbits_f32(ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, kCuda);
  static const CudaNBitsOp nbits_f16(ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16, kCuda);
  static const CudaNBitsOp nbits_bf16(ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16, kCuda);
  domain.Add(&nbits_f32);
  domain.Add(&nbits_f16);
  domain.Add(&nbits_bf16);
}

}  // namespace nm_onnx

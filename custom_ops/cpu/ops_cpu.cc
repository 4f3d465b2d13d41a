// CPU compute functions of TokenShift, NMMask, NMSparseMatMul and NMSparseMatMulNBits (float32 and float16; float16 is
// computed in float32, NMSparseMatMul's float16 weight is read as stored). Attributes and input shapes
// arrive validated (op_defs.h, shared with CUDA); the math is in kernels.cc and nm_select.h.
#include <cstring>
#include <type_traits>
#include <vector>

#include "kernels.h"
#include "op_defs.h"
#include "ops.h"

namespace nm_onnx {
namespace {

static_assert(sizeof(Ort::Float16_t) == 2, "Ort::Float16_t must be the 16 bits of an IEEE half");

// float32 view of an input: the data itself for float, a converted copy for float16; null when absent.
template <typename T>
const float* input_f32(const InputInfo& in, std::vector<float>& buf) {
  const T* p = in.data<T>();
  if constexpr (std::is_same_v<T, float>) {
    return p;
  } else {
    if (p == nullptr) return nullptr;
    buf.resize(static_cast<size_t>(in.size));
    for (size_t i = 0; i < buf.size(); ++i) buf[i] = p[i].ToFloat();
    return buf.data();
  }
}

inline void store(float* dst, const float* src, size_t n) {
  if (n) std::memcpy(dst, src, n * sizeof(float));
}
inline void store(Ort::Float16_t* dst, const float* src, size_t n) {
  for (size_t i = 0; i < n; ++i) dst[i] = Ort::Float16_t(src[i]);
}

template <typename T>
void token_shift(Ort::KernelContext& ctx, const TokenShiftAttrs& a, const TokenShiftDef::Shapes& s,
                 ONNXTensorElementDataType) {
  const int64_t T_ = s.T, K = s.K;
  std::vector<float> xb;
  const float* x = input_f32<T>(s.x, xb);
  T* xc = ctx.GetOutput(0, s.x.shape).template GetTensorMutableData<T>();
  T* eta_out = ctx.GetOutput(1, s.eta).template GetTensorMutableData<T>();
  std::vector<float> eta(static_cast<size_t>(T_)), xs(static_cast<size_t>(T_ * K));
  const ParallelFor pf = make_parallel_for(ctx);
  row_shifts(x, T_, K, a.mode, eta.data(), pf);
  pf(T_, [&](std::ptrdiff_t t0, std::ptrdiff_t t1) {
    for (std::ptrdiff_t t = t0; t < t1; ++t)
      for (int64_t j = 0; j < K; ++j) xs[t * K + j] = x[t * K + j] - eta[t];
  });
  store(xc, xs.data(), xs.size());
  store(eta_out, eta.data(), eta.size());
}

template <typename T>
void nm_mask(Ort::KernelContext& ctx, const NMMaskAttrs& a, const NMMaskDef::Shapes& s, ONNXTensorElementDataType) {
  const int64_t T_ = s.T, K = s.K;
  std::vector<float> xb, cb, colnorm;
  const float* x = input_f32<T>(s.x, xb);
  const float* cs = input_f32<T>(s.channel_scale, cb);
  const ParallelFor pf = make_parallel_for(ctx);
  if (a.criterion == Criterion::kClact) {
    colnorm.resize(static_cast<size_t>(K));
    column_norms(x, T_, K, colnorm.data(), pf);
  }
  const float* cn = a.criterion == Criterion::kClact ? colnorm.data() : nullptr;
  T* y = ctx.GetOutput(0, s.x.shape).template GetTensorMutableData<T>();
  if (s.x.size == 0) return;
  if constexpr (std::is_same_v<T, float>) {
    nm_mask_f32(x, T_, K, a.n, a.m, cs, cn, y, pf);
  } else {
    std::vector<uint8_t> keep(static_cast<size_t>(s.x.size));
    nm_keep_rows(x, T_, K, a.n, a.m, cs, cn, keep.data(), pf);
    const T* xin = s.x.data<T>();
    for (int64_t i = 0; i < s.x.size; ++i) y[i] = keep[i] ? xin[i] : T(0.0f);
  }
}

template <typename T>
void nm_sparse_matmul(Ort::KernelContext& ctx, const NMSparseMatMulAttrs& attrs, const NMSparseMatMulDef::Shapes& s,
                      ONNXTensorElementDataType) {
  std::vector<float> xb, cb, sb, ab;
  SparseMatMulArgs a{attrs, input_f32<T>(s.channel_scale, cb), input_f32<T>(s.shift_bias, sb),
                     input_f32<T>(s.bias, ab)};
  const float* x = input_f32<T>(s.x, xb);
  // B is read as stored (float16 rows converted as the GEMM loads them): converting the whole weight
  // here would cost more than the sparse GEMM saves.
  Weight b;
  if constexpr (std::is_same_v<T, float>)
    b.f32 = s.b.data<float>();
  else
    b.f16 = reinterpret_cast<const uint16_t*>(s.b.data<T>());
  T* y = ctx.GetOutput(0, s.y).template GetTensorMutableData<T>();
  const size_t ysize = static_cast<size_t>(s.T * s.O);
  if (ysize == 0) return;
  const ParallelFor pf = make_parallel_for(ctx);
  if constexpr (std::is_same_v<T, float>) {
    nm_sparse_matmul_f32(x, b, s.T, s.K, s.O, a, y, pf);
  } else {
    std::vector<float> y32(ysize);
    nm_sparse_matmul_f32(x, b, s.T, s.K, s.O, a, y32.data(), pf);
    store(y, y32.data(), ysize);
  }
}

// X, channel_scale, shift_bias and bias of the node's type (float16 converted to float32); B and zero_points
// uint8 and scales float32 as stored (the quantized weight is never converted as a whole).
template <typename T>
void nm_sparse_matmul_nbits(Ort::KernelContext& ctx, const NMSparseMatMulNBitsAttrs& attrs,
                            const NMSparseMatMulNBitsDef::Shapes& s, ONNXTensorElementDataType) {
  std::vector<float> xb, cb, sb, ab;
  SparseMatMulArgs a{attrs, input_f32<T>(s.channel_scale, cb), input_f32<T>(s.shift_bias, sb),
                     input_f32<T>(s.bias, ab)};
  const float* x = input_f32<T>(s.x, xb);
  NBitsWeight w;
  w.b = s.b.data<uint8_t>();
  w.scales = s.scales.data<float>();
  w.zero_points = s.zero_points.data<uint8_t>();
  w.K = s.K;
  w.O = s.O;
  w.bits = attrs.bits;
  w.block_size = attrs.block_size;
  T* y = ctx.GetOutput(0, s.y).template GetTensorMutableData<T>();
  const size_t ysize = static_cast<size_t>(s.T * s.O);
  if (ysize == 0) return;
  const ParallelFor pf = make_parallel_for(ctx);
  if constexpr (std::is_same_v<T, float>) {
    nm_sparse_matmul_nbits_f32(x, w, s.T, a, y, pf);
  } else {
    std::vector<float> y32(ysize);
    nm_sparse_matmul_nbits_f32(x, w, s.T, a, y32.data(), pf);
    store(y, y32.data(), ysize);
  }
}

template <typename T>
using CpuOps = OpSet<token_shift<T>, nm_mask<T>, nm_sparse_matmul<T>>;
template <typename T>
using CpuNBitsOp = NBitsOp<nm_sparse_matmul_nbits<T>>;

}  // namespace

void add_cpu_ops(Ort::CustomOpDomain& domain) {
  static const CpuOps<float> f32(ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, nullptr);
  static const CpuOps<Ort::Float16_t> f16(ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16, nullptr);
  f32.add_to(domain);
  f16.add_to(domain);
  static const CpuNBitsOp<float> nbits_f32(ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, nullptr);
  static const CpuNBitsOp<Ort::Float16_t> nbits_f16(ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16, nullptr);
  domain.Add(&nbits_f32);
  domain.Add(&nbits_f16);
}

}  // namespace nm_onnx

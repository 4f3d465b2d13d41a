// CPU registrations of TokenShift, NMMask and NMSparseMatMul (float32 and float16; float16 is
// computed in float32, NMSparseMatMul's float16 weight is read as stored). Validation happens here;
// the math is in kernels.cc and nm_select.h.
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

#include "kernels.h"
#include "ops.h"
#include "ort_glue.h"

namespace nm_onnx {
namespace {

template <typename T>
struct DType;
template <>
struct DType<float> {
  static constexpr ONNXTensorElementDataType kOnnx = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
};
static_assert(sizeof(Ort::Float16_t) == 2, "Ort::Float16_t must be the 16 bits of an IEEE half");
template <>
struct DType<Ort::Float16_t> {
  static constexpr ONNXTensorElementDataType kOnnx = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
};

// float32 view of an input: the data itself for float, a converted copy for float16.
inline const float* as_f32(const float* p, size_t, std::vector<float>&) { return p; }
inline const float* as_f32(const Ort::Float16_t* p, size_t n, std::vector<float>& buf) {
  buf.resize(n);
  for (size_t i = 0; i < n; ++i) buf[i] = p[i].ToFloat();
  return buf.data();
}
inline void store(float* dst, const float* src, size_t n) {
  if (n) std::memcpy(dst, src, n * sizeof(float));
}
inline void store(Ort::Float16_t* dst, const float* src, size_t n) {
  for (size_t i = 0; i < n; ++i) dst[i] = Ort::Float16_t(src[i]);
}

// Runs a kernel body; errors become ORT statuses, never exceptions across the C API.
template <typename F>
OrtStatusPtr guarded(const std::string& label, F&& body) {
  try {
    body();
    return nullptr;
  } catch (const OpError& e) {
    return Ort::GetApi().CreateStatus(ORT_INVALID_ARGUMENT, e.what());
  } catch (const std::exception& e) {
    return Ort::GetApi().CreateStatus(ORT_FAIL, (label + ": " + e.what()).c_str());
  }
}

template <typename T>
const float* input_f32(Ort::KernelContext& ctx, size_t i, const InputInfo& info, std::vector<float>& buf) {
  if (!info.has) return nullptr;
  const T* p = ctx.GetInput(i).GetTensorData<T>();
  return as_f32(p, static_cast<size_t>(info.size), buf);
}

// ---------------------------------------------------------------------------------------------- TokenShift
template <typename T>
struct TokenShiftKernel {
  OrtStatusPtr ComputeV2(OrtKernelContext* ctx) { return guarded(label, [&] { compute(ctx); }); }
  std::string label;
  Shift mode = Shift::kMedian;
  void compute(OrtKernelContext* context) {
    Ort::KernelContext ctx(context);
    const InputInfo xi = input_info(ctx, 0);
    int64_t T_ = 0, K = 0;
    check_x(label, xi, 0, &T_, &K);
    std::vector<float> xb;
    const float* x = input_f32<T>(ctx, 0, xi, xb);
    std::vector<int64_t> eshape = xi.shape;
    eshape.back() = 1;
    T* xc = ctx.GetOutput(0, xi.shape).template GetTensorMutableData<T>();
    T* eta_out = ctx.GetOutput(1, eshape).template GetTensorMutableData<T>();
    std::vector<float> eta(static_cast<size_t>(T_)), xs(static_cast<size_t>(T_ * K));
    const ParallelFor pf = make_parallel_for(ctx);
    row_shifts(x, T_, K, mode, eta.data(), pf);
    pf(T_, [&](std::ptrdiff_t t0, std::ptrdiff_t t1) {
      for (std::ptrdiff_t t = t0; t < t1; ++t)
        for (int64_t j = 0; j < K; ++j) xs[t * K + j] = x[t * K + j] - eta[t];
    });
    store(xc, xs.data(), xs.size());
    store(eta_out, eta.data(), eta.size());
  }
};

template <typename T>
struct TokenShiftCpu : Ort::CustomOpBase<TokenShiftCpu<T>, TokenShiftKernel<T>, true> {
  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** out) const {
    try {
      auto k = std::make_unique<TokenShiftKernel<T>>();
      k->label = node_label("TokenShift", node_name(info));
      k->mode = parse_shift(k->label, "mode", attr_string(info, "mode", "median"), false);
      *out = k.release();
      return nullptr;
    } catch (const std::exception& e) {
      return to_status(api, e, ORT_INVALID_ARGUMENT);
    }
  }
  const char* GetName() const { return "TokenShift"; }
  size_t GetInputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetInputType(size_t) const { return DType<T>::kOnnx; }
  size_t GetOutputTypeCount() const { return 2; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return DType<T>::kOnnx; }
};

// ---------------------------------------------------------------------------------------------- NMMask
template <typename T>
struct NMMaskKernel {
  OrtStatusPtr ComputeV2(OrtKernelContext* ctx) { return guarded(label, [&] { compute(ctx); }); }
  std::string label;
  int n = 0, m = 1;
  Criterion criterion = Criterion::kMagnitude;
  void compute(OrtKernelContext* context) {
    Ort::KernelContext ctx(context);
    const InputInfo xi = input_info(ctx, 0), ci = input_info(ctx, 1);
    int64_t T_ = 0, K = 0;
    check_x(label, xi, m, &T_, &K);
    check_vector(label, "channel_scale", ci, K, "one factor per input feature");
    std::vector<float> xb, cb, colnorm;
    const float* x = input_f32<T>(ctx, 0, xi, xb);
    const float* cs = input_f32<T>(ctx, 1, ci, cb);
    const ParallelFor pf = make_parallel_for(ctx);
    if (criterion == Criterion::kClact) {
      colnorm.resize(static_cast<size_t>(K));
      column_norms(x, T_, K, colnorm.data(), pf);
    }
    const float* cn = criterion == Criterion::kClact ? colnorm.data() : nullptr;
    T* y = ctx.GetOutput(0, xi.shape).template GetTensorMutableData<T>();
    if (xi.size == 0) return;
    if constexpr (std::is_same_v<T, float>) {
      nm_mask_f32(x, T_, K, n, m, cs, cn, y, pf);
    } else {
      std::vector<uint8_t> keep(static_cast<size_t>(xi.size));
      nm_keep_rows(x, T_, K, n, m, cs, cn, keep.data(), pf);
      const T* xin = ctx.GetInput(0).GetTensorData<T>();
      for (int64_t i = 0; i < xi.size; ++i) y[i] = keep[i] ? xin[i] : T(0.0f);
    }
  }
};

template <typename T>
struct NMMaskCpu : Ort::CustomOpBase<NMMaskCpu<T>, NMMaskKernel<T>, true> {
  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** out) const {
    try {
      auto k = std::make_unique<NMMaskKernel<T>>();
      k->label = node_label("NMMask", node_name(info));
      const int64_t n = attr_int(info, "n", true, 0, k->label), m = attr_int(info, "m", true, 0, k->label);
      check_pattern(k->label, n, m);
      k->n = static_cast<int>(n);
      k->m = static_cast<int>(m);
      k->criterion = parse_criterion(k->label, attr_string(info, "criterion", "magnitude"));
      *out = k.release();
      return nullptr;
    } catch (const std::exception& e) {
      return to_status(api, e, ORT_INVALID_ARGUMENT);
    }
  }
  const char* GetName() const { return "NMMask"; }
  size_t GetInputTypeCount() const { return 2; }
  ONNXTensorElementDataType GetInputType(size_t) const { return DType<T>::kOnnx; }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t i) const {
    return i == 0 ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_OPTIONAL;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return DType<T>::kOnnx; }
};

// ---------------------------------------------------------------------------------------------- NMSparseMatMul
template <typename T>
struct NMSparseMatMulKernel {
  OrtStatusPtr ComputeV2(OrtKernelContext* ctx) { return guarded(label, [&] { compute(ctx); }); }
  std::string label;
  SparseMatMulArgs args;
  void compute(OrtKernelContext* context) {
    Ort::KernelContext ctx(context);
    const InputInfo xi = input_info(ctx, 0), bi = input_info(ctx, 1), ci = input_info(ctx, 2),
                    si = input_info(ctx, 3), ai = input_info(ctx, 4);
    int64_t T_ = 0, K = 0;
    check_x(label, xi, args.m, &T_, &K);
    if (bi.shape.size() != 2 || bi.shape[0] != K)
      throw OpError(label + ": input B has shape " + shape_str(bi.shape) + " but X has K=" + std::to_string(K) +
                    " features; B must be the [K, O] MatMul weight (W^T)");
    const int64_t O = bi.shape[1];
    check_vector(label, "channel_scale", ci, K, "one factor per input feature");
    check_vector(label, "shift_bias", si, O, "column sums of B, one per output");
    check_vector(label, "bias", ai, O, "one per output");
    std::vector<float> xb, cb, sb, ab;
    SparseMatMulArgs a = args;
    const float* x = input_f32<T>(ctx, 0, xi, xb);
    // B is read as stored (float16 rows converted as the GEMM loads them): converting the whole weight
    // here would cost more than the sparse GEMM saves.
    Weight b;
    if constexpr (std::is_same_v<T, float>)
      b.f32 = ctx.GetInput(1).GetTensorData<float>();
    else
      b.f16 = reinterpret_cast<const uint16_t*>(ctx.GetInput(1).GetTensorData<T>());
    a.channel_scale = input_f32<T>(ctx, 2, ci, cb);
    a.shift_bias = input_f32<T>(ctx, 3, si, sb);
    a.bias = input_f32<T>(ctx, 4, ai, ab);
    std::vector<int64_t> yshape = xi.shape;
    yshape.back() = O;
    T* y = ctx.GetOutput(0, yshape).template GetTensorMutableData<T>();
    const size_t ysize = static_cast<size_t>(T_ * O);
    if (ysize == 0) return;
    const ParallelFor pf = make_parallel_for(ctx);
    if constexpr (std::is_same_v<T, float>) {
      nm_sparse_matmul_f32(x, b, T_, K, O, a, y, pf);
    } else {
      std::vector<float> y32(ysize);
      nm_sparse_matmul_f32(x, b, T_, K, O, a, y32.data(), pf);
      store(y, y32.data(), ysize);
    }
  }
};

template <typename T>
struct NMSparseMatMulCpu : Ort::CustomOpBase<NMSparseMatMulCpu<T>, NMSparseMatMulKernel<T>, true> {
  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** out) const {
    try {
      auto k = std::make_unique<NMSparseMatMulKernel<T>>();
      k->label = node_label("NMSparseMatMul", node_name(info));
      const int64_t n = attr_int(info, "n", true, 0, k->label), m = attr_int(info, "m", true, 0, k->label);
      check_pattern(k->label, n, m);
      k->args.n = static_cast<int>(n);
      k->args.m = static_cast<int>(m);
      k->args.shift = parse_shift(k->label, "shift", attr_string(info, "shift", "none"), true);
      const int64_t vc = attr_int(info, "variance_correction", false, 0, k->label);
      if (vc != 0 && vc != 1)
        throw OpError(k->label + ": attribute variance_correction=" + std::to_string(vc) + " must be 0 or 1");
      k->args.variance_correction = vc == 1;
      *out = k.release();
      return nullptr;
    } catch (const std::exception& e) {
      return to_status(api, e, ORT_INVALID_ARGUMENT);
    }
  }
  const char* GetName() const { return "NMSparseMatMul"; }
  size_t GetInputTypeCount() const { return 5; }
  ONNXTensorElementDataType GetInputType(size_t) const { return DType<T>::kOnnx; }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t i) const {
    return i < 2 ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_OPTIONAL;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return DType<T>::kOnnx; }
};

}  // namespace

void add_cpu_ops(Ort::CustomOpDomain& domain) {
  static TokenShiftCpu<float> ts_f;
  static TokenShiftCpu<Ort::Float16_t> ts_h;
  static NMMaskCpu<float> mask_f;
  static NMMaskCpu<Ort::Float16_t> mask_h;
  static NMSparseMatMulCpu<float> smm_f;
  static NMSparseMatMulCpu<Ort::Float16_t> smm_h;
  domain.Add(&ts_f);
  domain.Add(&ts_h);
  domain.Add(&mask_f);
  domain.Add(&mask_h);
  domain.Add(&smm_f);
  domain.Add(&smm_h);
}

}  // namespace nm_onnx

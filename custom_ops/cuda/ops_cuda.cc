// CUDAExecutionProvider registrations of TokenShift, NMMask and NMSparseMatMul (float32, float16,
// bfloat16). Validation is shared with the CPU ops (ort_glue.h); kernels run on ORT's compute stream.
#include <memory>
#include <string>

#include "launch.h"
#include "ops.h"
#include "ort_glue.h"

namespace nm_onnx {
namespace {

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

cuda::DType to_dtype(ONNXTensorElementDataType t) {
  switch (t) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: return cuda::DType::kF16;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16: return cuda::DType::kBF16;
    default: return cuda::DType::kF32;
  }
}

const void* data_or_null(Ort::KernelContext& ctx, size_t i, const InputInfo& info) {
  return info.has ? ctx.GetInput(i).GetTensorRawData() : nullptr;
}

struct TokenShiftKernel {
  std::string label;
  Shift mode = Shift::kMedian;
  ONNXTensorElementDataType type;
  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    return guarded(label, [&] {
      Ort::KernelContext ctx(context);
      const InputInfo xi = input_info(ctx, 0);
      int64_t T = 0, K = 0;
      check_x(label, xi, 0, &T, &K);
      std::vector<int64_t> eshape = xi.shape;
      eshape.back() = 1;
      auto xc = ctx.GetOutput(0, xi.shape);
      auto eta = ctx.GetOutput(1, eshape);
      cuda::token_shift(to_dtype(type), data_or_null(ctx, 0, xi), xc.GetTensorMutableRawData(),
                        eta.GetTensorMutableRawData(), T, K, mode, ctx.GetGPUComputeStream());
    });
  }
};

struct NMMaskKernel {
  std::string label;
  int n = 0, m = 1;
  Criterion criterion = Criterion::kMagnitude;
  ONNXTensorElementDataType type;
  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    return guarded(label, [&] {
      Ort::KernelContext ctx(context);
      const InputInfo xi = input_info(ctx, 0), ci = input_info(ctx, 1);
      int64_t T = 0, K = 0;
      check_x(label, xi, m, &T, &K);
      check_vector(label, "channel_scale", ci, K, "one factor per input feature");
      auto y = ctx.GetOutput(0, xi.shape);
      cuda::nm_mask(to_dtype(type), data_or_null(ctx, 0, xi), data_or_null(ctx, 1, ci), y.GetTensorMutableRawData(),
                    T, K, n, m, criterion, ctx.GetGPUComputeStream());
    });
  }
};

struct NMSparseMatMulKernel {
  std::string label;
  cuda::SparseMatMulParams params;
  ONNXTensorElementDataType type;
  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    return guarded(label, [&] {
      Ort::KernelContext ctx(context);
      const InputInfo xi = input_info(ctx, 0), bi = input_info(ctx, 1), ci = input_info(ctx, 2),
                      si = input_info(ctx, 3), ai = input_info(ctx, 4);
      int64_t T = 0, K = 0;
      check_x(label, xi, params.m, &T, &K);
      if (bi.shape.size() != 2 || bi.shape[0] != K)
        throw OpError(label + ": input B has shape " + shape_str(bi.shape) + " but X has K=" + std::to_string(K) +
                      " features; B must be the [K, O] MatMul weight (W^T)");
      const int64_t O = bi.shape[1];
      check_vector(label, "channel_scale", ci, K, "one factor per input feature");
      check_vector(label, "shift_bias", si, O, "column sums of B, one per output");
      check_vector(label, "bias", ai, O, "one per output");
      std::vector<int64_t> yshape = xi.shape;
      yshape.back() = O;
      auto y = ctx.GetOutput(0, yshape);
      cuda::nm_sparse_matmul(to_dtype(type), data_or_null(ctx, 0, xi), data_or_null(ctx, 1, bi),
                             data_or_null(ctx, 2, ci), data_or_null(ctx, 3, si), data_or_null(ctx, 4, ai),
                             y.GetTensorMutableRawData(), T, K, O, params, ctx.GetGPUComputeStream());
    });
  }
};

template <typename Op, typename Kernel>
struct CudaOpBase : Ort::CustomOpBase<Op, Kernel, true> {
  explicit CudaOpBase(ONNXTensorElementDataType t) : type(t) {}
  ONNXTensorElementDataType type;
  const char* GetExecutionProviderType() const { return "CUDAExecutionProvider"; }
  ONNXTensorElementDataType GetInputType(size_t) const { return type; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return type; }
};

struct TokenShiftCuda : CudaOpBase<TokenShiftCuda, TokenShiftKernel> {
  using CudaOpBase::CudaOpBase;
  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** out) const {
    try {
      auto k = std::make_unique<TokenShiftKernel>();
      k->label = node_label("TokenShift", node_name(info));
      k->mode = parse_shift(k->label, "mode", attr_string(info, "mode", "median"), false);
      k->type = type;
      *out = k.release();
      return nullptr;
    } catch (const std::exception& e) {
      return to_status(api, e, ORT_INVALID_ARGUMENT);
    }
  }
  const char* GetName() const { return "TokenShift"; }
  size_t GetInputTypeCount() const { return 1; }
  size_t GetOutputTypeCount() const { return 2; }
};

struct NMMaskCuda : CudaOpBase<NMMaskCuda, NMMaskKernel> {
  using CudaOpBase::CudaOpBase;
  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** out) const {
    try {
      auto k = std::make_unique<NMMaskKernel>();
      k->label = node_label("NMMask", node_name(info));
      const int64_t n = attr_int(info, "n", true, 0, k->label), m = attr_int(info, "m", true, 0, k->label);
      check_pattern(k->label, n, m);
      k->n = static_cast<int>(n);
      k->m = static_cast<int>(m);
      k->criterion = parse_criterion(k->label, attr_string(info, "criterion", "magnitude"));
      k->type = type;
      *out = k.release();
      return nullptr;
    } catch (const std::exception& e) {
      return to_status(api, e, ORT_INVALID_ARGUMENT);
    }
  }
  const char* GetName() const { return "NMMask"; }
  size_t GetInputTypeCount() const { return 2; }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t i) const {
    return i == 0 ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_OPTIONAL;
  }
  size_t GetOutputTypeCount() const { return 1; }
};

struct NMSparseMatMulCuda : CudaOpBase<NMSparseMatMulCuda, NMSparseMatMulKernel> {
  using CudaOpBase::CudaOpBase;
  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** out) const {
    try {
      auto k = std::make_unique<NMSparseMatMulKernel>();
      k->label = node_label("NMSparseMatMul", node_name(info));
      const int64_t n = attr_int(info, "n", true, 0, k->label), m = attr_int(info, "m", true, 0, k->label);
      check_pattern(k->label, n, m);
      k->params.n = static_cast<int>(n);
      k->params.m = static_cast<int>(m);
      k->params.shift = parse_shift(k->label, "shift", attr_string(info, "shift", "none"), true);
      const int64_t vc = attr_int(info, "variance_correction", false, 0, k->label);
      if (vc != 0 && vc != 1)
        throw OpError(k->label + ": attribute variance_correction=" + std::to_string(vc) + " must be 0 or 1");
      k->params.variance_correction = vc == 1;
      k->type = type;
      *out = k.release();
      return nullptr;
    } catch (const std::exception& e) {
      return to_status(api, e, ORT_INVALID_ARGUMENT);
    }
  }
  const char* GetName() const { return "NMSparseMatMul"; }
  size_t GetInputTypeCount() const { return 5; }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t i) const {
    return i < 2 ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_OPTIONAL;
  }
  size_t GetOutputTypeCount() const { return 1; }
};

}  // namespace

void add_cuda_ops(Ort::CustomOpDomain& domain) {
  constexpr ONNXTensorElementDataType kTypes[] = {ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT,
                                                  ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16,
                                                  ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16};
  // Built once (RegisterCustomOps holds a lock) and never freed: ops must outlive every session.
  static bool built = false;
  static std::vector<OrtCustomOp*> ops;
  if (!built) {
    for (auto t : kTypes) {
      ops.push_back(new TokenShiftCuda(t));
      ops.push_back(new NMMaskCuda(t));
      ops.push_back(new NMSparseMatMulCuda(t));
    }
    built = true;
  }
  for (auto* op : ops) domain.Add(op);
}

}  // namespace nm_onnx

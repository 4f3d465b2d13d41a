// The four nm_onnx ops, each defined once for every execution provider: name, inputs, outputs,
// attribute parsing and input-shape checks (with the user-facing messages of docs/ops.md), and the
// ORT custom-op template that registers a definition with one provider's compute function.
//
// ops_cpu.cc and ops_cuda.cc only write compute functions
//   void compute(Ort::KernelContext&, const Def::Attrs&, const Def::Shapes&, ONNXTensorElementDataType)
// which receive validated attributes and shapes, so both providers accept and reject exactly the same
// nodes with the same errors.
#pragma once
#include <memory>
#include <string>
#include <vector>

#include "op_attrs.h"
#include "ort_glue.h"

namespace nm_onnx {

// ------------------------------------------------------------------------------------- attribute parsing
inline void check_pattern(const std::string& label, int64_t n, int64_t m) {
  if (m < 1 || m > (int64_t{1} << 30))
    throw OpError(label + ": attribute m=" + std::to_string(m) + " is out of range; use m >= 1 "
                  "(e.g. 2:4, 8:16; m = K for unstructured top-n)");
  if (n < 0 || n > m)
    throw OpError(label + ": attribute n=" + std::to_string(n) + " must satisfy 0 <= n <= m=" +
                  std::to_string(m) + "; e.g. n=8, m=16 for 8:16");
}

// The required n and m of NMMask and NMSparseMatMul, checked.
inline void parse_pattern(const OrtKernelInfo* info, const std::string& label, int* n, int* m) {
  const int64_t nn = attr_int(info, "n", true, 0, label), mm = attr_int(info, "m", true, 0, label);
  check_pattern(label, nn, mm);
  *n = static_cast<int>(nn);
  *m = static_cast<int>(mm);
}

inline Criterion parse_criterion(const std::string& label, const std::string& s) {
  if (s == "magnitude") return Criterion::kMagnitude;
  if (s == "clact") return Criterion::kClact;
  throw OpError(label + ": attribute criterion='" + s + "' is unknown; use 'magnitude' or 'clact'");
}

inline Shift parse_shift(const std::string& label, const char* attr, const std::string& s, bool allow_none) {
  if (allow_none && s == "none") return Shift::kNone;
  if (s == "median") return Shift::kMedian;
  if (s == "mean") return Shift::kMean;
  throw OpError(label + ": attribute " + attr + "='" + s + "' is unknown; use " +
                (allow_none ? "'none', 'median' or 'mean'" : "'median' or 'mean'"));
}

// ------------------------------------------------------------------------------------- input checks
// Input 0 of every op: X [..., K] with rank >= 1, its leading axes flattened to T token rows.
struct XInput {
  InputInfo x;
  int64_t T = 0, K = 0;
  // Reads X and checks its rank and K % m == 0 (m = 0: any K).
  void read_x(Ort::KernelContext& ctx, const std::string& label, int64_t m) {
    x = input_info(ctx, 0);
    if (x.shape.empty())
      throw OpError(label + ": input X has rank 0; it needs rank >= 1 with features on the last axis "
                            "(reshape a scalar to [1])");
    K = x.shape.back();
    T = 1;
    for (size_t i = 0; i + 1 < x.shape.size(); ++i) T *= x.shape[i];
    if (m > 0 && K % m != 0)
      throw OpError(label + ": input X has K=" + std::to_string(K) +
                    " features on its last axis, not a multiple of m=" + std::to_string(m) +
                    "; choose an N:M pattern whose M divides " + std::to_string(K) +
                    " or leave this layer dense");
  }
};

// An optional per-feature or per-output vector must be 1-D of length len when present.
inline void check_vector(const std::string& label, const char* name, const InputInfo& v, int64_t len,
                         const char* what) {
  if (!v.has) return;
  if (v.shape.size() != 1 || v.shape[0] != len)
    throw OpError(label + ": input " + name + " has shape " + shape_str(v.shape) +
                  "; it must be 1-D of length " + std::to_string(len) + " (" + what + ")");
}

// The optional channel_scale [K] of NMMask and NMSparseMatMul (input i).
inline InputInfo check_channel_scale(Ort::KernelContext& ctx, size_t i, const std::string& label, int64_t K) {
  InputInfo v = input_info(ctx, i);
  check_vector(label, "channel_scale", v, K, "one factor per input feature");
  return v;
}

// ------------------------------------------------------------------------------------- the ops
// Each definition: its Signature (the parsed Attrs; input and output counts, inputs from kRequired on
// being optional), kName, parse() of the node's attributes and the Shapes that check() reads from the
// inputs of one call.
// input_type(i, node_type): the element type of input i; every input has the node's type unless a
// definition fixes it (NMSparseMatMulNBits: the quantized weight is uint8, its scales float32).
template <typename A, size_t Inputs, size_t Required, size_t Outputs>
struct Signature {
  using Attrs = A;
  static constexpr size_t kInputs = Inputs, kRequired = Required, kOutputs = Outputs;
  static ONNXTensorElementDataType input_type(size_t, ONNXTensorElementDataType node_type) { return node_type; }
};

// TokenShift(X) -> (Xc, eta)
struct TokenShiftDef : Signature<TokenShiftAttrs, 1, 1, 2> {
  static constexpr const char* kName = "TokenShift";
  static Attrs parse(const OrtKernelInfo* info, const std::string& label) {
    return {parse_shift(label, "mode", attr_string(info, "mode", "median"), false)};
  }
  struct Shapes : XInput {
    std::vector<int64_t> eta;  // X's shape with a last axis of 1
  };
  static Shapes check(Ort::KernelContext& ctx, const Attrs&, const std::string& label) {
    Shapes s;
    s.read_x(ctx, label, 0);
    s.eta = s.x.shape;
    s.eta.back() = 1;
    return s;
  }
};

// NMMask(X[, channel_scale]) -> Y
struct NMMaskDef : Signature<NMMaskAttrs, 2, 1, 1> {
  static constexpr const char* kName = "NMMask";
  static Attrs parse(const OrtKernelInfo* info, const std::string& label) {
    Attrs a;
    parse_pattern(info, label, &a.n, &a.m);
    a.criterion = parse_criterion(label, attr_string(info, "criterion", "magnitude"));
    return a;
  }
  struct Shapes : XInput {
    InputInfo channel_scale;
  };
  static Shapes check(Ort::KernelContext& ctx, const Attrs& a, const std::string& label) {
    Shapes s;
    s.read_x(ctx, label, a.m);
    s.channel_scale = check_channel_scale(ctx, 1, label, s.K);
    return s;
  }
};

// NMSparseMatMul(X, B[, channel_scale][, shift_bias][, bias]) -> Y
struct NMSparseMatMulDef : Signature<NMSparseMatMulAttrs, 5, 2, 1> {
  static constexpr const char* kName = "NMSparseMatMul";
  static Attrs parse(const OrtKernelInfo* info, const std::string& label) {
    Attrs a;
    parse_pattern(info, label, &a.n, &a.m);
    a.shift = parse_shift(label, "shift", attr_string(info, "shift", "none"), true);
    const int64_t vc = attr_int(info, "variance_correction", false, 0, label);
    if (vc != 0 && vc != 1)
      throw OpError(label + ": attribute variance_correction=" + std::to_string(vc) + " must be 0 or 1");
    a.variance_correction = vc == 1;
    return a;
  }
  struct Shapes : XInput {
    InputInfo b, channel_scale, shift_bias, bias;
    int64_t O = 0;
    std::vector<int64_t> y;  // X's shape with a last axis of O
  };
  static Shapes check(Ort::KernelContext& ctx, const Attrs& a, const std::string& label) {
    Shapes s;
    s.read_x(ctx, label, a.m);
    s.b = input_info(ctx, 1);
    if (s.b.shape.size() != 2 || s.b.shape[0] != s.K)
      throw OpError(label + ": input B has shape " + shape_str(s.b.shape) + " but X has K=" + std::to_string(s.K) +
                    " features; B must be the [K, O] MatMul weight (W^T)");
    s.O = s.b.shape[1];
    s.channel_scale = check_channel_scale(ctx, 2, label, s.K);
    s.shift_bias = input_info(ctx, 3);
    check_vector(label, "shift_bias", s.shift_bias, s.O, "column sums of B, one per output");
    s.bias = input_info(ctx, 4);
    check_vector(label, "bias", s.bias, s.O, "one per output");
    s.y = s.x.shape;
    s.y.back() = s.O;
    return s;
  }
};

// NMSparseMatMulNBits(X, B, scales[, zero_points][, channel_scale][, shift_bias][, bias]) -> Y:
// NMSparseMatMul on the block-quantized K-major weight W[k, o] = (q[k, o] - zp[k / bs, o]) * scales[k / bs, o]
// (B uint8 [K, ceil(O*bits/8)], scales float32 [ceil(K/bs), O], zero_points uint8 [ceil(K/bs), ceil(O*bits/8)],
// nm_onnx/ops/nbits.py). The messages are those of nbits.check_bits / check_block_size / check_kmajor.
struct NMSparseMatMulNBitsDef : Signature<NMSparseMatMulNBitsAttrs, 7, 3, 1> {
  static constexpr const char* kName = "NMSparseMatMulNBits";
  enum : size_t { kX = 0, kB = 1, kScales = 2, kZeroPoints = 3, kChannelScale = 4, kShiftBias = 5, kBias = 6 };
  static ONNXTensorElementDataType input_type(size_t i, ONNXTensorElementDataType node_type) {
    if (i == kB || i == kZeroPoints) return ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8;
    if (i == kScales) return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
    return node_type;
  }
  static Attrs parse(const OrtKernelInfo* info, const std::string& label) {
    Attrs a;
    static_cast<NMSparseMatMulAttrs&>(a) = NMSparseMatMulDef::parse(info, label);
    const int64_t bits = attr_int(info, "bits", false, 4, label);
    if (bits != 4 && bits != 8)
      throw OpError(label + ": attribute bits=" + std::to_string(bits) + " must be 4 or 8");
    a.bits = static_cast<int>(bits);
    const int64_t bs = attr_int(info, "block_size", true, 0, label, "e.g. block_size=32, the MatMulNBits block along K");
    if (bs < 16 || (bs & (bs - 1)) != 0 || bs > (int64_t{1} << 40))
      throw OpError(label + ": attribute block_size=" + std::to_string(bs) +
                    " must be a power of two >= 16 (the MatMulNBits rule), e.g. 32");
    a.block_size = bs;
    return a;
  }
  struct Shapes : XInput {
    InputInfo b, scales, zero_points, channel_scale, shift_bias, bias;
    int64_t O = 0, blocks = 0, width = 0;  // width: bytes of one packed row of O values
    std::vector<int64_t> y;
  };
  static Shapes check(Ort::KernelContext& ctx, const Attrs& a, const std::string& label) {
    Shapes s;
    s.read_x(ctx, label, a.m);
    s.blocks = (s.K + a.block_size - 1) / a.block_size;
    const std::string kb = std::to_string(s.blocks);
    s.scales = input_info(ctx, kScales);
    if (s.scales.shape.size() != 2 || s.scales.shape[0] != s.blocks)
      throw OpError(label + ": input scales has shape " + shape_str(s.scales.shape) +
                    " and dtype float32; it must be float32 [ceil(K/block_size), O] = [" + kb + ", O] (K=" +
                    std::to_string(s.K) + ", block_size=" + std::to_string(a.block_size) + ")");
    s.O = s.scales.shape[1];
    s.width = (s.O * a.bits + 7) / 8;
    const std::string w = std::to_string(s.width);
    s.b = input_info(ctx, kB);
    if (s.b.shape.size() != 2 || s.b.shape[0] != s.K || s.b.shape[1] != s.width)
      throw OpError(label + ": input B has shape " + shape_str(s.b.shape) +
                    " and dtype uint8; it must be uint8 [K, ceil(O*bits/8)] = [" + std::to_string(s.K) + ", " + w +
                    "] (the K-major quantized weight, nm_onnx.ops.nbits)");
    s.zero_points = input_info(ctx, kZeroPoints);
    if (s.zero_points.has &&
        (s.zero_points.shape.size() != 2 || s.zero_points.shape[0] != s.blocks || s.zero_points.shape[1] != s.width))
      throw OpError(label + ": input zero_points has shape " + shape_str(s.zero_points.shape) +
                    " and dtype uint8; it must be uint8 [ceil(K/block_size), ceil(O*bits/8)] = [" + kb + ", " + w +
                    "]");
    s.channel_scale = check_channel_scale(ctx, kChannelScale, label, s.K);
    s.shift_bias = input_info(ctx, kShiftBias);
    check_vector(label, "shift_bias", s.shift_bias, s.O, "column sums of the dequantized weight, one per output");
    s.bias = input_info(ctx, kBias);
    check_vector(label, "bias", s.bias, s.O, "one per output");
    s.y = s.x.shape;
    s.y.back() = s.O;
    return s;
  }
};

// ------------------------------------------------------------------------------------- ORT registration
template <typename Def>
using ComputeFn = void (*)(Ort::KernelContext&, const typename Def::Attrs&, const typename Def::Shapes&,
                           ONNXTensorElementDataType);

template <typename Def, ComputeFn<Def> Compute>
struct Kernel {
  std::string label;
  typename Def::Attrs attrs;
  ONNXTensorElementDataType type;
  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    return guarded(label, [&] {
      Ort::KernelContext ctx(context);
      Compute(ctx, attrs, Def::check(ctx, attrs, label), type);
    });
  }
};

// One op definition for one element type (the outputs and, unless Def::input_type fixes one, the inputs) on one execution provider
// (nullptr: CPU). Attributes are parsed and checked when the session creates the kernel.
template <typename Def, ComputeFn<Def> Compute>
struct Op : Ort::CustomOpBase<Op<Def, Compute>, Kernel<Def, Compute>, true> {
  Op(ONNXTensorElementDataType type, const char* provider) : type_(type), provider_(provider) {}
  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** out) const {
    try {
      auto k = std::make_unique<Kernel<Def, Compute>>();
      k->label = node_label(Def::kName, node_name(info));
      k->attrs = Def::parse(info, k->label);
      k->type = type_;
      *out = k.release();
      return nullptr;
    } catch (const std::exception& e) {
      return to_status(api, e, ORT_INVALID_ARGUMENT);
    }
  }
  const char* GetName() const { return Def::kName; }
  const char* GetExecutionProviderType() const { return provider_; }
  size_t GetInputTypeCount() const { return Def::kInputs; }
  ONNXTensorElementDataType GetInputType(size_t i) const { return Def::input_type(i, type_); }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t i) const {
    return i < Def::kRequired ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_OPTIONAL;
  }
  size_t GetOutputTypeCount() const { return Def::kOutputs; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return type_; }

 private:
  ONNXTensorElementDataType type_;
  const char* provider_;
};

// TokenShift, NMMask and NMSparseMatMul of one element type on one provider. ORT keeps pointers to
// the ops in every session's domain: keep an OpSet for the life of the process (a function static).
template <ComputeFn<TokenShiftDef> TokenShift, ComputeFn<NMMaskDef> NMMask,
          ComputeFn<NMSparseMatMulDef> NMSparseMatMul>
struct OpSet {
  OpSet(ONNXTensorElementDataType type, const char* provider)
      : token_shift(type, provider), nm_mask(type, provider), nm_sparse_matmul(type, provider) {}
  void add_to(Ort::CustomOpDomain& domain) const {
    domain.Add(&token_shift);
    domain.Add(&nm_mask);
    domain.Add(&nm_sparse_matmul);
  }
  Op<TokenShiftDef, TokenShift> token_shift;
  Op<NMMaskDef, NMMask> nm_mask;
  Op<NMSparseMatMulDef, NMSparseMatMul> nm_sparse_matmul;
};

// NMSparseMatMulNBits of one element type (float32 or float16 X) on one provider, kept like an OpSet.
template <ComputeFn<NMSparseMatMulNBitsDef> Compute>
using NBitsOp = Op<NMSparseMatMulNBitsDef, Compute>;

}  // namespace nm_onnx

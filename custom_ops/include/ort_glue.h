// ONNX Runtime glue shared by the CPU and CUDA op definitions: attribute parsing, validation
// messages (op, input, fix), shape helpers and the ParallelFor adapter over ORT's intra-op pool.
//
// Built against the C API 21 headers with ORT_API_MANUAL_INIT: register.cc initialises the API.
#pragma once
#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

#include <cstdint>
#include <functional>
#include <stdexcept>
#include <string>
#include <vector>

#include "nm_select.h"
#include "sparse_gemm.h"

namespace nm_onnx {

// A user-facing error: the message names the op, the input or attribute, and the fix.
struct OpError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

inline std::string node_label(const char* op, const std::string& node) {
  return node.empty() ? std::string(op) : std::string(op) + " (node '" + node + "')";
}

inline std::string node_name(const OrtKernelInfo* info) {
  try {
    return Ort::ConstKernelInfo(info).GetNodeName();
  } catch (...) {
    return {};
  }
}

inline int64_t attr_int(const OrtKernelInfo* info, const char* name, bool required, int64_t dflt,
                        const std::string& label) {
  int64_t v = 0;
  OrtStatus* st = Ort::GetApi().KernelInfoGetAttribute_int64(info, name, &v);
  if (st == nullptr) return v;
  Ort::GetApi().ReleaseStatus(st);
  if (required)
    throw OpError(label + ": attribute " + name + " is missing; set it on the node (e.g. n=8, m=16 for 8:16)");
  return dflt;
}

inline std::string attr_string(const OrtKernelInfo* info, const char* name, const std::string& dflt) {
  size_t size = 0;
  OrtStatus* st = Ort::GetApi().KernelInfoGetAttribute_string(info, name, nullptr, &size);
  if (st != nullptr) {
    Ort::GetApi().ReleaseStatus(st);
    return dflt;
  }
  std::string out(size, '\0');
  st = Ort::GetApi().KernelInfoGetAttribute_string(info, name, &out[0], &size);
  if (st != nullptr) {
    Ort::GetApi().ReleaseStatus(st);
    return dflt;
  }
  out.resize(size > 0 ? size - 1 : 0);  // size counts the terminating NUL
  return out;
}

inline void check_pattern(const std::string& label, int64_t n, int64_t m) {
  if (m < 1 || m > (int64_t{1} << 30))
    throw OpError(label + ": attribute m=" + std::to_string(m) + " is out of range; use m >= 1 "
                  "(e.g. 2:4, 8:16; m = K for unstructured top-n)");
  if (n < 0 || n > m)
    throw OpError(label + ": attribute n=" + std::to_string(n) + " must satisfy 0 <= n <= m=" +
                  std::to_string(m) + "; e.g. n=8, m=16 for 8:16");
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

inline std::string shape_str(const std::vector<int64_t>& s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}

inline const char* dtype_name(ONNXTensorElementDataType t) {
  switch (t) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: return "float32";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: return "float16";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16: return "bfloat16";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_DOUBLE: return "float64";
    default: return "a non-float type";
  }
}

// Shape of an input tensor; an absent optional input gives has=false.
struct InputInfo {
  bool has = false;
  std::vector<int64_t> shape;
  int64_t size = 0;
};

inline InputInfo input_info(Ort::KernelContext& ctx, size_t i) {
  InputInfo r;
  if (i >= ctx.GetInputCount()) return r;
  Ort::ConstValue v = ctx.GetInput(i);
  if (static_cast<const OrtValue*>(v) == nullptr) return r;
  auto ti = v.GetTensorTypeAndShapeInfo();
  r.has = true;
  r.shape = ti.GetShape();
  r.size = static_cast<int64_t>(ti.GetElementCount());
  return r;
}

// X [..., K] must have rank >= 1 and K % m == 0; returns (T, K).
inline void check_x(const std::string& label, const InputInfo& x, int64_t m, int64_t* T, int64_t* K) {
  if (x.shape.empty())
    throw OpError(label + ": input X has rank 0; it needs rank >= 1 with features on the last axis "
                          "(reshape a scalar to [1])");
  *K = x.shape.back();
  *T = 1;
  for (size_t i = 0; i + 1 < x.shape.size(); ++i) *T *= x.shape[i];
  if (m > 0 && *K % m != 0)
    throw OpError(label + ": input X has K=" + std::to_string(*K) +
                  " features on its last axis, not a multiple of m=" + std::to_string(m) +
                  "; choose an N:M pattern whose M divides " + std::to_string(*K) +
                  " or leave this layer dense");
}

inline void check_vector(const std::string& label, const char* name, const InputInfo& v, int64_t len,
                         const char* what) {
  if (!v.has) return;
  if (v.shape.size() != 1 || v.shape[0] != len)
    throw OpError(label + ": input " + name + " has shape " + shape_str(v.shape) +
                  "; it must be 1-D of length " + std::to_string(len) + " (" + what + ")");
}

// ParallelFor over ORT's intra-op thread pool: splits [0, n) into at most 4 * threads contiguous chunks.
inline ParallelFor make_parallel_for(const Ort::KernelContext& ctx) {
  return [&ctx](std::ptrdiff_t n, const std::function<void(std::ptrdiff_t, std::ptrdiff_t)>& fn) {
    if (n <= 0) return;
    const std::ptrdiff_t chunks = n < 64 ? n : 64;
    if (chunks == 1) {
      fn(0, n);
      return;
    }
    struct Job {
      std::ptrdiff_t n, chunks;
      const std::function<void(std::ptrdiff_t, std::ptrdiff_t)>* fn;
    } job{n, chunks, &fn};
    ctx.ParallelFor(
        [](void* data, size_t i) {
          auto* j = static_cast<Job*>(data);
          const std::ptrdiff_t b = j->n * static_cast<std::ptrdiff_t>(i) / j->chunks;
          const std::ptrdiff_t e = j->n * (static_cast<std::ptrdiff_t>(i) + 1) / j->chunks;
          (*j->fn)(b, e);
        },
        static_cast<size_t>(chunks), 0, &job);
  };
}

inline OrtStatusPtr to_status(const OrtApi& api, const std::exception& e, OrtErrorCode code) {
  return api.CreateStatus(code, e.what());
}

}  // namespace nm_onnx

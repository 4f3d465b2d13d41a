// ONNX Runtime plumbing shared by the CPU and CUDA ops: the user-facing error type, node labels,
// attribute reads, input shapes, the ParallelFor adapter over ORT's intra-op pool and the wrapper that
// turns exceptions into ORT statuses. What each op accepts is op_defs.h.
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

#include "sparse_gemm.h"  // ParallelFor

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
                        const std::string& label, const char* example = "e.g. n=8, m=16 for 8:16") {
  int64_t v = 0;
  OrtStatus* st = Ort::GetApi().KernelInfoGetAttribute_int64(info, name, &v);
  if (st == nullptr) return v;
  Ort::GetApi().ReleaseStatus(st);
  if (required)
    throw OpError(label + ": attribute " + name + " is missing; set it on the node (" + example + ")");
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

inline std::string shape_str(const std::vector<int64_t>& s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}

// An input tensor and its shape; an absent optional input gives has=false and null data.
struct InputInfo {
  bool has = false;
  std::vector<int64_t> shape;
  int64_t size = 0;
  Ort::ConstValue value{nullptr};
  const void* raw() const { return has ? value.GetTensorRawData() : nullptr; }
  template <typename T>
  const T* data() const { return has ? value.template GetTensorData<T>() : nullptr; }
};

inline InputInfo input_info(Ort::KernelContext& ctx, size_t i) {
  InputInfo r;
  if (i >= ctx.GetInputCount()) return r;
  Ort::ConstValue v = ctx.GetInput(i);
  if (static_cast<const OrtValue*>(v) == nullptr) return r;
  auto ti = v.GetTensorTypeAndShapeInfo();
  r.has = true;
  r.value = v;
  r.shape = ti.GetShape();
  r.size = static_cast<int64_t>(ti.GetElementCount());
  return r;
}

// ParallelFor over ORT's intra-op thread pool: splits [0, n) into at most 64 contiguous chunks.
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

// Runs a kernel body; errors become ORT statuses, never exceptions across the C API. An OpError is
// the user's (invalid argument, already labelled); anything else is labelled with the op and node.
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

}  // namespace nm_onnx

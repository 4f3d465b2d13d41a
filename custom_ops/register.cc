// The library's only exported symbol: RegisterCustomOps adds the nm_onnx domain (version 1) with the
// CPU kernels (and the CUDA kernels when built with nvcc) to an ORT session's options.
#include <memory>
#include <mutex>
#include <vector>

#include "ops.h"

extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL
RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(21);
  if (api == nullptr) {  // ORT older than 1.21: report through the oldest API every ORT has
    const OrtApi* old = api_base->GetApi(1);
    return old->CreateStatus(ORT_FAIL, "libnm_onnx_ops needs onnxruntime >= 1.21 (C API 21); upgrade onnxruntime");
  }
  Ort::InitApi(api);
  // Domains must outlive every session that uses them: keep them for the life of the process.
  static std::mutex mutex;
  static std::vector<std::unique_ptr<Ort::CustomOpDomain>> domains;
  try {
    std::lock_guard<std::mutex> lock(mutex);
    auto domain = std::make_unique<Ort::CustomOpDomain>("nm_onnx");
    nm_onnx::add_cpu_ops(*domain);
#ifdef NM_ONNX_WITH_CUDA
    nm_onnx::add_cuda_ops(*domain);
#endif
    Ort::UnownedSessionOptions(options).Add(*domain);
    domains.push_back(std::move(domain));
    return nullptr;
  } catch (const std::exception& e) {
    return api->CreateStatus(ORT_FAIL, e.what());
  }
}

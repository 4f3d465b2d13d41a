// Registration hooks of the op definitions: each adds its kernels to the nm_onnx domain.
#pragma once
#include "ort_glue.h"

namespace nm_onnx {
void add_cpu_ops(Ort::CustomOpDomain& domain);
#ifdef NM_ONNX_WITH_CUDA
void add_cuda_ops(Ort::CustomOpDomain& domain);
#endif
}  // namespace nm_onnx

// The attributes of each nm_onnx op as the kernels receive them, parsed once per node (op_defs.h)
// and handed to the CPU (kernels.h) and CUDA (cuda/launch.h) code alike. No ORT or CUDA types, so
// every layer can include it.
#pragma once
#include <stdint.h>

#include "nm_select.h"

namespace nm_onnx {

struct TokenShiftAttrs {
  Shift mode = Shift::kMedian;  // kMedian or kMean
};

struct NMMaskAttrs {
  int n = 0, m = 1;
  Criterion criterion = Criterion::kMagnitude;
};

struct NMSparseMatMulAttrs {
  int n = 0, m = 1;
  Shift shift = Shift::kNone;
  bool variance_correction = false;
};

// NMSparseMatMulNBits: NMSparseMatMul's attributes plus the quantization of its weight.
struct NMSparseMatMulNBitsAttrs : NMSparseMatMulAttrs {
  int bits = 4;              // 4 or 8
  int64_t block_size = 32;   // a power of two >= 16: rows of B per scale / zero-point row
};

}  // namespace nm_onnx

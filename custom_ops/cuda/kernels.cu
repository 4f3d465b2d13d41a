// CUDA kernels of TokenShift, NMMask, NMSparseMatMul and NMSparseMatMulNBits (float32, float16, bfloat16; math in float32,
// float64 for means, variances and clact column norms). The selection rules are nm_select.h, shared
// with the CPU kernels. NMSparseMatMul decode (T <= 16) reads only the kept rows of B through the
// split-K GEMV of sparse_gemv.cu; the rest is correct and simple rather than fast.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "launch.h"
#include "nm_select.h"
#include "sparse_gemv.cuh"

namespace nm_onnx {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kDecodeRows = 16;  // NMSparseMatMul with up to this many tokens: the split-K GEMV

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T>
__device__ __forceinline__ T from_f(float v);
template <>
__device__ __forceinline__ float from_f<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(e));
}

unsigned blocks_for(int64_t n) {
  const int64_t b = (n + kThreads - 1) / kThreads;
  return static_cast<unsigned>(b < 65535 ? (b > 0 ? b : 1) : 65535);
}

// Block-wide sum of one double per thread (blockDim.x == kThreads).
__device__ double block_sum(double v, double* shared) {
  shared[threadIdx.x] = v;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) shared[threadIdx.x] += shared[threadIdx.x + s];
    __syncthreads();
  }
  const double r = shared[0];
  __syncthreads();
  return r;
}

// eta[t] of one row per block: lower median (radix select on the order keys) or float64 mean.
template <typename T>
__global__ void row_shift_kernel(const T* x, int64_t T_, int64_t K, int mode, float* eta) {
  __shared__ double sd[kThreads];
  __shared__ unsigned hist[256];
  __shared__ int any_nan;
  __shared__ uint32_t s_prefix;
  __shared__ int64_t s_rank;
  for (int64_t t = blockIdx.x; t < T_; t += gridDim.x) {
    const T* xr = x + t * K;
    if (K == 0 || mode == static_cast<int>(Shift::kNone)) {
      if (threadIdx.x == 0) eta[t] = 0.0f;
      continue;
    }
    if (mode == static_cast<int>(Shift::kMean)) {
      double acc = 0.0;
      for (int64_t j = threadIdx.x; j < K; j += kThreads) acc += static_cast<double>(to_f(xr[j]));
      const double sum = block_sum(acc, sd);
      if (threadIdx.x == 0) eta[t] = mean_shift(sum, K);
      continue;
    }
    if (threadIdx.x == 0) any_nan = 0;
    __syncthreads();
    for (int64_t j = threadIdx.x; j < K; j += kThreads) {
      const float v = to_f(xr[j]);
      if (v != v) any_nan = 1;
    }
    __syncthreads();
    if (any_nan) {
      if (threadIdx.x == 0) eta[t] = __int_as_float(0x7fc00000);
      __syncthreads();
      continue;
    }
    uint32_t prefix = 0, mask = 0;
    int64_t rank = lower_median_rank(K);
    for (int shift = 24; shift >= 0; shift -= 8) {
      hist[threadIdx.x] = 0;
      __syncthreads();
      for (int64_t j = threadIdx.x; j < K; j += kThreads) {
        const uint32_t key = score_key(to_f(xr[j]));
        if ((key & mask) == prefix) atomicAdd(&hist[(key >> shift) & 255u], 1u);
      }
      __syncthreads();
      if (threadIdx.x == 0) {
        int64_t cum = 0;
        for (uint32_t d = 0; d < 256; ++d) {
          if (cum + hist[d] > rank) {
            s_prefix = prefix | (d << shift);
            s_rank = rank - cum;
            break;
          }
          cum += hist[d];
        }
      }
      __syncthreads();
      prefix = s_prefix;
      rank = s_rank;
      mask |= 255u << shift;
      __syncthreads();
    }
    if (threadIdx.x == 0) eta[t] = canonical_shift(key_score(prefix));
    __syncthreads();
  }
}

template <typename T>
__global__ void subtract_kernel(const T* x, const float* eta, T* xc, T* eta_out, int64_t total, int64_t K) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t t = i / K;
    xc[i] = from_f<T>(to_f(x[i]) - eta[t]);
    if (i % K == 0) eta_out[t] = from_f<T>(eta[t]);
  }
}

template <typename T>
__global__ void eta_out_kernel(const float* eta, T* eta_out, int64_t T_) {
  for (int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; t < T_; t += int64_t(gridDim.x) * blockDim.x)
    eta_out[t] = from_f<T>(eta[t]);
}

// clact column norms: float64 sum of squares in row order (as on the CPU), one thread per column.
template <typename T>
__global__ void column_norm_kernel(const T* x, int64_t T_, int64_t K, float* colnorm) {
  for (int64_t j = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; j < K; j += int64_t(gridDim.x) * blockDim.x) {
    double acc = 0.0;
    for (int64_t t = 0; t < T_; ++t) {
      const double v = to_f(x[t * K + j]);
      acc += v * v;
    }
    colnorm[j] = static_cast<float>(sqrt(acc));
  }
}

// Score key of element (t, j): |x - eta_t| * scale_j * colnorm_j (absent factors: exact 1).
template <typename T>
__device__ __forceinline__ uint32_t key_at(const T* x, int64_t i, int64_t j, float eta, const T* scale,
                                           const float* colnorm) {
  const float v = to_f(x[i]) - eta;
  return score_key(element_score(v, scale ? to_f(scale[j]) : 1.0f, colnorm ? colnorm[j] : 1.0f));
}

// One thread per element: rank inside its group (tie rule), then the masked value.
template <typename T>
__global__ void nm_keep_kernel(const T* x, const float* eta, const T* scale, const float* colnorm, int64_t total,
                               int64_t K, int n, int m, T* y, float* xh, uint8_t* keep) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t t = i / K, j = i % K, jj = j % m, g0 = i - jj, c0 = j - jj;
    const float e = eta ? eta[t] : 0.0f;
    const uint32_t kj = key_at(x, i, j, e, scale, colnorm);
    int r = 0;
    for (int q = 0; q < m && r < n; ++q) {
      const uint32_t kq = key_at(x, g0 + q, c0 + q, e, scale, colnorm);
      r += (kq > kj) | ((kq == kj) & (q < jj));
    }
    const bool kept = r < n;
    if (y) y[i] = kept ? x[i] : from_f<T>(0.0f);
    if (xh) xh[i] = kept ? to_f(x[i]) - e : 0.0f;
    if (keep) keep[i] = kept ? 1 : 0;
  }
}

// Variance-correction factor per row (one block per row), float64 two-pass variances.
template <typename T>
__global__ void variance_kernel(const T* x, const float* xh, int64_t T_, int64_t K, float* v) {
  __shared__ double sd[kThreads];
  for (int64_t t = blockIdx.x; t < T_; t += gridDim.x) {
    const T* xr = x + t * K;
    const float* hr = xh + t * K;
    double sx = 0, sh = 0;
    for (int64_t j = threadIdx.x; j < K; j += kThreads) {
      sx += to_f(xr[j]);
      sh += hr[j];
    }
    const double mx = block_sum(sx, sd) / K, mh = block_sum(sh, sd) / K;
    double qx = 0, qh = 0;
    for (int64_t j = threadIdx.x; j < K; j += kThreads) {
      const double dx = to_f(xr[j]) - mx, dh = hr[j] - mh;
      qx += dx * dx;
      qh += dh * dh;
    }
    const double vx = block_sum(qx, sd), vh = block_sum(qh, sd);
    if (threadIdx.x == 0) v[t] = K < 2 ? 1.0f : variance_scale(vx / (K - 1), vh / (K - 1), K);
  }
}

// The epilogue of output (t, o) from its GEMM sum z: ((z + eta_t * sb[o]) * v_t) + bias[o], each term
// when given, in float32, cast to T.
template <typename T>
__device__ __forceinline__ T finish(float z, int64_t t, int64_t o, const float* eta, const T* sb, const float* v,
                                    const T* bias) {
  if (sb) z = z + eta[t] * to_f(sb[o]);
  if (v) z = z * v[t];
  if (bias) z = z + to_f(bias[o]);
  return from_f<T>(z);
}

// Many tokens: Y[t, o] = finish(sum over kept k of xh[t, k] * B[k, o]); one thread per output.
template <typename T>
__global__ void sparse_gemm_kernel(const float* xh, const uint8_t* keep, const T* b, const float* eta, const T* sb,
                                   const float* v, const T* bias, int64_t T_, int64_t K, int64_t O, T* y) {
  const int64_t total = T_ * O;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t t = i / O, o = i % O;
    const float* hr = xh + t * K;
    const uint8_t* kr = keep + t * K;
    float z = 0.0f;
    for (int64_t k = 0; k < K; ++k)
      if (kr[k]) z += hr[k] * to_f(b[k * O + o]);
    y[i] = finish(z, t, o, eta, sb, v, bias);
  }
}

// NMSparseMatMulNBits, one thread per output (t, o): Y[t, o] = finish(sum over kept k of xh[t, k] * W[k, o]) with
// W[k, o] = (q[k, o] - zp[k / bs, o]) * scales[k / bs, o] dequantized in float32 as the reference does
// (B [K, width] uint8 K-major, 4-bit: column 2j in the low nibble of byte j; zp null: 2^(bits-1)).
__device__ __forceinline__ int nbits_at(const uint8_t* row, int64_t o, int bits) {
  if (bits == 8) return row[o];
  const uint8_t byte = row[o >> 1];
  return (o & 1) ? byte >> 4 : byte & 15;
}

template <typename T>
__global__ void sparse_gemm_nbits_kernel(const float* xh, const uint8_t* keep, const uint8_t* b, const float* scales,
                                         const uint8_t* zp, int bits, int64_t bs, const float* eta, const T* sb,
                                         const float* v, const T* bias, int64_t T_, int64_t K, int64_t O, T* y) {
  const int64_t total = T_ * O, width = (O * bits + 7) / 8;
  const float zdef = static_cast<float>(1 << (bits - 1));
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t t = i / O, o = i % O;
    const float* hr = xh + t * K;
    const uint8_t* kr = keep + t * K;
    float z = 0.0f;
    for (int64_t k = 0; k < K; ++k) {
      if (!kr[k]) continue;
      const int64_t blk = k / bs;
      const float q = static_cast<float>(nbits_at(b + k * width, o, bits));
      const float zq = zp ? static_cast<float>(nbits_at(zp + blk * width, o, bits)) : zdef;
      z += hr[k] * ((q - zq) * scales[blk * O + o]);
    }
    y[i] = finish(z, t, o, eta, sb, v, bias);
  }
}

// Decode: Y = finish(z) of the float32 sums z [T, O] of the split-K GEMV (sparse_gemv.cu).
template <typename T>
__global__ void finish_kernel(const float* z, const float* eta, const T* sb, const float* v, const T* bias,
                              int64_t T_, int64_t O, T* y) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < T_ * O; i += int64_t(gridDim.x) * blockDim.x)
    y[i] = finish(z[i], i / O, i % O, eta, sb, v, bias);
}

// Kept-index lists of an N:M keep mask [T, K] (exactly n kept per group of m): group g (groups of all
// rows in order, K / m per row) writes its kept columns, ascending, to idx[g * n .. g * n + n), so
// row t's list is idx[t * kept ..) with kept = K / m * n. One thread per group, no scan.
__global__ void group_indices_kernel(const uint8_t* keep, int64_t groups, int64_t groups_per_row, int m, int n,
                                     int32_t* idx) {
  for (int64_t g = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; g < groups; g += int64_t(gridDim.x) * blockDim.x) {
    const uint8_t* kr = keep + g * m;
    int32_t* out = idx + g * n;
    const int32_t j0 = static_cast<int32_t>((g % groups_per_row) * m);
    int c = 0;
    for (int q = 0; q < m && c < n; ++q)
      if (kr[q]) out[c++] = j0 + q;
  }
}

// Device scratch on the compute stream.
struct Scratch {
  cudaStream_t stream;
  void* p = nullptr;
  Scratch(size_t bytes, cudaStream_t s) : stream(s) {
    if (bytes) check(cudaMallocAsync(&p, bytes, s), "cudaMallocAsync");
  }
  ~Scratch() {
    if (p) cudaFreeAsync(p, stream);
  }
  template <typename U>
  U* as() const { return static_cast<U*>(p); }
};

// The launchers take the device pointers untyped (launch.h) and cast them to the node's element type T.
template <typename T>
void token_shift_t(const void* xv, void* xcv, void* etav, int64_t T_, int64_t K, const TokenShiftAttrs& a,
                   cudaStream_t s) {
  if (T_ == 0) return;
  const T* x = static_cast<const T*>(xv);
  T* eta_out = static_cast<T*>(etav);
  Scratch eta(sizeof(float) * T_, s);
  row_shift_kernel<T><<<blocks_for(T_ * kThreads), kThreads, 0, s>>>(x, T_, K, static_cast<int>(a.mode),
                                                                     eta.as<float>());
  if (K > 0)
    subtract_kernel<T><<<blocks_for(T_ * K), kThreads, 0, s>>>(x, eta.as<float>(), static_cast<T*>(xcv), eta_out,
                                                               T_ * K, K);
  else
    eta_out_kernel<T><<<blocks_for(T_), kThreads, 0, s>>>(eta.as<float>(), eta_out, T_);
  check(cudaGetLastError(), "TokenShift CUDA kernel");
}

template <typename T>
void nm_mask_t(const void* xv, const void* csv, void* yv, int64_t T_, int64_t K, const NMMaskAttrs& a,
               cudaStream_t s) {
  if (T_ * K == 0) return;
  const T* x = static_cast<const T*>(xv);
  const bool clact = a.criterion == Criterion::kClact;
  Scratch colnorm(clact ? sizeof(float) * K : 0, s);
  if (clact) column_norm_kernel<T><<<blocks_for(K), kThreads, 0, s>>>(x, T_, K, colnorm.as<float>());
  nm_keep_kernel<T><<<blocks_for(T_ * K), kThreads, 0, s>>>(x, nullptr, static_cast<const T*>(csv),
                                                            colnorm.as<float>(), T_ * K, K, a.n, a.m,
                                                            static_cast<T*>(yv), nullptr, nullptr);
  check(cudaGetLastError(), "NMMask CUDA kernel");
}

// The row steps both sparse matmuls share: per-token shift eta, the shifted and pruned rows xh, the keep
// mask and (with variance correction) the factor v, all on the stream, in scratch that lives as long as this.
struct Selection {
  Scratch eta, v, xh, keep;
  template <typename T>
  Selection(const T* x, const void* csv, int64_t T_, int64_t K, const NMSparseMatMulAttrs& p, cudaStream_t s)
      : eta(sizeof(float) * T_, s), v(sizeof(float) * T_, s), xh(sizeof(float) * T_ * K, s), keep(T_ * K, s) {
    row_shift_kernel<T><<<blocks_for(T_ * kThreads), kThreads, 0, s>>>(x, T_, K, static_cast<int>(p.shift),
                                                                       eta.as<float>());
    if (K > 0)
      nm_keep_kernel<T><<<blocks_for(T_ * K), kThreads, 0, s>>>(x, eta.as<float>(), static_cast<const T*>(csv),
                                                                nullptr, T_ * K, K, p.n, p.m, nullptr,
                                                                xh.as<float>(), keep.as<uint8_t>());
    if (p.variance_correction)
      variance_kernel<T><<<blocks_for(T_ * kThreads), kThreads, 0, s>>>(x, xh.as<float>(), T_, K, v.as<float>());
  }
};

template <typename T>
void nm_sparse_matmul_t(const void* xv, const void* bv, const void* csv, const void* sbv, const void* biasv, void* yv,
                        int64_t T_, int64_t K, int64_t O, const NMSparseMatMulAttrs& p, cudaStream_t s) {
  if (T_ * O == 0) return;
  const Selection sel(static_cast<const T*>(xv), csv, T_, K, p, s);
  const Scratch &eta = sel.eta, &v = sel.v, &xh = sel.xh, &keep = sel.keep;
  const T* b = static_cast<const T*>(bv);
  const T* sb = static_cast<const T*>(sbv);
  const T* bias = static_cast<const T*>(biasv);
  const float* vt = p.variance_correction ? v.as<float>() : nullptr;
  if (T_ <= kDecodeRows) {  // read only the kept rows of B, split over K so that one token fills the GPU
    const int64_t kept = K / p.m * p.n, groups = T_ * (K / p.m);
    Scratch idx(sizeof(int32_t) * T_ * kept, s), z(sizeof(float) * T_ * O, s);
    if (kept > 0)
      group_indices_kernel<<<blocks_for(groups), kThreads, 0, s>>>(keep.as<uint8_t>(), groups, K / p.m, p.m, p.n,
                                                                    idx.as<int32_t>());
    check(sparse_gemv<T>(xh.as<float>(), idx.as<int32_t>(), T_, K, kept, b, O, z.as<float>(), s), "sparse GEMV");
    finish_kernel<T><<<blocks_for(T_ * O), kThreads, 0, s>>>(z.as<float>(), eta.as<float>(), sb, vt, bias, T_, O,
                                                             static_cast<T*>(yv));
  } else {
    sparse_gemm_kernel<T><<<blocks_for(T_ * O), kThreads, 0, s>>>(xh.as<float>(), keep.as<uint8_t>(), b,
                                                                  eta.as<float>(), sb, vt, bias, T_, K, O,
                                                                  static_cast<T*>(yv));
  }
  check(cudaGetLastError(), "NMSparseMatMul CUDA kernel");
}

template <typename T>
void nm_sparse_matmul_nbits_t(const void* xv, const uint8_t* b, const float* scales, const uint8_t* zp,
                              const void* csv, const void* sbv, const void* biasv, void* yv, int64_t T_, int64_t K,
                              int64_t O, const NMSparseMatMulNBitsAttrs& p, cudaStream_t s) {
  if (T_ * O == 0) return;
  const Selection sel(static_cast<const T*>(xv), csv, T_, K, p, s);
  const Scratch &eta = sel.eta, &v = sel.v, &xh = sel.xh, &keep = sel.keep;
  sparse_gemm_nbits_kernel<T><<<blocks_for(T_ * O), kThreads, 0, s>>>(
      xh.as<float>(), keep.as<uint8_t>(), b, scales, zp, p.bits, p.block_size, eta.as<float>(),
      static_cast<const T*>(sbv), p.variance_correction ? v.as<float>() : nullptr, static_cast<const T*>(biasv), T_, K,
      O, static_cast<T*>(yv));
  check(cudaGetLastError(), "NMSparseMatMulNBits CUDA kernel");
}

}  // namespace

#define NM_DISPATCH(dt, FN, ...)                                  \
  switch (dt) {                                                   \
    case DType::kF32: FN<float>(__VA_ARGS__); break;              \
    case DType::kF16: FN<__half>(__VA_ARGS__); break;             \
    case DType::kBF16: FN<__nv_bfloat16>(__VA_ARGS__); break;     \
  }

void token_shift(DType dt, const void* x, void* xc, void* eta, int64_t T, int64_t K, const TokenShiftAttrs& a,
                 void* stream) {
  NM_DISPATCH(dt, token_shift_t, x, xc, eta, T, K, a, static_cast<cudaStream_t>(stream))
}
void nm_mask(DType dt, const void* x, const void* cs, void* y, int64_t T, int64_t K, const NMMaskAttrs& a,
             void* stream) {
  NM_DISPATCH(dt, nm_mask_t, x, cs, y, T, K, a, static_cast<cudaStream_t>(stream))
}
void nm_sparse_matmul(DType dt, const void* x, const void* b, const void* cs, const void* sb, const void* bias,
                      void* y, int64_t T, int64_t K, int64_t O, const NMSparseMatMulAttrs& a, void* stream) {
  NM_DISPATCH(dt, nm_sparse_matmul_t, x, b, cs, sb, bias, y, T, K, O, a, static_cast<cudaStream_t>(stream))
}
void nm_sparse_matmul_nbits(DType dt, const void* x, const uint8_t* b, const float* scales, const uint8_t* zp,
                            const void* cs, const void* sb, const void* bias, void* y, int64_t T, int64_t K, int64_t O,
                            const NMSparseMatMulNBitsAttrs& a, void* stream) {
  NM_DISPATCH(dt, nm_sparse_matmul_nbits_t, x, b, scales, zp, cs, sb, bias, y, T, K, O, a,
              static_cast<cudaStream_t>(stream))
}

}  // namespace cuda
}  // namespace nm_onnx

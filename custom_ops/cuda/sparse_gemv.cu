// Split-K GEMV over the kept rows of B (see sparse_gemv.cuh).
//
// Grid: x = column tiles of kThreads * kCols outputs, y = chunks of kChunk kept indices, z = tokens.
// A block stages its chunk's indices and activations in shared memory, then each thread walks the
// chunk and accumulates kCols columns (coalesced: consecutive threads read consecutive columns of
// the same kept row of B) in float32 registers, and adds them into Y with one atomicAdd per output.
#include "sparse_gemv.cuh"

namespace nm_onnx {
namespace cuda {
namespace {

constexpr int kThreads = 128;  // threads per block
constexpr int kCols = 4;       // output columns per thread: a block covers 512 columns
constexpr int kChunk = 256;    // kept rows per block (the split-K chunk)

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename TB>
__global__ void __launch_bounds__(kThreads) sparse_gemv_kernel(const float* __restrict__ X,
                                                               const int32_t* __restrict__ idx, int64_t K,
                                                               int64_t kept, const TB* __restrict__ B, int64_t O,
                                                               float* __restrict__ Y) {
  __shared__ int64_t s_row[kChunk];
  __shared__ float s_a[kChunk];
  const int64_t t = blockIdx.z;
  const int64_t j0 = static_cast<int64_t>(blockIdx.y) * kChunk;
  const int n = static_cast<int>(kept - j0 < kChunk ? kept - j0 : kChunk);
  for (int i = threadIdx.x; i < n; i += kThreads) {
    const int64_t k = idx[t * kept + j0 + i];
    s_row[i] = k * O;
    s_a[i] = X[t * K + k];
  }
  __syncthreads();
  const int64_t o0 = static_cast<int64_t>(blockIdx.x) * (kThreads * kCols) + threadIdx.x;
  float acc[kCols];
#pragma unroll
  for (int c = 0; c < kCols; ++c) acc[c] = 0.0f;
  if (o0 + (kCols - 1) * kThreads < O) {  // full tile: no bounds checks in the hot loop
    for (int j = 0; j < n; ++j) {
      const TB* row = B + s_row[j] + o0;
      const float a = s_a[j];
#pragma unroll
      for (int c = 0; c < kCols; ++c) acc[c] = __fmaf_rn(a, to_float(row[c * kThreads]), acc[c]);
    }
  } else {
    for (int j = 0; j < n; ++j) {
      const TB* row = B + s_row[j] + o0;
      const float a = s_a[j];
#pragma unroll
      for (int c = 0; c < kCols; ++c)
        if (o0 + c * kThreads < O) acc[c] = __fmaf_rn(a, to_float(row[c * kThreads]), acc[c]);
    }
  }
#pragma unroll
  for (int c = 0; c < kCols; ++c)
    if (o0 + c * kThreads < O) atomicAdd(Y + t * O + o0 + c * kThreads, acc[c]);
}

// One block per row: a block-wide stream compaction of the keep mask, kThreads entries at a time.
__global__ void __launch_bounds__(kThreads) keep_to_indices_kernel(const uint8_t* __restrict__ keep, int64_t K,
                                                                   int64_t kept, int32_t* __restrict__ idx) {
  __shared__ int warp_total[kThreads / 32];
  const int64_t t = blockIdx.x;
  const uint8_t* kr = keep + t * K;
  int32_t* out = idx + t * kept;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int64_t base = 0;
  for (int64_t j0 = 0; j0 < K; j0 += kThreads) {
    const int64_t j = j0 + threadIdx.x;
    const bool on = j < K && kr[j] != 0;
    const unsigned ballot = __ballot_sync(0xffffffffu, on);
    if (lane == 0) warp_total[warp] = __popc(ballot);
    __syncthreads();
    int before = 0, total = 0;
#pragma unroll
    for (int w = 0; w < kThreads / 32; ++w) {
      before += w < warp ? warp_total[w] : 0;
      total += warp_total[w];
    }
    const int64_t pos = base + before + __popc(ballot & ((1u << lane) - 1u));
    if (on && pos < kept) out[pos] = static_cast<int32_t>(j);
    base += total;
    __syncthreads();
  }
}

}  // namespace

cudaError_t keep_to_indices(const uint8_t* keep, int64_t rows, int64_t K, int64_t kept, int32_t* idx,
                            cudaStream_t stream) {
  if (rows < 0 || K < 0 || kept < 0 || kept > K) return cudaErrorInvalidValue;
  if (rows == 0 || kept == 0) return cudaSuccess;
  if (!keep || !idx || rows > 2147483647LL) return cudaErrorInvalidValue;
  keep_to_indices_kernel<<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(keep, K, kept, idx);
  return cudaGetLastError();
}

template <typename TB>
cudaError_t sparse_gemv(const float* X, const int32_t* idx, int64_t rows, int64_t K, int64_t kept, const TB* B,
                        int64_t O, float* Y, cudaStream_t stream) {
  if (rows < 0 || K < 0 || kept < 0 || kept > K || O < 0) return cudaErrorInvalidValue;
  if (rows == 0 || O == 0) return cudaSuccess;
  if (!Y) return cudaErrorInvalidValue;
  cudaError_t err = cudaMemsetAsync(Y, 0, sizeof(float) * static_cast<size_t>(rows * O), stream);
  if (err != cudaSuccess || kept == 0) return err;
  if (!X || !idx || !B) return cudaErrorInvalidValue;
  const int64_t tiles = (O + kThreads * kCols - 1) / (kThreads * kCols);
  const int64_t chunks = (kept + kChunk - 1) / kChunk;
  if (tiles > 2147483647LL || chunks > 65535 || rows > 65535) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(chunks), static_cast<unsigned>(rows));
  sparse_gemv_kernel<TB><<<grid, kThreads, 0, stream>>>(X, idx, K, kept, B, O, Y);
  return cudaGetLastError();
}

template cudaError_t sparse_gemv<float>(const float*, const int32_t*, int64_t, int64_t, int64_t, const float*,
                                        int64_t, float*, cudaStream_t);
template cudaError_t sparse_gemv<__half>(const float*, const int32_t*, int64_t, int64_t, int64_t, const __half*,
                                         int64_t, float*, cudaStream_t);
template cudaError_t sparse_gemv<__nv_bfloat16>(const float*, const int32_t*, int64_t, int64_t, int64_t,
                                                const __nv_bfloat16*, int64_t, float*, cudaStream_t);

}  // namespace cuda
}  // namespace nm_onnx

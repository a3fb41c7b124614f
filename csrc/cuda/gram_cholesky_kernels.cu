// One thread block factors one matrix (left-looking Cholesky): warp 0 forms each pivot, all warps then
// fill the column below it, each row's dot product spread over the 32 lanes for coalesced reads. A
// failed pivot restarts the matrix with the next jitter; no host round trip is needed.
#include "gram_cholesky_kernels.h"

#include <cmath>
#include <stdexcept>
#include <string>

namespace revgn {
namespace cuda {
namespace {

constexpr int kThreads = 256;

template <typename T>
__device__ T warp_sum(T v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

template <typename T>
__global__ void cholesky_with_jitter_kernel(const T* __restrict__ G_all, T* __restrict__ L_all,
                                            int* __restrict__ info, T* __restrict__ jitter_out, int n,
                                            JitterSchedule schedule) {
  const int b = blockIdx.x;
  const T* G = G_all + static_cast<size_t>(b) * n * n;
  T* L = L_all + static_cast<size_t>(b) * n * n;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;

  __shared__ T pivot;
  __shared__ T scale;
  __shared__ int failed;

  if (warp == 0) {
    T s = 0;
    for (int i = lane; i < n; i += 32) s += G[static_cast<size_t>(i) * n + i];
    s = warp_sum(s);
    // An all-zero Gram: any jitter works. A non-finite one (direct calls only) gets a finite scale.
    if (lane == 0) scale = (fabs(s / n) > T(0) && isfinite(s)) ? fabs(s / n) : T(1);
  }
  __syncthreads();

  const T floor = static_cast<T>(schedule.pivot_floor) * scale;
  int attempt = 0;
  T added = 0;
  for (; attempt <= schedule.count; ++attempt) {
    added = attempt == 0 ? T(0) : static_cast<T>(schedule.rel[attempt - 1]) * scale;
    if (threadIdx.x == 0) failed = 0;
    __syncthreads();
    for (int j = 0; j < n; ++j) {
      const T* Lj = L + static_cast<size_t>(j) * n;
      if (warp == 0) {
        T s = 0;
        for (int k = lane; k < j; k += 32) s += Lj[k] * Lj[k];
        s = warp_sum(s);
        if (lane == 0) {
          const T d = G[static_cast<size_t>(j) * n + j] + added - s;
          if (d > floor && isfinite(d)) {
            pivot = sqrt(d);
            L[static_cast<size_t>(j) * n + j] = pivot;
          } else {
            failed = 1;
          }
        }
      }
      __syncthreads();
      if (failed) break;
      const T inv = T(1) / pivot;
      for (int i = j + 1 + warp; i < n; i += nwarps) {
        const T* Li = L + static_cast<size_t>(i) * n;
        T s = 0;
        for (int k = lane; k < j; k += 32) s += Li[k] * Lj[k];
        s = warp_sum(s);
        if (lane == 0) L[static_cast<size_t>(i) * n + j] = (G[static_cast<size_t>(i) * n + j] - s) * inv;
      }
      __syncthreads();
    }
    if (!failed) break;
    __syncthreads();
  }

  const bool ok = attempt <= schedule.count;
  for (int idx = threadIdx.x; idx < n * n; idx += blockDim.x) {
    const int i = idx / n, k = idx % n;
    if (!ok) {
      // Non-finite input only: a diagonal factor keeps the output finite; info reports it.
      const T g = G[static_cast<size_t>(i) * n + i];
      L[idx] = (i == k) ? sqrt(isfinite(g) && g > T(0) ? g : T(1)) : T(0);
    } else if (k > i) {
      L[idx] = T(0);
    }
  }
  if (threadIdx.x == 0) {
    info[b] = ok ? attempt : -1;
    jitter_out[b] = ok ? added : scale;
  }
}

}  // namespace

template <typename T>
void cholesky_with_jitter(const T* G, T* L, int* info, T* jitter, int B, int n, const JitterSchedule& schedule,
                          cudaStream_t stream) {
  if (B == 0) return;
  cholesky_with_jitter_kernel<T><<<B, kThreads, 0, stream>>>(G, L, info, jitter, n, schedule);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("revgn: cholesky_with_jitter launch failed: ") + cudaGetErrorString(err));
  }
}

template void cholesky_with_jitter<float>(const float*, float*, int*, float*, int, int, const JitterSchedule&,
                                          cudaStream_t);
template void cholesky_with_jitter<double>(const double*, double*, int*, double*, int, int,
                                           const JitterSchedule&, cudaStream_t);

}  // namespace cuda
}  // namespace revgn

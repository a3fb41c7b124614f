// Library path of the batched Gram-Cholesky factorisation (large n): cuSOLVER has factored every
// matrix; one thread block per matrix checks the factor against the pivot floor and, only if it failed,
// refactors the matrix with growing jitter (left-looking Cholesky: warp 0 forms each pivot, all warps
// then fill the column below it, each row's dot product spread over the 32 lanes for coalesced reads).
// Failures are rare, so this kernel costs one pass over the diagonals; there is no host round trip.
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
__global__ void verify_or_retry_kernel(const T* __restrict__ G_all, T* __restrict__ L_all,
                                       const int* __restrict__ status, int* __restrict__ info,
                                       T* __restrict__ jitter_out, int n, JitterSchedule schedule) {
  const int b = blockIdx.x;
  const T* G = G_all + static_cast<size_t>(b) * n * n;
  T* L = L_all + static_cast<size_t>(b) * n * n;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;

  __shared__ T pivot;
  __shared__ T scale;
  __shared__ int failed;
  __shared__ int nonfinite;

  if (warp == 0) {
    T s = 0;
    for (int i = lane; i < n; i += 32) s += G[static_cast<size_t>(i) * n + i];
    s = warp_sum(s);
    // An all-zero Gram: any jitter works. A non-finite one (direct calls only) gets a finite scale.
    if (lane == 0) scale = (fabs(s / n) > T(0) && isfinite(s)) ? fabs(s / n) : T(1);
  }
  if (threadIdx.x == 0) {
    failed = status[b] != 0;
    nonfinite = 0;
  }
  __syncthreads();
  const T floor = static_cast<T>(schedule.pivot_floor) * scale;
  for (int j = threadIdx.x; j < n; j += blockDim.x) {
    const T p = L[static_cast<size_t>(j) * n + j];
    if (!(p * p > floor) || !isfinite(p)) failed = 1;  // also catches NaN pivots
  }
  // A non-finite entry anywhere in G (either triangle) fails outright, without retries, as on the CPU.
  for (size_t idx = threadIdx.x; idx < static_cast<size_t>(n) * n; idx += blockDim.x) {
    if (!isfinite(G[idx])) nonfinite = 1;
  }
  __syncthreads();
  if (nonfinite && threadIdx.x == 0) failed = 1;
  __syncthreads();
  if (!failed) {
    if (threadIdx.x == 0) {
      info[b] = 0;
      jitter_out[b] = T(0);
    }
    return;
  }

  int attempt = 1;
  T added = 0;
  for (; attempt <= schedule.count && !nonfinite; ++attempt) {
    added = static_cast<T>(schedule.rel[attempt - 1]) * scale;
    __syncthreads();
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
  }

  const bool ok = !nonfinite && attempt <= schedule.count;
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
void verify_or_retry_cholesky(const T* G, T* L, const int* status, int* info, T* jitter, int B, int n,
                              const JitterSchedule& schedule, cudaStream_t stream) {
  if (B == 0) return;
  verify_or_retry_kernel<T><<<B, kThreads, 0, stream>>>(G, L, status, info, jitter, n, schedule);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("revgn: verify_or_retry_cholesky launch failed: ") +
                             cudaGetErrorString(err));
  }
}

template void verify_or_retry_cholesky<float>(const float*, float*, const int*, int*, float*, int, int,
                                              const JitterSchedule&, cudaStream_t);
template void verify_or_retry_cholesky<double>(const double*, double*, const int*, int*, double*, int, int,
                                               const JitterSchedule&, cudaStream_t);

}  // namespace cuda
}  // namespace revgn

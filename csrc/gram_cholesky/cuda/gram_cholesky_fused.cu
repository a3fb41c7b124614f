// Fused small-n path of the batched Gram-Cholesky solve. A thread block owns one matrix and one chunk
// of kFusedColumns right-hand-side columns:
//   1. assemble G = gram + 1 1^T (append_ones) + damping I straight into shared memory;
//   2. factor it there (right-looking, one barrier per column, scaling deferred to the end so that the
//      trailing update never races with the column it reads), retrying with the jitter schedule when a
//      pivot falls to the floor; or load a given factor;
//   3. solve L L^T U = R for the chunk: each warp owns 4 columns with the rows spread over its lanes in
//      registers, pivots broadcast by shuffles, no block barriers; then 1^T U by a warp reduction.
// The failure semantics (pivot floor, jitter schedule, info, jitter, diagonal fallback) are those of
// revgn_ext.reference.gram_factor.
#include "gram_cholesky_kernels.h"

#include <stdexcept>
#include <string>

namespace revgn {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kColumnsPerWarp = kFusedColumns / kWarps;
// Dynamic shared memory we opt in to: sm_90's 227 KiB per block, less 1 KiB for the kernel's static
// shared variables (opt-in dynamic + static must stay within the per-block limit).
constexpr int kSharedLimit = 226 * 1024;

static_assert(kColumnsPerWarp * kWarps == kFusedColumns, "columns must split evenly over warps");

size_t shared_bytes(int n, int element_size) {
  return (static_cast<size_t>(n) * (n + 1) + static_cast<size_t>(n) * (kFusedColumns + 1)) * element_size;
}

// rows = ceil(n / 32): the registers each lane holds per column.
template <typename T, int kRows>
__global__ void __launch_bounds__(kThreads) fused_gram_kernel(FusedGramArgs<T> a, JitterSchedule schedule) {
  extern __shared__ unsigned char smem_raw[];
  T* S = reinterpret_cast<T*>(smem_raw);  // n x (n + 1): the factor (odd row stride: no bank conflicts)
  const int n = a.n, ld = n + 1;
  T* Y = S + static_cast<size_t>(n) * ld;  // n x (kFusedColumns + 1): staging for R and U
  constexpr int ldy = kFusedColumns + 1;
  const int b = blockIdx.x, chunk = blockIdx.y;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const bool writer = chunk == 0;

  __shared__ T scale_s;
  __shared__ int status_s;  // attempt that succeeded, -1 when all failed
  __shared__ int nonfinite_s;  // a non-finite entry of the damped Gram (either triangle): no retries

  if (a.L_in == nullptr) {
    const T* gram = a.gram + static_cast<size_t>(b) * n * n;
    const T ones = a.append_ones ? T(1) : T(0);
    const T lambda = a.damping[b];
    auto assemble = [&](T added) {
      for (int idx = tid; idx < n * n; idx += kThreads) {
        const int i = idx / n, j = idx - i * n;
        if (j <= i) S[i * ld + j] = (i == j) ? (gram[idx] + ones) + lambda + added : gram[idx] + ones;
      }
    };
    if (tid == 0) nonfinite_s = 0;
    __syncthreads();
    assemble(T(0));
    for (int idx = tid; idx < n * n; idx += kThreads) {
      const int i = idx / n, j = idx - i * n;
      const T v = (i == j) ? (gram[idx] + ones) + lambda : gram[idx] + ones;
      if (!isfinite(v)) nonfinite_s = 1;
    }
    __syncthreads();
    if (warp == 0) {
      T s = 0;
      for (int i = lane; i < n; i += 32) s += S[i * ld + i];
      for (int offset = 16; offset > 0; offset >>= 1) s += __shfl_down_sync(0xffffffffu, s, offset);
      // An all-zero Gram: any jitter works. A non-finite one (direct calls only) gets a finite scale.
      if (lane == 0) scale_s = (fabs(s / n) > T(0) && isfinite(s)) ? fabs(s / n) : T(1);
    }
    __syncthreads();
    const T scale = scale_s;
    const T floor = static_cast<T>(schedule.pivot_floor) * scale;
    const bool nonfinite = nonfinite_s != 0;
    int attempt = nonfinite ? schedule.count + 1 : 0;
    for (; attempt <= schedule.count; ++attempt) {
      if (attempt > 0) {
        assemble(static_cast<T>(schedule.rel[attempt - 1]) * scale);
        __syncthreads();
      }
      bool failed = false;
      for (int j = 0; j < n; ++j) {
        // S[j][j] is final here (barrier at the end of the previous column), so every thread reaches
        // the same verdict without another barrier.
        const T d = S[j * ld + j];
        if (!(d > floor) || !isfinite(d)) {
          failed = true;
          break;
        }
        const T inv_d = T(1) / d;
        for (int i = j + 1 + warp; i < n; i += kWarps) {
          const T lij = S[i * ld + j] * inv_d;
          for (int c = j + 1 + lane; c <= i; c += 32) S[i * ld + c] -= lij * S[c * ld + j];
        }
        __syncthreads();
      }
      __syncthreads();
      if (!failed) break;
    }
    const bool ok = attempt <= schedule.count;
    if (ok) {
      // S holds the pivots d_j on the diagonal and L_ij sqrt(d_j) below it.
      for (int idx = tid; idx < n * n; idx += kThreads) {
        const int i = idx / n, j = idx - i * n;
        if (j < i) S[i * ld + j] /= sqrt(S[j * ld + j]);
      }
      __syncthreads();
      for (int j = tid; j < n; j += kThreads) S[j * ld + j] = sqrt(S[j * ld + j]);
    } else {
      // Non-finite input only: the diagonal (Jacobi) factor of the damped Gram keeps the result finite.
      for (int idx = tid; idx < n * n; idx += kThreads) {
        const int i = idx / n, j = idx - i * n;
        if (j < i) S[i * ld + j] = T(0);
      }
      for (int j = tid; j < n; j += kThreads) {
        const T g = (gram[static_cast<size_t>(j) * n + j] + ones) + lambda;
        S[j * ld + j] = sqrt(isfinite(g) && g > T(0) ? g : T(1));
      }
    }
    if (tid == 0) status_s = ok ? attempt : -1;
    __syncthreads();
    if (writer) {
      if (tid == 0) {
        a.info[b] = status_s;
        a.jitter[b] = ok ? (attempt == 0 ? T(0) : static_cast<T>(schedule.rel[attempt - 1]) * scale) : scale;
      }
      if (a.L_out != nullptr) {
        T* L = a.L_out + static_cast<size_t>(b) * n * n;
        for (int idx = tid; idx < n * n; idx += kThreads) {
          const int i = idx / n, j = idx - i * n;
          L[idx] = j <= i ? S[i * ld + j] : T(0);
        }
      }
    }
  } else {
    const T* L = a.L_in + static_cast<size_t>(b) * n * n;
    for (int idx = tid; idx < n * n; idx += kThreads) {
      const int i = idx / n, j = idx - i * n;
      if (j <= i) S[i * ld + j] = L[idx];
    }
    __syncthreads();
  }

  if (a.k == 0) return;

  // Stage this chunk of R (coalesced along columns), padding columns past k with zeros.
  const int c0 = chunk * kFusedColumns;
  const T* R = a.R + b * a.R_stride_b;
  for (int idx = tid; idx < n * kFusedColumns; idx += kThreads) {
    const int r = idx / kFusedColumns, c = idx - r * kFusedColumns;
    Y[r * ldy + c] = c0 + c < a.k ? R[r * a.R_stride_r + (c0 + c) * a.R_stride_c] : T(0);
  }
  __syncthreads();

  T y[kRows][kColumnsPerWarp];
  const int cw = warp * kColumnsPerWarp;
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const int i = lane + 32 * r;
#pragma unroll
    for (int q = 0; q < kColumnsPerWarp; ++q) y[r][q] = i < n ? Y[i * ldy + cw + q] : T(0);
  }

  // Forward: L v = r. Row p lives in lane p % 32, register row p / 32.
  for (int p = 0; p < n; ++p) {
    const int owner = p & 31, slot = p >> 5;
    const T inv = T(1) / S[p * ld + p];
#pragma unroll
    for (int q = 0; q < kColumnsPerWarp; ++q) {
      T mine = 0;
#pragma unroll
      for (int r = 0; r < kRows; ++r) mine = r == slot ? y[r][q] : mine;
      const T vp = __shfl_sync(0xffffffffu, mine, owner) * inv;
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        const int i = lane + 32 * r;
        if (i == p) y[r][q] = vp;
        else if (i > p && i < n) y[r][q] -= S[i * ld + p] * vp;
      }
    }
  }
  // Backward: L^T u = v, reading row p of L for column p of L^T.
  for (int p = n - 1; p >= 0; --p) {
    const int owner = p & 31, slot = p >> 5;
    const T inv = T(1) / S[p * ld + p];
#pragma unroll
    for (int q = 0; q < kColumnsPerWarp; ++q) {
      T mine = 0;
#pragma unroll
      for (int r = 0; r < kRows; ++r) mine = r == slot ? y[r][q] : mine;
      const T up = __shfl_sync(0xffffffffu, mine, owner) * inv;
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        const int i = lane + 32 * r;
        if (i == p) y[r][q] = up;
        else if (i < p) y[r][q] -= S[p * ld + i] * up;
      }
    }
  }

  if (a.ones_row != nullptr) {
#pragma unroll
    for (int q = 0; q < kColumnsPerWarp; ++q) {
      T s = 0;
#pragma unroll
      for (int r = 0; r < kRows; ++r) s += y[r][q];  // rows past n hold 0
      for (int offset = 16; offset > 0; offset >>= 1) s += __shfl_down_sync(0xffffffffu, s, offset);
      if (lane == 0 && c0 + cw + q < a.k) a.ones_row[b * a.ones_stride_b + c0 + cw + q] = s;
    }
  }
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const int i = lane + 32 * r;
#pragma unroll
    for (int q = 0; q < kColumnsPerWarp; ++q)
      if (i < n) Y[i * ldy + cw + q] = y[r][q];
  }
  __syncthreads();
  T* U = a.U + static_cast<size_t>(b) * n * a.k;
  for (int idx = tid; idx < n * kFusedColumns; idx += kThreads) {
    const int r = idx / kFusedColumns, c = idx - r * kFusedColumns;
    if (c0 + c < a.k) U[static_cast<size_t>(r) * a.k + c0 + c] = Y[r * ldy + c];
  }
}

template <typename T, int kRows>
void launch(const FusedGramArgs<T>& args, const JitterSchedule& schedule, cudaStream_t stream) {
  const size_t smem = shared_bytes(args.n, sizeof(T));
  static bool configured = false;  // one opt-in per instantiation (the limit is per function)
  if (!configured) {
    const cudaError_t err = cudaFuncSetAttribute(fused_gram_kernel<T, kRows>,
                                                 cudaFuncAttributeMaxDynamicSharedMemorySize, kSharedLimit);
    if (err != cudaSuccess) {
      throw std::runtime_error(std::string("revgn: fused Gram kernel needs ") + std::to_string(smem) +
                               " bytes of shared memory: " + cudaGetErrorString(err));
    }
    configured = true;
  }
  const int chunks = args.k > 0 ? (args.k + kFusedColumns - 1) / kFusedColumns : 1;
  const dim3 grid(args.B, chunks);
  fused_gram_kernel<T, kRows><<<grid, kThreads, smem, stream>>>(args, schedule);
}

}  // namespace

int fused_gram_max_n(int element_size) {
  int n = 32;
  while (n + 16 <= 256 && shared_bytes(n + 16, element_size) <= kSharedLimit) n += 16;
  return n;
}

template <typename T>
void fused_gram_cholesky(const FusedGramArgs<T>& args, const JitterSchedule& schedule, cudaStream_t stream) {
  if (args.B == 0) return;
  if (args.n > fused_gram_max_n(sizeof(T)) || args.n < 1) {
    throw std::runtime_error("revgn: fused Gram kernel called with n = " + std::to_string(args.n));
  }
  if (args.n <= 32) launch<T, 1>(args, schedule, stream);
  else if (args.n <= 64) launch<T, 2>(args, schedule, stream);
  else if (args.n <= 128) launch<T, 4>(args, schedule, stream);
  else launch<T, 8>(args, schedule, stream);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("revgn: fused Gram kernel launch failed: ") + cudaGetErrorString(err));
  }
}

template void fused_gram_cholesky<float>(const FusedGramArgs<float>&, const JitterSchedule&, cudaStream_t);
template void fused_gram_cholesky<double>(const FusedGramArgs<double>&, const JitterSchedule&, cudaStream_t);

}  // namespace cuda
}  // namespace revgn

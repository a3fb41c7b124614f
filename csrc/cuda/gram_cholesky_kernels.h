// Launchers for the CUDA kernels of the batched Gram-Cholesky solve. Kept free of torch headers so
// that the .cu file compiles with nvcc quickly.
#pragma once

#include <cuda_runtime.h>

namespace revgn {
namespace cuda {

constexpr int kMaxJitterTries = 32;

struct JitterSchedule {
  double pivot_floor;  // relative: a pivot L_jj^2 <= pivot_floor * scale fails the factorisation
  int count;
  double rel[kMaxJitterTries];
};

// Factor B damped Grams G (B, n, n) into L, retrying matrices that fail with the jitter schedule; info
// and jitter per matrix as in revgn::gram_factor. Runs without a host sync.
template <typename T>
void cholesky_with_jitter(const T* G, T* L, int* info, T* jitter, int B, int n, const JitterSchedule& schedule,
                          cudaStream_t stream);

}  // namespace cuda
}  // namespace revgn

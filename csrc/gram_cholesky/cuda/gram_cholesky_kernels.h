// Launchers for the CUDA kernels of the batched Gram-Cholesky solve. Kept free of torch headers so
// that the .cu files compile with nvcc quickly.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace revgn {
namespace cuda {

constexpr int kMaxJitterTries = 32;

struct JitterSchedule {
  double pivot_floor;  // relative: a pivot L_jj^2 <= pivot_floor * scale fails the factorisation
  int count;
  double rel[kMaxJitterTries];
};

// ---- Large n (library path): verify a cuSOLVER factor, retry the failures -------------------------
// L (B, n, n) holds cuSOLVER's factors of the damped Grams G and status its info. A matrix passes when
// status is 0 and every pivot L_jj^2 > floor; info 0, jitter 0. A failed one is refactored here with
// the jitter schedule (retry 1, 2, ...), so info and jitter follow revgn::gram_factor. No host sync.
template <typename T>
void verify_or_retry_cholesky(const T* G, T* L, const int* status, int* info, T* jitter, int B, int n,
                              const JitterSchedule& schedule, cudaStream_t stream);

// ---- Small n (fused path): shared-memory Cholesky with jitter retry + both triangular solves -------
// One launch covers a grid of (matrix, column chunk of R). Modes:
// * factor (L_in == nullptr): each block assembles G = gram + (1 if append_ones) + damping I from the
//   plain Gram `gram` (B, n, n), factors it with the jitter schedule in shared memory, and block 0 of
//   each matrix writes info, jitter and, if L_out is set, L (B, n, n);
// * solve with a given factor (L_in set): each block loads L.
// Then, when k > 0, each block solves L L^T U = R for its chunk of columns and writes U (B, n, k,
// contiguous) and, if ones_row is set, 1^T U to ones_row[b * ones_stride_b + c].
template <typename T>
struct FusedGramArgs {
  const T* gram = nullptr;
  const T* damping = nullptr;
  bool append_ones = false;
  const T* L_in = nullptr;
  T* L_out = nullptr;
  int* info = nullptr;
  T* jitter = nullptr;
  const T* R = nullptr;
  int64_t R_stride_b = 0, R_stride_r = 0, R_stride_c = 0;
  T* U = nullptr;
  T* ones_row = nullptr;
  int64_t ones_stride_b = 0;
  int B = 0, n = 0, k = 0;
};

// Largest n the fused kernel takes for this element size (shared memory holds the n x n factor).
int fused_gram_max_n(int element_size);

// Columns of R per block of the fused kernel.
constexpr int kFusedColumns = 32;

template <typename T>
void fused_gram_cholesky(const FusedGramArgs<T>& args, const JitterSchedule& schedule, cudaStream_t stream);

}  // namespace cuda
}  // namespace revgn

// Shared host-side pieces of the batched Gram-Cholesky solve (CPU and CUDA registrations).
#pragma once

#include <ATen/ATen.h>

#include <tuple>
#include <vector>

namespace revgn {

// A factorisation fails when a pivot L_jj^2 <= kPivotFloor * eps * scale (scale = mean of the damped
// Gram's diagonal, 1 for an all-zero Gram); mirrors revgn_ext.reference.PIVOT_FLOOR.
constexpr double kPivotFloor = 10.0;

double dtype_eps(at::ScalarType dtype);

// Relative jitters tried after a failed factorisation, smallest first, ending at 1.0 (mirrors
// revgn_ext.reference.jitter_schedule). With jitter = mean(diag G) the matrix has condition <= n + 1,
// so the last try cannot fail for finite input.
std::vector<double> jitter_schedule(at::ScalarType dtype);

// G = A A^T (+ 1 1^T) + diag(damping), as a fresh contiguous (B, n, n) tensor.
at::Tensor damped_gram(const at::Tensor& A, const at::Tensor& damping, bool append_ones);

// A^T (L L^T)^{-1} R (+ the ones row); device-generic, built from ATen's BLAS/LAPACK calls.
at::Tensor gram_solve(const at::Tensor& A, const at::Tensor& L, const at::Tensor& R, bool append_ones);

// gram_factor_from_gram written into G (B, n, n, contiguous): afterwards G's lower triangle (with the
// diagonal) holds L and its strict upper triangle still holds G's; failed matrices are retried from that
// triangle and the damped diagonal, so no n x n temporary is made. Device-generic (ATen calls); returns
// (info, jitter) as gram_factor_from_gram.
std::tuple<at::Tensor, at::Tensor> gram_factor_from_gram_inplace(const at::Tensor& G, const at::Tensor& damping);

void check_gram_args(const at::Tensor& A, const at::Tensor& damping);
void check_from_gram_args(const at::Tensor& G, const at::Tensor& damping);
void check_solve_args(const at::Tensor& A, const at::Tensor& L, const at::Tensor& R);

}  // namespace revgn

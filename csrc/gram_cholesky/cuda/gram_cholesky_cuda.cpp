// CUDA registrations of the batched Gram-Cholesky solve.
//
// Small n (n <= fused_max_n): the Gram A A^T is one cuBLAS batched GEMM; the ones column and the damping
// are folded in by the fused kernel (gram_cholesky_fused.cu), which factors in shared memory with the
// jitter retry and solves L L^T U = R for a chunk of columns per block, writing 1^T U straight into the
// output's last row. A^T U is one batched GEMM written in place into the output. When the batch of
// (matrix, chunk) blocks fits in one wave every block factors its own copy (one launch); otherwise the
// factor is written once and the solve blocks load it (two launches of the same kernel).
// Large n: cuBLAS Gram, cuSOLVER Cholesky (through ATen), then a kernel that checks the pivots against
// the floor and refactors only the failed matrices with jitter (gram_cholesky_kernels.cu).
// gram_factor_from_gram (a Gram formed elsewhere, e.g. EGN's output-space Gram) takes the same two
// paths with the given Gram in place of A A^T: the fused kernel in factor-only mode (k = 0) for small n,
// cuSOLVER plus the verify/retry kernel otherwise.
// No path synchronises with the host, except gram_factor_from_gram_inplace (device-generic, in
// gram_cholesky_cpu.cpp): it reads each matrix's finiteness and factorisation verdict to decide on a retry.
#include "../gram_cholesky.h"
#include "gram_cholesky_kernels.h"

#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>

namespace revgn {
namespace {

// Crossover between the fused and the library path, measured on an H100 (B = 12, m = 8000, k = 392,
// float32: fused 0.94 vs 1.32 ms at n = 128, 1.87 vs 1.63 ms at n = 160; benchmarks/results/kernels.md).
constexpr int kFusedMaxN = 128;

cuda::JitterSchedule device_schedule(at::ScalarType dtype) {
  const std::vector<double> rel = jitter_schedule(dtype);
  TORCH_CHECK(static_cast<int>(rel.size()) <= cuda::kMaxJitterTries, "revgn: jitter schedule too long");
  cuda::JitterSchedule s{};
  s.pivot_floor = kPivotFloor * dtype_eps(dtype);
  s.count = static_cast<int>(rel.size());
  for (int i = 0; i < s.count; ++i) s.rel[i] = rel[i];
  return s;
}

// Largest n on the fused path: the measured crossover, capped by shared memory. REVGN_GRAM_FUSED_MAX_N
// replaces the crossover (0 disables the fused path), which the benchmarks use to time both paths.
int64_t fused_max_n(at::ScalarType dtype) {
  const int64_t cap = cuda::fused_gram_max_n(static_cast<int>(c10::elementSize(dtype)));
  const char* env = std::getenv("REVGN_GRAM_FUSED_MAX_N");
  return std::min<int64_t>(cap, env != nullptr ? std::atoll(env) : kFusedMaxN);
}

template <typename T>
cuda::FusedGramArgs<T> fused_args(const at::Tensor& A) {
  cuda::FusedGramArgs<T> args;
  args.B = static_cast<int>(A.size(0));
  args.n = static_cast<int>(A.size(1));
  return args;
}

template <typename T>
void set_rhs(cuda::FusedGramArgs<T>& args, const at::Tensor& R, at::Tensor& U, at::Tensor& out, bool append_ones) {
  args.R = R.data_ptr<T>();
  args.R_stride_b = R.stride(0);
  args.R_stride_r = R.stride(1);
  args.R_stride_c = R.stride(2);
  args.k = static_cast<int>(R.size(2));
  args.U = U.data_ptr<T>();
  if (append_ones) {
    args.ones_row = out.data_ptr<T>() + out.stride(1) * (out.size(1) - 1);
    args.ones_stride_b = out.stride(0);
  }
}

at::Tensor plain_gram(const at::Tensor& A) { return at::bmm(A, A.transpose(1, 2)); }

// out[:, :m] = A^T U, in place (cuBLAS takes the row stride of the narrowed output).
void apply_At(const at::Tensor& A, const at::Tensor& U, at::Tensor& out) {
  at::Tensor top = out.narrow(1, 0, A.size(2));
  at::bmm_out(top, A.transpose(1, 2), U);
}

// Factor the damped Grams G (B, n, n, contiguous) with cuSOLVER, then verify/retry on the device.
std::tuple<at::Tensor, at::Tensor, at::Tensor> library_factor_damped(const at::Tensor& G) {
  const int64_t B = G.size(0), n = G.size(1);
  auto [L, status] = at::linalg_cholesky_ex(G, /*upper=*/false, /*check_errors=*/false);
  L = L.contiguous();
  status = status.to(at::kInt).contiguous();
  at::Tensor info = at::empty({B}, G.options().dtype(at::kInt));
  at::Tensor jitter = at::empty({B}, G.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const cuda::JitterSchedule schedule = device_schedule(G.scalar_type());
  AT_DISPATCH_FLOATING_TYPES(G.scalar_type(), "revgn_verify_or_retry_cholesky", [&] {
    cuda::verify_or_retry_cholesky<scalar_t>(G.data_ptr<scalar_t>(), L.data_ptr<scalar_t>(), status.data_ptr<int>(),
                                             info.data_ptr<int>(), jitter.data_ptr<scalar_t>(), B, n, schedule,
                                             stream);
  });
  return {L, info, jitter};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> library_factor(const at::Tensor& A, const at::Tensor& damping,
                                                              bool append_ones) {
  return library_factor_damped(damped_gram(A, damping, append_ones));
}

// The fused kernel in factor-only mode on a plain Gram `gram` (B, n, n, contiguous): it adds the ones
// block (append_ones) and the damping while loading the lower triangle into shared memory.
std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_factor(const at::Tensor& gram, const at::Tensor& damping,
                                                            bool append_ones) {
  const int64_t B = gram.size(0), n = gram.size(1);
  const at::Tensor lambda = damping.contiguous();
  at::Tensor L = at::empty({B, n, n}, gram.options());
  at::Tensor info = at::empty({B}, gram.options().dtype(at::kInt));
  at::Tensor jitter = at::empty({B}, gram.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(gram.scalar_type(), "revgn_fused_gram_factor", [&] {
    auto args = fused_args<scalar_t>(gram);
    args.gram = gram.data_ptr<scalar_t>();
    args.damping = lambda.data_ptr<scalar_t>();
    args.append_ones = append_ones;
    args.L_out = L.data_ptr<scalar_t>();
    args.info = info.data_ptr<int>();
    args.jitter = jitter.data_ptr<scalar_t>();
    cuda::fused_gram_cholesky<scalar_t>(args, device_schedule(gram.scalar_type()), stream);
  });
  return {L, info, jitter};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gram_factor_cuda(const at::Tensor& A, const at::Tensor& damping,
                                                                bool append_ones) {
  check_gram_args(A, damping);
  const c10::cuda::CUDAGuard guard(A.device());
  const int64_t n = A.size(1);
  if (n > fused_max_n(A.scalar_type()) || n == 0) return library_factor(A, damping, append_ones);
  return fused_factor(plain_gram(A), damping, append_ones);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gram_factor_from_gram_cuda(const at::Tensor& G,
                                                                          const at::Tensor& damping) {
  check_from_gram_args(G, damping);
  const c10::cuda::CUDAGuard guard(G.device());
  const int64_t n = G.size(1);
  if (G.size(0) == 0 || n == 0) {
    return {at::empty_like(G, at::MemoryFormat::Contiguous), at::zeros({G.size(0)}, G.options().dtype(at::kInt)),
            at::zeros({G.size(0)}, G.options())};
  }
  if (n <= fused_max_n(G.scalar_type())) return fused_factor(G.contiguous(), damping, /*append_ones=*/false);
  // cuSOLVER factors in place of its input's copy; the verify/retry kernel needs the damped Gram.
  at::Tensor damped = G.clone(at::MemoryFormat::Contiguous);
  damped.diagonal(0, -2, -1).add_(damping.unsqueeze(-1));
  return library_factor_damped(damped);
}

at::Tensor gram_solve_cuda(const at::Tensor& A, const at::Tensor& L, const at::Tensor& R, bool append_ones) {
  check_solve_args(A, L, R);
  const c10::cuda::CUDAGuard guard(A.device());
  const int64_t B = A.size(0), n = A.size(1), m = A.size(2), k = R.size(2);
  at::Tensor out = at::empty({B, m + (append_ones ? 1 : 0), k}, R.options());
  at::Tensor U;
  if (n <= fused_max_n(A.scalar_type()) && n > 0 && k > 0) {
    U = at::empty({B, n, k}, R.options());
    const at::Tensor Lc = L.contiguous();
    AT_DISPATCH_FLOATING_TYPES(A.scalar_type(), "revgn_fused_gram_solve", [&] {
      auto args = fused_args<scalar_t>(A);
      args.L_in = Lc.data_ptr<scalar_t>();
      set_rhs<scalar_t>(args, R, U, out, append_ones);
      cuda::fused_gram_cholesky<scalar_t>(args, device_schedule(A.scalar_type()), c10::cuda::getCurrentCUDAStream());
    });
  } else {
    U = at::cholesky_solve(R, L, /*upper=*/false);
    if (append_ones) {
      at::Tensor last = out.narrow(1, m, 1);
      at::sum_out(last, U, {1}, /*keepdim=*/true);
    }
  }
  apply_At(A, U, out);
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gram_cholesky_solve_cuda(const at::Tensor& A, const at::Tensor& R,
                                                                        const at::Tensor& damping,
                                                                        bool append_ones) {
  check_gram_args(A, damping);
  TORCH_CHECK(R.dim() == 3 && R.size(0) == A.size(0) && R.size(1) == A.size(1), "revgn: R must be (B, n, k)");
  TORCH_CHECK(R.scalar_type() == A.scalar_type() && R.device() == A.device(), "revgn: R must match A's dtype and device");
  const c10::cuda::CUDAGuard guard(A.device());
  const int64_t B = A.size(0), n = A.size(1), m = A.size(2), k = R.size(2);
  if (n > fused_max_n(A.scalar_type()) || n == 0 || k == 0) {
    auto [L, info, jitter] = gram_factor_cuda(A, damping, append_ones);
    return {gram_solve_cuda(A, L, R, append_ones), info, jitter};
  }
  const at::Tensor gram = plain_gram(A);
  const at::Tensor lambda = damping.contiguous();
  at::Tensor info = at::empty({B}, A.options().dtype(at::kInt));
  at::Tensor jitter = at::empty({B}, A.options());
  at::Tensor out = at::empty({B, m + (append_ones ? 1 : 0), k}, R.options());
  at::Tensor U = at::empty({B, n, k}, R.options());
  const int64_t chunks = (k + cuda::kFusedColumns - 1) / cuda::kFusedColumns;
  const bool one_wave = B * chunks <= at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const cuda::JitterSchedule schedule = device_schedule(A.scalar_type());
  AT_DISPATCH_FLOATING_TYPES(A.scalar_type(), "revgn_fused_gram_cholesky_solve", [&] {
    auto factor = fused_args<scalar_t>(A);
    factor.gram = gram.data_ptr<scalar_t>();
    factor.damping = lambda.data_ptr<scalar_t>();
    factor.append_ones = append_ones;
    factor.info = info.data_ptr<int>();
    factor.jitter = jitter.data_ptr<scalar_t>();
    if (one_wave) {
      set_rhs<scalar_t>(factor, R, U, out, append_ones);
      cuda::fused_gram_cholesky<scalar_t>(factor, schedule, stream);
    } else {
      at::Tensor L = at::empty({B, n, n}, A.options());
      factor.L_out = L.data_ptr<scalar_t>();
      cuda::fused_gram_cholesky<scalar_t>(factor, schedule, stream);
      auto solve = fused_args<scalar_t>(A);
      solve.L_in = L.data_ptr<scalar_t>();
      set_rhs<scalar_t>(solve, R, U, out, append_ones);
      cuda::fused_gram_cholesky<scalar_t>(solve, schedule, stream);
    }
  });
  apply_At(A, U, out);
  return {out, info, jitter};
}

}  // namespace

TORCH_LIBRARY_IMPL(revgn, CUDA, m) {
  m.impl("gram_factor", &gram_factor_cuda);
  m.impl("gram_factor_from_gram", &gram_factor_from_gram_cuda);
  m.impl("gram_factor_from_gram_inplace", &gram_factor_from_gram_inplace);  // device-generic (ATen calls)
  m.impl("gram_solve", &gram_solve_cuda);
  m.impl("gram_cholesky_solve", &gram_cholesky_solve_cuda);
}

}  // namespace revgn

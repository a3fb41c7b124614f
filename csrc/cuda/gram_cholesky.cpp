// CUDA registrations of the batched Gram-Cholesky solve. Gram assembly and the solves go through
// ATen's cuBLAS/cuSOLVER calls; the jitter-retrying factorisation is the kernel in
// gram_cholesky_kernels.cu, which reports per-matrix info without a host sync.
#include "../gram_cholesky.h"
#include "gram_cholesky_kernels.h"

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

namespace revgn {
namespace {

cuda::JitterSchedule device_schedule(at::ScalarType dtype) {
  const std::vector<double> rel = jitter_schedule(dtype);
  TORCH_CHECK(static_cast<int>(rel.size()) <= cuda::kMaxJitterTries, "revgn: jitter schedule too long");
  cuda::JitterSchedule s{};
  s.pivot_floor = kPivotFloor * dtype_eps(dtype);
  s.count = static_cast<int>(rel.size());
  for (int i = 0; i < s.count; ++i) s.rel[i] = rel[i];
  return s;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gram_factor_cuda(const at::Tensor& A, const at::Tensor& damping,
                                                                bool append_ones) {
  check_gram_args(A, damping);
  const c10::cuda::CUDAGuard guard(A.device());
  const int64_t B = A.size(0), n = A.size(1);
  at::Tensor G = damped_gram(A, damping, append_ones);
  at::Tensor L = at::empty_like(G);
  at::Tensor info = at::empty({B}, A.options().dtype(at::kInt));
  at::Tensor jitter = at::empty({B}, A.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const cuda::JitterSchedule schedule = device_schedule(A.scalar_type());
  if (A.scalar_type() == at::kDouble) {
    cuda::cholesky_with_jitter<double>(G.data_ptr<double>(), L.data_ptr<double>(), info.data_ptr<int>(),
                                       jitter.data_ptr<double>(), B, n, schedule, stream);
  } else {
    cuda::cholesky_with_jitter<float>(G.data_ptr<float>(), L.data_ptr<float>(), info.data_ptr<int>(),
                                      jitter.data_ptr<float>(), B, n, schedule, stream);
  }
  return {L, info, jitter};
}

at::Tensor gram_solve_cuda(const at::Tensor& A, const at::Tensor& L, const at::Tensor& R, bool append_ones) {
  const c10::cuda::CUDAGuard guard(A.device());
  return gram_solve(A, L, R, append_ones);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gram_cholesky_solve_cuda(const at::Tensor& A, const at::Tensor& R,
                                                                        const at::Tensor& damping,
                                                                        bool append_ones) {
  auto [L, info, jitter] = gram_factor_cuda(A, damping, append_ones);
  return {gram_solve_cuda(A, L, R, append_ones), info, jitter};
}

}  // namespace

TORCH_LIBRARY_IMPL(revgn, CUDA, m) {
  m.impl("gram_factor", &gram_factor_cuda);
  m.impl("gram_solve", &gram_solve_cuda);
  m.impl("gram_cholesky_solve", &gram_cholesky_solve_cuda);
}

}  // namespace revgn

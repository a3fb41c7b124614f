// CUDA registrations of the coupling block. The GEMMs are cuBLAS/cuBLASLt through ATen; the hidden
// tile's ReLU (and its zero bias) runs in the cuBLASLt epilogue via at::_addmm_activation, the other
// activations in place on the fresh tile, and the tangent's act'(Z) * dZ in coupling_kernels.cu.
#include "../coupling.h"
#include "coupling_kernels.h"

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

namespace revgn {
namespace {

at::Tensor hidden_cuda(const at::Tensor& U, const at::Tensor& V, Activation act) {
  if (act == Activation::Relu && U.size(0) > 1 && U.size(1) > 1 && V.size(1) > 1) {
    // cuBLASLt RELU_BIAS epilogue (Lt rejects single-row/column operands; those take the plain path).
    // Its GELU epilogue is the tanh approximation, so GELU is not routed here.
    return at::_addmm_activation(at::zeros({V.size(1)}, V.options()), U, V, 1, 1, /*use_gelu=*/false);
  }
  at::Tensor Z = at::mm(U, V);
  activation_(Z, act);
  return Z;
}

void tangent_product_cuda(const at::Tensor& Z, at::Tensor& dZ, Activation act) {
  TORCH_INTERNAL_ASSERT(Z.is_contiguous() && dZ.is_contiguous() && Z.numel() == dZ.numel());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (Z.scalar_type() == at::kDouble) {
    cuda::tangent_product<double>(Z.data_ptr<double>(), dZ.data_ptr<double>(), Z.numel(), static_cast<int>(act),
                                  stream);
  } else {
    cuda::tangent_product<float>(Z.data_ptr<float>(), dZ.data_ptr<float>(), Z.numel(), static_cast<int>(act),
                                 stream);
  }
}

constexpr CouplingKernels kCudaKernels{&hidden_cuda, &tangent_product_cuda};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> coupling_forward_cuda(
    const at::Tensor& x1, const at::Tensor& x2, const at::Tensor& VF, const at::Tensor& WF, const at::Tensor& bF,
    const at::Tensor& VG, const at::Tensor& WG, const at::Tensor& bG, c10::string_view activation,
    bool return_features) {
  const c10::cuda::CUDAGuard guard(x1.device());
  return coupling_forward(kCudaKernels, x1, x2, VF, WF, bF, VG, WG, bG,
                          std::string_view(activation.data(), activation.size()), return_features);
}

std::tuple<at::Tensor, at::Tensor> coupling_inverse_cuda(const at::Tensor& y1, const at::Tensor& y2,
                                                         const at::Tensor& VF, const at::Tensor& WF,
                                                         const at::Tensor& bF, const at::Tensor& VG,
                                                         const at::Tensor& WG, const at::Tensor& bG,
                                                         c10::string_view activation) {
  const c10::cuda::CUDAGuard guard(y1.device());
  return coupling_inverse(kCudaKernels, y1, y2, VF, WF, bF, VG, WG, bG,
                          std::string_view(activation.data(), activation.size()));
}

std::tuple<at::Tensor, at::Tensor> coupling_inverse_tangent_cuda(const at::Tensor& y1, const at::Tensor& x2,
                                                                 const at::Tensor& dy1, const at::Tensor& dy2,
                                                                 const at::Tensor& VF, const at::Tensor& WF,
                                                                 const at::Tensor& VG, const at::Tensor& WG,
                                                                 c10::string_view activation) {
  const c10::cuda::CUDAGuard guard(y1.device());
  return coupling_inverse_tangent(kCudaKernels, y1, x2, dy1, dy2, VF, WF, VG, WG,
                                  std::string_view(activation.data(), activation.size()));
}

}  // namespace

TORCH_LIBRARY_IMPL(revgn, CUDA, m) {
  m.impl("coupling_forward", &coupling_forward_cuda);
  m.impl("coupling_inverse", &coupling_inverse_cuda);
  m.impl("coupling_inverse_tangent", &coupling_inverse_tangent_cuda);
}

}  // namespace revgn

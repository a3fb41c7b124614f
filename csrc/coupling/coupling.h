// Reversible coupling block, shared by the CPU and CUDA registrations (formulas in
// revgn_ext/ops/coupling.py):
//   F(U) = act(U V_F) W_F^T + b_F,  G(U) = act(U V_G) W_G^T + b_G
//   forward  y1 = x1 + F(x2),  y2 = x2 + G(y1)        inverse  x2 = y2 - G(y1),  x1 = y1 - F(x2)
//   tangent  dx2 = dy2 - (act'(y1 V_G) * (dy1 V_G)) W_G^T,  dx1 = dy1 - (act'(x2 V_F) * (dx2 V_F)) W_F^T
// The GEMMs go through ATen (MKL/OpenBLAS, cuBLAS/cuBLASLt); the backends differ only in how the hidden
// tile act(U V) and the tangent product act'(Z) * dZ are formed, which they pass in as CouplingKernels.
#pragma once

#include <ATen/ATen.h>

#include "../activations.h"

#include <string_view>
#include <tuple>

namespace revgn {

Activation parse_activation(std::string_view name);

struct CouplingKernels {
  // act(U V), a fresh contiguous (n, M) tensor.
  at::Tensor (*hidden)(const at::Tensor& U, const at::Tensor& V, Activation act);
  // dZ <- act'(Z) * dZ in place; Z and dZ are contiguous (n, M) blocks of one tensor.
  void (*tangent_product)(const at::Tensor& Z, at::Tensor& dZ, Activation act);
};

// In-place activation with ATen ops (one pass, exact erf GELU as in the reference).
void activation_(at::Tensor& Z, Activation act);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> coupling_forward(
    const CouplingKernels& k, const at::Tensor& x1, const at::Tensor& x2, const at::Tensor& VF,
    const at::Tensor& WF, const at::Tensor& bF, const at::Tensor& VG, const at::Tensor& WG, const at::Tensor& bG,
    std::string_view activation, bool return_features);

std::tuple<at::Tensor, at::Tensor> coupling_inverse(const CouplingKernels& k, const at::Tensor& y1,
                                                    const at::Tensor& y2, const at::Tensor& VF,
                                                    const at::Tensor& WF, const at::Tensor& bF,
                                                    const at::Tensor& VG, const at::Tensor& WG,
                                                    const at::Tensor& bG, std::string_view activation);

std::tuple<at::Tensor, at::Tensor> coupling_inverse_tangent(const CouplingKernels& k, const at::Tensor& y1,
                                                            const at::Tensor& x2, const at::Tensor& dy1,
                                                            const at::Tensor& dy2, const at::Tensor& VF,
                                                            const at::Tensor& WF, const at::Tensor& VG,
                                                            const at::Tensor& WG, std::string_view activation);

}  // namespace revgn

// Reversible coupling block: device-generic composition and the CPU kernels.
//
// What is fused, on every device:
// * residual and bias ride in the output GEMM: out = (x + b) then out += h W^T in place (GEMM beta = 1),
//   so no extra pass over the (n, d/2) result and none at all over the (n, M) hidden tile;
// * the activation is applied to the freshly written hidden tile in place (CUDA: ReLU inside the
//   cuBLASLt epilogue), instead of allocating a second (n, M) tensor;
// * the tangent stacks [y1; dy1] (and [x2; dx2]) so both products with V are one GEMM, and forms
//   act'(Z) * dZ in one in-place pass.
#include "coupling.h"

#include <torch/library.h>

#include <string>

namespace revgn {

Activation parse_activation(std::string_view name) {
  Activation act = Activation::Identity;
  const std::string given(name);
  TORCH_CHECK_VALUE(find_activation(name, &act), "revgn: activation must be one of ", activation_names(),
                    "got '", given, "'");
  return act;
}

void activation_(at::Tensor& Z, Activation act) {
  switch (act) {
    case Activation::Identity: break;
    case Activation::Relu: Z.relu_(); break;
    case Activation::Tanh: Z.tanh_(); break;
    case Activation::Gelu: at::gelu_(Z); break;  // exact (erf) GELU, as torch.nn.functional.gelu
  }
}

namespace {

// Checks for direct calls of the ops (the Python wrappers raise the same errors first, naming the
// argument as the user wrote it). Messages are assembled from strings only: streaming integers through
// c10::str crashed inside libstdc++ on one build machine (torch 2.11 wheel, g++ 13).
std::string shape_of(const at::Tensor& t) {
  std::string out = "(";
  for (int64_t d = 0; d < t.dim(); ++d) out += (d ? ", " : "") + std::to_string(t.size(d));
  return out + (t.dim() == 1 ? ",)" : ")");
}

// cols < 0: any number of columns (the hidden width M).
void check_matrix(const char* name, const at::Tensor& t, const at::Tensor& like, int64_t rows, int64_t cols) {
  TORCH_CHECK_VALUE(t.dim() == 2, "revgn: ", name, " must be 2-d, got shape ", shape_of(t));
  TORCH_CHECK_VALUE(t.scalar_type() == like.scalar_type() && t.device() == like.device(), "revgn: ", name,
                    " must match the first input's dtype and device");
  TORCH_CHECK_VALUE(t.size(0) == rows, "revgn: ", name, " has shape ", shape_of(t), ", expected ",
                    std::to_string(rows), " rows");
  TORCH_CHECK_VALUE(cols < 0 || t.size(1) == cols, "revgn: ", name, " has shape ", shape_of(t), ", expected ",
                    std::to_string(cols), " columns");
}

void check_block(const at::Tensor& u1, const at::Tensor& u2, const at::Tensor& VF, const at::Tensor& WF,
                 const at::Tensor& VG, const at::Tensor& WG) {
  TORCH_CHECK_VALUE(u1.dim() == 2, "revgn: block inputs must be (n, d/2), got shape ", shape_of(u1));
  TORCH_CHECK_VALUE(u1.scalar_type() == at::kFloat || u1.scalar_type() == at::kDouble,
                    "revgn: coupling inputs must be float32 or float64");
  const int64_t n = u1.size(0), half = u1.size(1);
  check_matrix("second input half", u2, u1, n, half);
  check_matrix("VF", VF, u1, half, -1);
  check_matrix("WF", WF, u1, half, VF.size(1));
  check_matrix("VG", VG, u1, half, -1);
  check_matrix("WG", WG, u1, half, VG.size(1));
}

void check_bias(const char* name, const at::Tensor& b, const at::Tensor& like) {
  TORCH_CHECK_VALUE(b.dim() == 1 && b.size(0) == like.size(1), "revgn: ", name, " must be (d/2,) = (",
                    std::to_string(like.size(1)), ",), got shape ", shape_of(b));
  TORCH_CHECK_VALUE(b.scalar_type() == like.scalar_type() && b.device() == like.device(), "revgn: ", name,
                    " must match the first input's dtype and device");
}

// u + b + sign * h W^T, written once into a fresh contiguous (n, d/2) tensor.
at::Tensor residual_gemm(const at::Tensor& u, const at::Tensor& b, const at::Tensor& h, const at::Tensor& W,
                         double sign) {
  at::Tensor out = at::empty(u.sizes(), u.options().memory_format(at::MemoryFormat::Contiguous));
  if (sign > 0) {
    at::add_out(out, u, b);
  } else {
    at::sub_out(out, u, b);
  }
  out.addmm_(h, W.t(), /*beta=*/1, /*alpha=*/sign);
  return out;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> coupling_forward(
    const CouplingKernels& k, const at::Tensor& x1, const at::Tensor& x2, const at::Tensor& VF,
    const at::Tensor& WF, const at::Tensor& bF, const at::Tensor& VG, const at::Tensor& WG, const at::Tensor& bG,
    std::string_view activation, bool return_features) {
  // The ops have their own autograd formula (or none); the ATen calls inside must not record a graph.
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const Activation act = parse_activation(activation);
  check_block(x1, x2, VF, WF, VG, WG);
  check_bias("bF", bF, x1);
  check_bias("bG", bG, x1);
  at::Tensor hF = k.hidden(x2, VF, act);
  at::Tensor y1 = residual_gemm(x1, bF, hF, WF, 1.0);
  // Without features the F tile is released before the G tile is allocated, as the eager expression
  // does: one (n, M) tile alive at a time instead of two (32 MB each at n 1024, M 8000, fp32).
  if (!return_features) hF = at::empty({0}, x1.options());
  at::Tensor hG = k.hidden(y1, VG, act);
  at::Tensor y2 = residual_gemm(x2, bG, hG, WG, 1.0);
  if (!return_features) hG = at::empty({0}, x1.options());
  return {y1, y2, hF, hG};
}

std::tuple<at::Tensor, at::Tensor> coupling_inverse(const CouplingKernels& k, const at::Tensor& y1,
                                                    const at::Tensor& y2, const at::Tensor& VF,
                                                    const at::Tensor& WF, const at::Tensor& bF,
                                                    const at::Tensor& VG, const at::Tensor& WG,
                                                    const at::Tensor& bG, std::string_view activation) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const Activation act = parse_activation(activation);
  check_block(y1, y2, VF, WF, VG, WG);
  check_bias("bF", bF, y1);
  check_bias("bG", bG, y1);
  at::Tensor x2 = residual_gemm(y2, bG, k.hidden(y1, VG, act), WG, -1.0);
  at::Tensor x1 = residual_gemm(y1, bF, k.hidden(x2, VF, act), WF, -1.0);
  return {x1, x2};
}

namespace {

// du - (act'(u V) * (dv V)) W^T, written into `out` (n, d/2). `stacked` is (2n, d/2) with u in its top
// half and dv in its bottom half, so that [u; dv] V is one GEMM; with the identity act' = 1 and only
// dv V is needed.
void tangent_half(const CouplingKernels& k, const at::Tensor& stacked, const at::Tensor& du, const at::Tensor& V,
                  const at::Tensor& W, Activation act, at::Tensor out) {
  const int64_t n = du.size(0);
  at::Tensor dZ;
  if (act == Activation::Identity) {
    dZ = at::mm(stacked.narrow(0, n, n), V);
  } else {
    at::Tensor Z = at::mm(stacked, V);
    dZ = Z.narrow(0, n, n);
    k.tangent_product(Z.narrow(0, 0, n), dZ, act);
  }
  out.copy_(du);
  out.addmm_(dZ, W.t(), /*beta=*/1, /*alpha=*/-1);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> coupling_inverse_tangent(const CouplingKernels& k, const at::Tensor& y1,
                                                            const at::Tensor& x2, const at::Tensor& dy1,
                                                            const at::Tensor& dy2, const at::Tensor& VF,
                                                            const at::Tensor& WF, const at::Tensor& VG,
                                                            const at::Tensor& WG, std::string_view activation) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const Activation act = parse_activation(activation);
  check_block(y1, x2, VF, WF, VG, WG);
  check_matrix("dy1", dy1, y1, y1.size(0), y1.size(1));
  check_matrix("dy2", dy2, y1, y1.size(0), y1.size(1));
  const int64_t n = y1.size(0);
  at::Tensor first = at::empty({2 * n, y1.size(1)}, y1.options());  // [y1; dy1]
  first.narrow(0, 0, n).copy_(y1);
  first.narrow(0, n, n).copy_(dy1);
  at::Tensor second = at::empty_like(first);  // [x2; dx2]: dx2 is written straight into its bottom half
  second.narrow(0, 0, n).copy_(x2);
  at::Tensor dx2 = second.narrow(0, n, n);
  tangent_half(k, first, dy2, VG, WG, act, dx2);
  at::Tensor dx1 = at::empty_like(dy1, at::MemoryFormat::Contiguous);
  tangent_half(k, second, dy1, VF, WF, act, dx1);
  return {dx1, dx2};
}

namespace {

at::Tensor hidden_cpu(const at::Tensor& U, const at::Tensor& V, Activation act) {
  at::Tensor Z = at::mm(U, V);
  activation_(Z, act);
  return Z;
}

// ATen's backward kernels compute exactly act'(Z) * dZ in one vectorised pass (tanh needs tanh(Z) first).
void tangent_product_cpu(const at::Tensor& Z, at::Tensor& dZ, Activation act) {
  switch (act) {
    case Activation::Identity: break;
    case Activation::Relu: at::threshold_backward_out(dZ, dZ, Z, 0); break;
    case Activation::Tanh: at::tanh_backward_out(dZ, dZ, Z.tanh()); break;
    case Activation::Gelu: at::gelu_backward_out(dZ, dZ, Z); break;
  }
}

constexpr CouplingKernels kCpuKernels{&hidden_cpu, &tangent_product_cpu};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> coupling_forward_cpu(
    const at::Tensor& x1, const at::Tensor& x2, const at::Tensor& VF, const at::Tensor& WF, const at::Tensor& bF,
    const at::Tensor& VG, const at::Tensor& WG, const at::Tensor& bG, c10::string_view activation,
    bool return_features) {
  return coupling_forward(kCpuKernels, x1, x2, VF, WF, bF, VG, WG, bG,
                          std::string_view(activation.data(), activation.size()), return_features);
}

std::tuple<at::Tensor, at::Tensor> coupling_inverse_cpu(const at::Tensor& y1, const at::Tensor& y2,
                                                        const at::Tensor& VF, const at::Tensor& WF,
                                                        const at::Tensor& bF, const at::Tensor& VG,
                                                        const at::Tensor& WG, const at::Tensor& bG,
                                                        c10::string_view activation) {
  return coupling_inverse(kCpuKernels, y1, y2, VF, WF, bF, VG, WG, bG,
                          std::string_view(activation.data(), activation.size()));
}

std::tuple<at::Tensor, at::Tensor> coupling_inverse_tangent_cpu(const at::Tensor& y1, const at::Tensor& x2,
                                                                const at::Tensor& dy1, const at::Tensor& dy2,
                                                                const at::Tensor& VF, const at::Tensor& WF,
                                                                const at::Tensor& VG, const at::Tensor& WG,
                                                                c10::string_view activation) {
  return coupling_inverse_tangent(kCpuKernels, y1, x2, dy1, dy2, VF, WF, VG, WG,
                                  std::string_view(activation.data(), activation.size()));
}

}  // namespace

TORCH_LIBRARY_IMPL(revgn, CPU, m) {
  m.impl("coupling_forward", &coupling_forward_cpu);
  m.impl("coupling_inverse", &coupling_inverse_cpu);
  m.impl("coupling_inverse_tangent", &coupling_inverse_tangent_cpu);
}

}  // namespace revgn

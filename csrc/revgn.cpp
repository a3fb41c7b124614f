// Operator schemas of the revgn library. Kernels register under their dispatch keys in the op files
// (CPU: csrc/<op>/<op>_cpu.cpp, CUDA: csrc/<op>/cuda/*.cpp + *.cu), so no kernel ever branches on the device.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Lets `import revgn_ext._C` find and load this library like a Python module; the ops register
// themselves with the dispatcher at load time, so the module itself is empty.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(revgn, m) {
  // L L^T = A A^T (+ 1 1^T) + (damping + jitter) I for a batch of B small Grams.
  // Returns (L, info, jitter): info[b] = jitter retries used (0 clean, -1 all failed -> diagonal factor).
  m.def("gram_factor(Tensor A, Tensor damping, bool append_ones) -> (Tensor, Tensor, Tensor)");
  // The same factorisation for a Gram formed elsewhere: L L^T = G + (damping + jitter) I.
  m.def("gram_factor_from_gram(Tensor G, Tensor damping) -> (Tensor, Tensor, Tensor)");
  // The same, written into G: its lower triangle then holds L, its strict upper one still holds G's.
  // Returns (info, jitter).
  m.def("gram_factor_from_gram_inplace(Tensor(a!) G, Tensor damping) -> (Tensor, Tensor)");
  // A^T (L L^T)^{-1} R, with the extra row 1^T (L L^T)^{-1} R when append_ones.
  m.def("gram_solve(Tensor A, Tensor L, Tensor R, bool append_ones) -> Tensor");
  // gram_factor followed by gram_solve. Returns (out, info, jitter).
  m.def("gram_cholesky_solve(Tensor A, Tensor R, Tensor damping, bool append_ones) -> (Tensor, Tensor, Tensor)");

  // Reversible coupling block with F(U) = act(U V_F) W_F^T + b_F, G(U) = act(U V_G) W_G^T + b_G.
  // y1 = x1 + F(x2), y2 = x2 + G(y1); returns (y1, y2, hF, hG) with the features hF = act(x2 V_F),
  // hG = act(y1 V_G) when return_features, else two empty tensors.
  m.def("coupling_forward(Tensor x1, Tensor x2, Tensor VF, Tensor WF, Tensor bF, Tensor VG, Tensor WG, "
        "Tensor bG, str activation, bool return_features) -> (Tensor, Tensor, Tensor, Tensor)");
  // x2 = y2 - G(y1), x1 = y1 - F(x2). Returns (x1, x2).
  m.def("coupling_inverse(Tensor y1, Tensor y2, Tensor VF, Tensor WF, Tensor bF, Tensor VG, Tensor WG, "
        "Tensor bG, str activation) -> (Tensor, Tensor)");
  // Tangent of the inverse at (y1, x2): dx2 = dy2 - (act'(y1 V_G) * (dy1 V_G)) W_G^T,
  // dx1 = dy1 - (act'(x2 V_F) * (dx2 V_F)) W_F^T. Returns (dx1, dx2).
  m.def("coupling_inverse_tangent(Tensor y1, Tensor x2, Tensor dy1, Tensor dy2, Tensor VF, Tensor WF, "
        "Tensor VG, Tensor WG, str activation) -> (Tensor, Tensor)");
}

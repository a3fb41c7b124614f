// Operator schemas of the revgn library. Kernels register under their dispatch keys in the op files
// (CPU: csrc/<op>.cpp, CUDA: csrc/cuda/<op>.cpp + .cu), so no kernel ever branches on the device.
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
  // A^T (L L^T)^{-1} R, with the extra row 1^T (L L^T)^{-1} R when append_ones.
  m.def("gram_solve(Tensor A, Tensor L, Tensor R, bool append_ones) -> Tensor");
  // gram_factor followed by gram_solve. Returns (out, info, jitter).
  m.def("gram_cholesky_solve(Tensor A, Tensor R, Tensor damping, bool append_ones) -> (Tensor, Tensor, Tensor)");
}

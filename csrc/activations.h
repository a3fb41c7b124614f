// The activations of the coupling block: the one C++ source of truth, free of torch and CUDA headers so
// that host (.cpp) and device (.cu) code share it. The Python registry revgn_ext/ops/activations.py
// lists the same names and ids; python_tests/test_activations.py reads this file and fails if the two
// disagree.
//
// Adding an activation: one X(...) line and one act'(z) case below, the ATen forms in
// csrc/coupling/coupling_cpu.cpp, and one entry in revgn_ext/ops/activations.py.
#pragma once

#include <cmath>
#include <string_view>

#if defined(__CUDACC__)
#define REVGN_HOST_DEVICE __host__ __device__
#else
#define REVGN_HOST_DEVICE
#endif

namespace revgn {

// X(name as in Python, enum constant, id)
#define REVGN_ACTIVATIONS(X) \
  X(identity, Identity, 0)   \
  X(relu, Relu, 1)           \
  X(tanh, Tanh, 2)           \
  X(gelu, Gelu, 3)

enum class Activation : int {
#define REVGN_ACTIVATION_ENUM(name, constant, id) constant = id,
  REVGN_ACTIVATIONS(REVGN_ACTIVATION_ENUM)
#undef REVGN_ACTIVATION_ENUM
};

// The name's activation; false when the name is unknown.
inline bool find_activation(std::string_view name, Activation* out) {
#define REVGN_ACTIVATION_MATCH(str, constant, id) \
  if (name == #str) {                             \
    *out = Activation::constant;                  \
    return true;                                  \
  }
  REVGN_ACTIVATIONS(REVGN_ACTIVATION_MATCH)
#undef REVGN_ACTIVATION_MATCH
  return false;
}

// "identity, relu, ..." for error messages.
inline const char* activation_names() {
#define REVGN_ACTIVATION_NAME(str, constant, id) #str ", "
  static constexpr char names[] = REVGN_ACTIVATIONS(REVGN_ACTIVATION_NAME);
#undef REVGN_ACTIVATION_NAME
  return names;
}

// act'(z), elementwise (GELU is the exact erf form, as torch.nn.functional.gelu).
template <typename T>
REVGN_HOST_DEVICE inline T activation_grad(T z, Activation act) {
  switch (act) {
    case Activation::Relu: return z > T(0) ? T(1) : T(0);
    case Activation::Tanh: {
      const T t = tanh(z);
      return T(1) - t * t;
    }
    case Activation::Gelu: {
      // Phi(z) + z phi(z). Under --use_fast_math float exp becomes __expf (a few ulp), far inside the
      // float32 tolerance; double is unaffected.
      const T cdf = T(0.5) * (T(1) + erf(z * T(0.7071067811865476)));
      const T pdf = exp(T(-0.5) * z * z) * T(0.3989422804014327);
      return cdf + z * pdf;
    }
    case Activation::Identity: break;
  }
  return T(1);
}

}  // namespace revgn

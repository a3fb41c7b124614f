// Launchers for the CUDA elementwise kernels of the coupling block. Kept free of torch headers so that
// the .cu file compiles with nvcc quickly.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace revgn {
namespace cuda {

// dZ[i] <- act'(Z[i]) * dZ[i] for i < count, in one pass; act is a revgn::Activation id
// (csrc/activations.h).
template <typename T>
void tangent_product(const T* Z, T* dZ, int64_t count, int act, cudaStream_t stream);

}  // namespace cuda
}  // namespace revgn

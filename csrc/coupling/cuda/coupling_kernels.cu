// act'(Z) * dZ in one pass over the (n, M) tile: ATen would need up to three (act', a temporary, the
// product). Grid-stride loop; the tile is contiguous, so consecutive threads touch consecutive words.
#include "coupling_kernels.h"

#include "../../activations.h"

#include <algorithm>
#include <stdexcept>
#include <string>

namespace revgn {
namespace cuda {
namespace {

template <typename T>
__global__ void tangent_product_kernel(const T* __restrict__ Z, T* __restrict__ dZ, int64_t count, int act) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < count; i += stride) {
    dZ[i] = activation_grad(Z[i], static_cast<Activation>(act)) * dZ[i];
  }
}

}  // namespace

template <typename T>
void tangent_product(const T* Z, T* dZ, int64_t count, int act, cudaStream_t stream) {
  if (count == 0 || act == 0) return;
  constexpr int kThreads = 256;
  const int64_t blocks = std::min<int64_t>((count + kThreads - 1) / kThreads, 132 * 16);
  tangent_product_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(Z, dZ, count, act);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("revgn: tangent_product launch failed: ") + cudaGetErrorString(err));
  }
}

template void tangent_product<float>(const float*, float*, int64_t, int, cudaStream_t);
template void tangent_product<double>(const double*, double*, int64_t, int, cudaStream_t);

}  // namespace cuda
}  // namespace revgn

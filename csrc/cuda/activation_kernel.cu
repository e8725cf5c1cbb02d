// CUDA kernels for the activations: the prepared forward (value, s', s''), its backward
// on the prepared batch, and the per-product steps over (batch, k, cols) tangents.
//
// Grid mapping: one thread per output element, grid-stride loops, 256 threads per block.
// For the (batch, k, cols) kernels element i is (n, j, c) with c = i % cols and
// n = i / (k * cols); the (batch, cols) derivative at (n, c) is read once per direction,
// broadcast over k through the cache. No shared memory; no reductions (the bias sums
// are ATen reductions in the glue, deterministic on CUDA).
#include <algorithm>

#include "cuda_kernels.h"

namespace pyflat {
namespace cuda {
namespace {

constexpr int kThreads = 256;

inline int blocks_for(int64_t n) {
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  return static_cast<int>(std::min<int64_t>(std::max<int64_t>(blocks, 1), 65535));
}

template <typename T, Activation Kind>
__global__ void forward_kernel(ActivationForwardParams<T> p) {
  const int64_t total = p.rows * p.cols;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(blockDim.x) * gridDim.x) {
    const ActivationValue<T> v = activation_eval<T>(Kind, p.z[i], p.param0, p.param1);
    p.value[i] = v.value;
    if (p.first != nullptr) p.first[i] = v.first;
    if (p.second != nullptr) p.second[i] = v.second;
  }
}

template <typename T>
__global__ void backward_kernel(ActivationBackwardParams<T> p) {
  const int64_t total = p.rows * p.cols;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(blockDim.x) * gridDim.x) {
    const T g = p.grad[i];
    if (p.second != nullptr) p.second[i] *= g;
    p.delta[i] = p.first != nullptr ? p.first[i] * g : g;
  }
}

template <typename T>
__global__ void tangent_kernel(ActivationTangentParams<T> p) {
  const int64_t total = p.batch * p.k * p.cols;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(blockDim.x) * gridDim.x) {
    const int64_t c = i % p.cols;
    const int64_t n = i / (p.k * p.cols);
    p.out[i] = p.first[n * p.cols + c] * p.tangent[i];
  }
}

template <typename T>
__global__ void delta_kernel(ActivationDeltaParams<T> p) {
  const int64_t total = p.batch * p.k * p.cols;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(blockDim.x) * gridDim.x) {
    const int64_t c = i % p.cols;
    const int64_t row = (i / (p.k * p.cols)) * p.cols + c;
    T d = p.delta[i];
    if (p.first != nullptr) d *= p.first[row];
    if (p.curvature != nullptr) d += p.curvature[row] * p.tangent_in[i];
    p.delta[i] = d;
  }
}

}  // namespace

template <typename T>
cudaError_t activation_forward(const ActivationForwardParams<T>& p, cudaStream_t stream) {
  const int blocks = blocks_for(p.rows * p.cols);
  switch (p.kind) {
#define PYFLAT_FORWARD_CASE(KIND, NAME, CURVED)                              \
  case Activation::KIND:                                                     \
    forward_kernel<T, Activation::KIND><<<blocks, kThreads, 0, stream>>>(p); \
    break;
    PYFLAT_FOR_EACH_ACTIVATION(PYFLAT_FORWARD_CASE)
#undef PYFLAT_FORWARD_CASE
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t activation_backward(const ActivationBackwardParams<T>& p, cudaStream_t stream) {
  backward_kernel<T><<<blocks_for(p.rows * p.cols), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t activation_tangent(const ActivationTangentParams<T>& p, cudaStream_t stream) {
  tangent_kernel<T><<<blocks_for(p.batch * p.k * p.cols), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t activation_delta(const ActivationDeltaParams<T>& p, cudaStream_t stream) {
  delta_kernel<T><<<blocks_for(p.batch * p.k * p.cols), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

#define PYFLAT_INSTANTIATE(T)                                                                 \
  template cudaError_t activation_forward<T>(const ActivationForwardParams<T>&, cudaStream_t); \
  template cudaError_t activation_backward<T>(const ActivationBackwardParams<T>&,             \
                                              cudaStream_t);                                  \
  template cudaError_t activation_tangent<T>(const ActivationTangentParams<T>&, cudaStream_t); \
  template cudaError_t activation_delta<T>(const ActivationDeltaParams<T>&, cudaStream_t);
PYFLAT_INSTANTIATE(float)
PYFLAT_INSTANTIATE(double)
#undef PYFLAT_INSTANTIATE

}  // namespace cuda
}  // namespace pyflat

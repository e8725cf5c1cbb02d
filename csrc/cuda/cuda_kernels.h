// CUDA twins of the CPU loops in csrc/cpu: same params structs, same per-element math
// (csrc/kernels/activation_math.h), launched on the given stream. Each returns the launch
// status (cudaGetLastError), which the glue checks. Torch-free.
#pragma once

#include <cuda_runtime_api.h>

#include "../kernels/params.h"

namespace pyflat {
namespace cuda {

template <typename T>
cudaError_t activation_forward(const ActivationForwardParams<T>& p, cudaStream_t stream);

template <typename T>
cudaError_t activation_backward(const ActivationBackwardParams<T>& p, cudaStream_t stream);

template <typename T>
cudaError_t activation_tangent(const ActivationTangentParams<T>& p, cudaStream_t stream);

template <typename T>
cudaError_t activation_delta(const ActivationDeltaParams<T>& p, cudaStream_t stream);

template <typename T>
cudaError_t softmax_cross_entropy(const SoftmaxCrossEntropyParams<T>& p, cudaStream_t stream);

template <typename T>
cudaError_t softmax_hessian(const SoftmaxHessianParams<T>& p, cudaStream_t stream);

}  // namespace cuda
}  // namespace pyflat

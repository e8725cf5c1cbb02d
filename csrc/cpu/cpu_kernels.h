// CPU loops of the fused pieces. Each takes a params struct and a half-open range of
// rows (samples), so the glue can split the batch over threads with at::parallel_for
// while the loops themselves stay torch-free. Rows are independent: results do not
// depend on how the range is split.
#pragma once

#include "../kernels/params.h"

namespace pyflat {
namespace cpu {

template <typename T>
void activation_forward(const ActivationForwardParams<T>& p, int64_t begin, int64_t end);

template <typename T>
void activation_backward(const ActivationBackwardParams<T>& p, int64_t begin, int64_t end);

template <typename T>
void activation_tangent(const ActivationTangentParams<T>& p, int64_t begin, int64_t end);

template <typename T>
void activation_delta(const ActivationDeltaParams<T>& p, int64_t begin, int64_t end);

template <typename T>
void softmax_cross_entropy(const SoftmaxCrossEntropyParams<T>& p, int64_t begin, int64_t end);

template <typename T>
void softmax_hessian(const SoftmaxHessianParams<T>& p, int64_t begin, int64_t end);

// Whether this CPU can run the small-GEMM loops (built for AVX2 + FMA on x86-64).
bool small_gemm_supported();

// GEMMs with one small dimension (at most 16; small_gemm_m relies on it); see
// SmallGemmParams. The range is over rows of c for
// small_gemm_k and small_gemm_n, over columns of c for small_gemm_m.
template <typename T>
void small_gemm_k(const SmallGemmParams<T>& p, int64_t begin, int64_t end);

template <typename T>
void small_gemm_n(const SmallGemmParams<T>& p, int64_t begin, int64_t end);

template <typename T>
void small_gemm_m(const SmallGemmParams<T>& p, int64_t begin, int64_t end);

// out = in^T (TransposeParams); the range is over tiles, numbered row-major over the
// (rows / kTransposeTile) x (cols / kTransposeTile) grid, rounded up.
template <typename T>
void transpose(const TransposeParams<T>& p, int64_t begin, int64_t end);

}  // namespace cpu
}  // namespace pyflat

// Plain parameter structs for the fused pieces of the engine. Kernels see nothing else:
// raw pointers into contiguous row-major buffers and sizes in elements. The ATen glue
// (csrc/mlp.cpp) validates every tensor before it fills one of these.
//
// Layouts: per-sample quantities are (batch, width) row-major; tangents and deltas for
// k directions are sample-major, (batch, k, width), so that every GEMM of the
// recurrences sees all k directions at once.
#pragma once

#include <cstdint>

#include "activation_math.h"

namespace pyflat {

// z (rows, cols) -> value = s(z), first = s'(z), second = s''(z).
// first/second may be null when not wanted; value may alias z.
template <typename T>
struct ActivationForwardParams {
  const T* z;
  T* value;
  T* first;
  T* second;
  int64_t rows;
  int64_t cols;
  Activation kind;
  T param0;
  T param1;
};

// Backprop through the activation of one layer, on the prepared batch:
// delta = s' * grad (grad w.r.t. the activation's output -> w.r.t. its input), and
// curvature = s'' * grad, written over `second` (the exact Hessian's curvature factor).
// first/second may be null (identity / no curvature); delta may alias grad.
template <typename T>
struct ActivationBackwardParams {
  const T* grad;
  const T* first;
  T* second;
  T* delta;
  int64_t rows;
  int64_t cols;
};

// Tangent step through an activation for k directions:
// out[n, j, c] = first[n, c] * tangent[n, j, c]. out may alias tangent.
template <typename T>
struct ActivationTangentParams {
  const T* first;
  const T* tangent;
  T* out;
  int64_t batch;
  int64_t k;
  int64_t cols;
};

// Delta step of a Hessian or GGN product, in place on `delta` (batch, k, cols):
// delta[n, j, c] = first[n, c] * delta[n, j, c] + curvature[n, c] * tangent_in[n, j, c].
// first null means identity; curvature null (GGN, or no s'') drops the second term.
template <typename T>
struct ActivationDeltaParams {
  const T* first;
  const T* curvature;
  const T* tangent_in;
  T* delta;
  int64_t batch;
  int64_t k;
  int64_t cols;
};

// Softmax cross-entropy on logits (rows, classes) and labels in [0, classes):
// probs = softmax, grad = (probs - onehot) * scale, row_loss[n] = CE in float64.
template <typename T>
struct SoftmaxCrossEntropyParams {
  const T* logits;
  const int64_t* target;
  T* probs;
  T* grad;
  double* row_loss;
  int64_t rows;
  int64_t classes;
  T scale;
};

// Loss-Hessian product for k directions, in place on u (batch, k, classes):
// u <- scale * (diag(p) - p p^T) u in a shifted form that never subtracts nearly equal
// terms on confident rows: with m the argmax of p, s = sum_c p_c (u_c - u_m) and
// u_c <- scale * p_c ((u_c - u_m) - s) (the same product, as sum_c p_c = 1).
template <typename T>
struct SoftmaxHessianParams {
  const T* probs;
  T* u;
  int64_t batch;
  int64_t k;
  int64_t classes;
  T scale;
};

// c (m x n) = a-term @ b-term (+ c when accumulate), row-major, contiguous, for GEMMs
// with one small dimension (the kernels below name which one):
//   small_gemm_k: a (m x k), b (k x n)          c[i, j] = sum_t a[i, t] b[t, j]
//   small_gemm_n: a (m x k), b (n x k)          c[i, j] = sum_t a[i, t] b[j, t]
//   small_gemm_m: a (k x m), b (k x n)          c[i, j] = sum_t a[t, i] b[t, j]
constexpr int64_t kSmallGemmMax = 16;  // the small dimension's bound

template <typename T>
struct SmallGemmParams {
  const T* a;
  const T* b;
  T* c;
  int64_t m;
  int64_t n;
  int64_t k;
  bool accumulate;
};

// out (cols x rows) = in (rows x cols)^T, both row-major, in tiles of kTransposeTile^2
// (32 float rows: 32 cache lines read and 32 written per tile).
constexpr int64_t kTransposeTile = 32;

template <typename T>
struct TransposeParams {
  const T* in;
  T* out;
  int64_t rows;
  int64_t cols;
};

}  // namespace pyflat

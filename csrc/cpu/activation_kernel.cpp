// CPU loops for the activations: the prepared forward (value, s', s''), its backward on
// the prepared batch, and the two per-product steps over (batch, k, cols) tangents.
#include "cpu_kernels.h"

namespace pyflat {
namespace cpu {
namespace {

// The activation kind is a template argument so the switch in activation_eval folds
// away and the inner loop is a straight line the compiler can vectorise.
template <typename T, Activation Kind>
void activation_forward_rows(const ActivationForwardParams<T>& p, int64_t begin, int64_t end) {
  for (int64_t i = begin * p.cols; i < end * p.cols; ++i) {
    const ActivationValue<T> v = activation_eval<T>(Kind, p.z[i], p.param0, p.param1);
    p.value[i] = v.value;
    if (p.first != nullptr) p.first[i] = v.first;
    if (p.second != nullptr) p.second[i] = v.second;
  }
}

}  // namespace

template <typename T>
void activation_forward(const ActivationForwardParams<T>& p, int64_t begin, int64_t end) {
  switch (p.kind) {
#define PYFLAT_FORWARD_CASE(KIND, NAME, CURVED) \
  case Activation::KIND:                        \
    return activation_forward_rows<T, Activation::KIND>(p, begin, end);
    PYFLAT_FOR_EACH_ACTIVATION(PYFLAT_FORWARD_CASE)
#undef PYFLAT_FORWARD_CASE
  }
}

template <typename T>
void activation_backward(const ActivationBackwardParams<T>& p, int64_t begin, int64_t end) {
  for (int64_t i = begin * p.cols; i < end * p.cols; ++i) {
    const T g = p.grad[i];
    if (p.second != nullptr) p.second[i] *= g;
    p.delta[i] = p.first != nullptr ? p.first[i] * g : g;
  }
}

template <typename T>
void activation_tangent(const ActivationTangentParams<T>& p, int64_t begin, int64_t end) {
  const int64_t cols = p.cols;
  for (int64_t n = begin; n < end; ++n) {
    const T* __restrict__ first = p.first + n * cols;
    for (int64_t j = 0; j < p.k; ++j) {
      const int64_t row = (n * p.k + j) * cols;
      const T* tangent = p.tangent + row;
      T* out = p.out + row;
      for (int64_t c = 0; c < cols; ++c) out[c] = first[c] * tangent[c];
    }
  }
}

template <typename T>
void activation_delta(const ActivationDeltaParams<T>& p, int64_t begin, int64_t end) {
  const int64_t cols = p.cols;
  for (int64_t n = begin; n < end; ++n) {
    const T* __restrict__ first = p.first != nullptr ? p.first + n * cols : nullptr;
    const T* __restrict__ curvature = p.curvature != nullptr ? p.curvature + n * cols : nullptr;
    for (int64_t j = 0; j < p.k; ++j) {
      const int64_t row = (n * p.k + j) * cols;
      T* __restrict__ delta = p.delta + row;
      if (first != nullptr) {
        for (int64_t c = 0; c < cols; ++c) delta[c] *= first[c];
      }
      if (curvature != nullptr) {
        const T* __restrict__ tangent = p.tangent_in + row;
        for (int64_t c = 0; c < cols; ++c) delta[c] += curvature[c] * tangent[c];
      }
    }
  }
}

#define PYFLAT_INSTANTIATE(T)                                                                  \
  template void activation_forward<T>(const ActivationForwardParams<T>&, int64_t, int64_t);   \
  template void activation_backward<T>(const ActivationBackwardParams<T>&, int64_t, int64_t); \
  template void activation_tangent<T>(const ActivationTangentParams<T>&, int64_t, int64_t);   \
  template void activation_delta<T>(const ActivationDeltaParams<T>&, int64_t, int64_t);
PYFLAT_INSTANTIATE(float)
PYFLAT_INSTANTIATE(double)
#undef PYFLAT_INSTANTIATE

}  // namespace cpu
}  // namespace pyflat

// CPU loops for softmax cross-entropy: the prepared forward (loss, probabilities,
// gradient) and the loss-Hessian product on k directions.
#include <cmath>

#include "cpu_kernels.h"

namespace pyflat {
namespace cpu {

// One row at a time in float64: a confident model has losses near 1e-6, where float32
// log(1 + r) keeps no correct digit. The loss is log1p(sum of the non-maximal terms)
// plus (max - f_y), and the label's gradient is minus the sum of the other
// probabilities, so 1 - p_y is never formed.
template <typename T>
void softmax_cross_entropy(const SoftmaxCrossEntropyParams<T>& p, int64_t begin, int64_t end) {
  const int64_t C = p.classes;
  for (int64_t n = begin; n < end; ++n) {
    const T* f = p.logits + n * C;
    T* probs = p.probs + n * C;
    T* grad = p.grad + n * C;
    const int64_t y = p.target[n];

    int64_t m = 0;
    for (int64_t c = 1; c < C; ++c) {
      if (f[c] > f[m]) m = c;
    }
    const double fmax = static_cast<double>(f[m]);
    double rest = 0.0;  // sum over c != m of exp(f_c - max)
    for (int64_t c = 0; c < C; ++c) {
      if (c != m) rest += std::exp(static_cast<double>(f[c]) - fmax);
    }
    const double inv_total = 1.0 / (1.0 + rest);
    double others = 0.0;  // sum over c != y of p_c
    for (int64_t c = 0; c < C; ++c) {
      const double pc = c == m ? inv_total : std::exp(static_cast<double>(f[c]) - fmax) * inv_total;
      probs[c] = static_cast<T>(pc);
      if (c != y) {
        others += pc;
        grad[c] = static_cast<T>(pc * static_cast<double>(p.scale));
      }
    }
    grad[y] = static_cast<T>(-others * static_cast<double>(p.scale));
    p.row_loss[n] = std::log1p(rest) + (fmax - static_cast<double>(f[y]));
  }
}

template <typename T>
void softmax_hessian(const SoftmaxHessianParams<T>& p, int64_t begin, int64_t end) {
  const int64_t C = p.classes;
  for (int64_t n = begin; n < end; ++n) {
    const T* __restrict__ probs = p.probs + n * C;
    // the most probable class, as selects rather than branches: which class wins is
    // random from row to row, and mispredicted branches cost more than the row's FLOPs
    int64_t m = 0;
    T best = probs[0];
    for (int64_t c = 1; c < C; ++c) {
      const bool more = probs[c] > best;
      m = more ? c : m;
      best = more ? probs[c] : best;
    }
    for (int64_t j = 0; j < p.k; ++j) {
      T* __restrict__ u = p.u + (n * p.k + j) * C;
      const T um = u[m];
      T s = T(0);
      for (int64_t c = 0; c < C; ++c) s += probs[c] * (u[c] - um);
      for (int64_t c = 0; c < C; ++c) u[c] = p.scale * probs[c] * ((u[c] - um) - s);
    }
  }
}

#define PYFLAT_INSTANTIATE(T)                                                                      \
  template void softmax_cross_entropy<T>(const SoftmaxCrossEntropyParams<T>&, int64_t, int64_t); \
  template void softmax_hessian<T>(const SoftmaxHessianParams<T>&, int64_t, int64_t);
PYFLAT_INSTANTIATE(float)
PYFLAT_INSTANTIATE(double)
#undef PYFLAT_INSTANTIATE

}  // namespace cpu
}  // namespace pyflat

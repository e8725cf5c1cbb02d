// Torch-free checks of the fused per-element pieces (csrc/kernels, csrc/cpu):
// activation derivatives against central differences, and the softmax cross-entropy
// loops against long-double evaluations of the textbook formulas. Built and run by
// CMake/ctest; the Python tests check the same pieces end to end against autograd.
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "../../csrc/cpu/cpu_kernels.h"

using namespace pyflat;

namespace {

int passed = 0;
int failed = 0;

void expect(bool ok, const char* what, double got, double want) {
  if (ok) {
    ++passed;
  } else {
    ++failed;
    std::printf("FAIL %s: got %.17g, want %.17g\n", what, got, want);
  }
}

struct Case {
  const char* name;
  Activation kind;
  double p0, p1;
};

void activation_derivatives() {
  const Case cases[] = {
      {"relu", Activation::ReLU, 0, 0},          {"leaky_relu", Activation::LeakyReLU, 0.1, 0},
      {"tanh", Activation::Tanh, 0, 0},          {"sigmoid", Activation::Sigmoid, 0, 0},
      {"gelu", Activation::GeluErf, 0, 0},       {"gelu_tanh", Activation::GeluTanh, 0, 0},
      {"softplus", Activation::Softplus, 1.5, 20}, {"elu", Activation::ELU, 0.7, 0},
      {"silu", Activation::SiLU, 0, 0},          {"identity", Activation::Identity, 0, 0},
  };
  const double points[] = {-3.7, -1.2, -0.3, 0.45, 1.1, 2.9};
  const double h = 1e-5;
  for (const Case& c : cases) {
    for (double z : points) {
      auto at = [&](double x) { return activation_eval<double>(c.kind, x, c.p0, c.p1); };
      const auto v = at(z);
      const double d1 = (at(z + h).value - at(z - h).value) / (2 * h);
      const double d2 = (at(z + h).first - at(z - h).first) / (2 * h);
      char what[96];
      std::snprintf(what, sizeof what, "%s first derivative at %g", c.name, z);
      expect(std::fabs(v.first - d1) < 1e-8 * (1 + std::fabs(d1)), what, v.first, d1);
      std::snprintf(what, sizeof what, "%s second derivative at %g", c.name, z);
      expect(std::fabs(v.second - d2) < 1e-8 * (1 + std::fabs(d2)), what, v.second, d2);
    }
  }
}

void softmax_cross_entropy_and_hessian() {
  std::mt19937_64 rng(7);
  std::normal_distribution<double> normal;
  const int64_t B = 6, C = 5, k = 3;
  std::vector<float> logits(B * C), probs(B * C), grad(B * C), u(B * k * C);
  std::vector<double> row_loss(B);
  std::vector<int64_t> target(B);
  for (int64_t n = 0; n < B; ++n) {
    target[n] = n % C;
    // rows 0-2 ordinary, rows 3-5 confident (the label's logit 14 above the rest)
    for (int64_t c = 0; c < C; ++c) {
      logits[n * C + c] = static_cast<float>(normal(rng) + (n >= 3 && c == target[n] ? 14 : 0));
    }
  }
  for (auto& x : u) x = static_cast<float>(normal(rng));
  const float scale = 1.0f / B;
  SoftmaxCrossEntropyParams<float> ce{logits.data(), target.data(), probs.data(), grad.data(),
                                      row_loss.data(), B, C, scale};
  cpu::softmax_cross_entropy(ce, 0, B);
  std::vector<float> hu = u;
  SoftmaxHessianParams<float> hp{probs.data(), hu.data(), B, k, C, scale};
  cpu::softmax_hessian(hp, 0, B);

  for (int64_t n = 0; n < B; ++n) {
    long double mx = logits[n * C];
    for (int64_t c = 1; c < C; ++c) mx = std::max<long double>(mx, logits[n * C + c]);
    long double total = 0;
    for (int64_t c = 0; c < C; ++c) total += std::exp((long double)logits[n * C + c] - mx);
    std::vector<long double> p(C);
    for (int64_t c = 0; c < C; ++c) p[c] = std::exp((long double)logits[n * C + c] - mx) / total;
    const long double loss = std::log(total) + mx - logits[n * C + target[n]];
    expect(std::fabs((double)(row_loss[n] - loss)) <= 1e-12 * (double)loss + 1e-300,
           "cross-entropy row loss (relative 1e-12)", row_loss[n], (double)loss);
    for (int64_t c = 0; c < C; ++c) {
      const long double g = (p[c] - (c == target[n] ? 1 : 0)) * scale;
      expect(std::fabs((double)(grad[n * C + c] - g)) <= 4e-7 * std::fabs((double)g) + 1e-30,
             "cross-entropy gradient (relative, float32)", grad[n * C + c], (double)g);
    }
    for (int64_t j = 0; j < k; ++j) {
      const float* uj = &u[(n * k + j) * C];
      long double pu = 0;
      for (int64_t c = 0; c < C; ++c) pu += p[c] * uj[c];
      for (int64_t c = 0; c < C; ++c) {
        const long double want = p[c] * (uj[c] - pu) * scale;
        // float32 storage of p and u: a few ulps of |p_c| |u| scale
        const double bound = 1e-6 * (double)(p[c] * scale) * 8;
        expect(std::fabs((double)(hu[(n * k + j) * C + c] - want)) <= bound,
               "loss-Hessian product (shifted form, float32)", hu[(n * k + j) * C + c],
               (double)want);
      }
    }
  }
}

// The three small-GEMM loops against a naive triple loop in long double, on odd sizes
// (remainders of every blocking), with and without accumulation, float and double.
template <typename T>
void small_gemms(double tol) {
  if (!cpu::small_gemm_supported()) {
    std::printf("small GEMM loops not supported on this CPU: the glue uses BLAS\n");
    return;
  }
  std::mt19937_64 rng(11);
  std::normal_distribution<double> normal;
  const int64_t big = 37, mid = 45;
  for (int64_t small : {1, 3, 5, 7, 8, 10, 13, 16}) {
    // which: 0 small k, 1 small n, 2 small m; 3 and 4 small n and m with a long k that
    // spans several blocks of the two-level sum
    for (int variant = 0; variant < 5; ++variant) {
      const int which = variant >= 3 ? variant - 2 : variant;
      const int64_t long_k = variant >= 3 ? 1100 : mid + 6;
      const int64_t m = which == 2 ? small : big;
      const int64_t n = which == 1 ? small : mid;
      const int64_t k = which == 0 ? small : long_k;
      std::vector<T> a(m * k), b(k * n), c0(m * n);
      for (auto& x : a) x = static_cast<T>(normal(rng));
      for (auto& x : b) x = static_cast<T>(normal(rng));
      for (auto& x : c0) x = static_cast<T>(normal(rng));
      for (bool accumulate : {false, true}) {
        std::vector<T> c = c0;
        std::vector<T> a_in = a, b_in = b;
        if (which == 2) {  // small_gemm_m reads a^T (k x m)
          for (int64_t i = 0; i < m; ++i)
            for (int64_t t = 0; t < k; ++t) a_in[t * m + i] = a[i * k + t];
        }
        if (which == 1) {  // small_gemm_n reads b^T (n x k)
          for (int64_t t = 0; t < k; ++t)
            for (int64_t j = 0; j < n; ++j) b_in[j * k + t] = b[t * n + j];
        }
        SmallGemmParams<T> p{a_in.data(), b_in.data(), c.data(), m, n, k, accumulate};
        if (which == 0) cpu::small_gemm_k(p, 0, m);
        if (which == 1) cpu::small_gemm_n(p, 0, m);
        if (which == 2) {  // two column ranges, as two threads would take them
          cpu::small_gemm_m(p, 0, n / 2);
          cpu::small_gemm_m(p, n / 2, n);
        }
        for (int64_t i = 0; i < m; ++i) {
          for (int64_t j = 0; j < n; ++j) {
            long double want = accumulate ? c0[i * n + j] : 0;
            long double size = 0;
            for (int64_t t = 0; t < k; ++t) {
              want += (long double)a[i * k + t] * b[t * n + j];
              size += std::fabs((long double)a[i * k + t] * b[t * n + j]);
            }
            char what[96];
            std::snprintf(what, sizeof what, "small_gemm_%c (small=%lld, accumulate=%d)",
                          "knm"[which], (long long)small, (int)accumulate);
            expect(std::fabs((double)(c[i * n + j] - want)) <= tol * (double)(size + 1), what,
                   c[i * n + j], (double)want);
          }
        }
      }
    }
  }
}

}  // namespace

int main() {
  activation_derivatives();
  softmax_cross_entropy_and_hessian();
  small_gemms<float>(1e-5);
  small_gemms<double>(1e-13);
  std::printf("%d passed, %d failed\n", passed, failed);
  return failed == 0 ? 0 : 1;
}

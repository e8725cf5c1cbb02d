// The CUDA kernels (csrc/cuda/*.cu, launches rewritten) run under the CPU emulator of
// CUDA's execution model (csrc/emulator) and are compared with the CPU loops (csrc/cpu):
// the per-element kernels bit for bit (both compile the same math with the same host
// compiler), the warp reductions of softmax cross-entropy within a few ulps per summed
// term (a butterfly, not a sequence). Each case runs as launched, with the grid capped
// at 1 and 2 blocks (grid-stride loops wrap) and with blocks and threads in reverse order;
// those runs must give the same bits as the launch (an order-dependent race would not).
// Agreement here says nothing about a GPU (nvcc's FMA contraction, CUDA's libm).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <random>
#include <regex>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "../../csrc/cpu/cpu_kernels.h"
#include "../../csrc/cuda/cuda_kernels.h"

using namespace pyflat;

namespace {

int passed = 0;
int failed = 0;

struct Mode {
  bool reverse;
  unsigned grid_cap;
};
const Mode kModes[] = {{false, 0}, {false, 1}, {false, 2}, {true, 0}, {true, 2}};

template <typename T>
bool same_bits(const std::vector<T>& a, const std::vector<T>& b) {
  if (a.size() != b.size()) return false;
  for (std::size_t i = 0; i < a.size(); ++i) {
    if (std::isnan(a[i]) && std::isnan(b[i])) continue;
    if (std::memcmp(&a[i], &b[i], sizeof(T)) != 0) return false;
  }
  return true;
}

void check(bool ok, const std::string& what) {
  if (ok) {
    ++passed;
  } else {
    ++failed;
    std::printf("FAIL %s\n", what.c_str());
  }
}

// Runs a launch under the mode; false (with the emulator's message printed) on an error.
template <typename Launch>
bool emulate(const Mode& mode, const std::string& what, Launch launch) {
  pyflat_emu::settings().reverse = mode.reverse;
  pyflat_emu::settings().grid_cap = mode.grid_cap;
  const cudaError_t error = launch();
  pyflat_emu::settings() = pyflat_emu::Settings();
  if (error != cudaSuccess) {
    std::printf("FAIL %s: emulator: %s\n", what.c_str(), cudaGetErrorString(error));
    ++failed;
    return false;
  }
  return true;
}

std::string describe(const char* kernel, const char* type, const Mode& mode,
                     const std::string& sizes) {
  return std::string(kernel) + "<" + type + "> " + sizes + (mode.reverse ? " reversed" : "") +
         (mode.grid_cap ? " grid<=" + std::to_string(mode.grid_cap) : "");
}

template <typename T>
std::vector<T> values(std::mt19937_64& rng, std::size_t n, double scale, bool specials) {
  std::normal_distribution<double> normal(0.0, scale);
  std::vector<T> out(n);
  for (auto& v : out) v = static_cast<T>(normal(rng));
  if (specials && n >= 4) {
    out[0] = out[1];  // a tie
    out[2] = std::numeric_limits<T>::infinity();
    out[3] = std::numeric_limits<T>::quiet_NaN();
  }
  return out;
}

template <typename T>
void activations(const char* type) {
  std::mt19937_64 rng(7);
  const Activation kinds[] = {Activation::Identity, Activation::ReLU, Activation::LeakyReLU,
                              Activation::Tanh,     Activation::Sigmoid, Activation::GeluErf,
                              Activation::GeluTanh, Activation::Softplus, Activation::ELU,
                              Activation::SiLU};
  const int64_t shapes[][2] = {{1, 1}, {3, 33}, {17, 31}, {40, 300}};
  for (Activation kind : kinds) {
    for (const auto& shape : shapes) {
      const int64_t rows = shape[0], cols = shape[1], n = rows * cols;
      const std::vector<T> z = values<T>(rng, n, 3.0, true);
      for (const Mode& mode : kModes) {
        std::vector<T> value(n), first(n), second(n), value2(n), first2(n), second2(n);
        ActivationForwardParams<T> cpu_p{z.data(), value.data(), first.data(), second.data(),
                                         rows, cols, kind, T(1.5), T(20)};
        cpu::activation_forward(cpu_p, 0, rows);
        ActivationForwardParams<T> gpu_p = cpu_p;
        gpu_p.value = value2.data();
        gpu_p.first = first2.data();
        gpu_p.second = second2.data();
        const std::string what = describe("forward_kernel", type, mode,
                                          std::to_string(rows) + "x" + std::to_string(cols) +
                                              " kind " + std::to_string(int(kind)));
        if (!emulate(mode, what, [&] { return cuda::activation_forward(gpu_p, nullptr); }))
          continue;
        check(same_bits(value, value2) && same_bits(first, first2) &&
                  same_bits(second, second2),
              what);
      }
    }
  }
  // backward, tangent, delta over (batch, k, cols) with k in 1..16
  for (int64_t k : {int64_t(1), int64_t(3), int64_t(16)}) {
    for (const auto& shape : shapes) {
      const int64_t batch = shape[0], cols = shape[1], n = batch * cols, nk = n * k;
      const std::vector<T> grad = values<T>(rng, n, 1.0, false);
      const std::vector<T> first = values<T>(rng, n, 1.0, false);
      const std::vector<T> curvature = values<T>(rng, n, 1.0, false);
      const std::vector<T> tangent = values<T>(rng, nk, 1.0, false);
      const std::vector<T> delta0 = values<T>(rng, nk, 1.0, false);
      const std::string sizes = "batch " + std::to_string(batch) + " k " + std::to_string(k) +
                                " cols " + std::to_string(cols);
      for (const Mode& mode : kModes) {
        {  // backward (k plays no part)
          std::vector<T> second(first), second2(first), delta(n), delta2(n);
          ActivationBackwardParams<T> p{grad.data(), first.data(), second.data(), delta.data(),
                                        batch, cols};
          cpu::activation_backward(p, 0, batch);
          ActivationBackwardParams<T> q = p;
          q.second = second2.data();
          q.delta = delta2.data();
          const std::string what = describe("backward_kernel", type, mode, sizes);
          if (emulate(mode, what, [&] { return cuda::activation_backward(q, nullptr); }))
            check(same_bits(second, second2) && same_bits(delta, delta2), what);
        }
        {  // tangent
          std::vector<T> out(nk), out2(nk);
          ActivationTangentParams<T> p{first.data(), tangent.data(), out.data(), batch, k, cols};
          cpu::activation_tangent(p, 0, batch);
          ActivationTangentParams<T> q = p;
          q.out = out2.data();
          const std::string what = describe("tangent_kernel", type, mode, sizes);
          if (emulate(mode, what, [&] { return cuda::activation_tangent(q, nullptr); }))
            check(same_bits(out, out2), what);
        }
        for (bool with_curvature : {false, true}) {  // delta, GGN and Hessian forms
          std::vector<T> delta(delta0), delta2(delta0);
          ActivationDeltaParams<T> p{first.data(), with_curvature ? curvature.data() : nullptr,
                                     with_curvature ? tangent.data() : nullptr, delta.data(),
                                     batch, k, cols};
          cpu::activation_delta(p, 0, batch);
          ActivationDeltaParams<T> q = p;
          q.delta = delta2.data();
          const std::string what =
              describe("delta_kernel", type, mode,
                       sizes + (with_curvature ? " with curvature" : ""));
          if (emulate(mode, what, [&] { return cuda::activation_delta(q, nullptr); }))
            check(same_bits(delta, delta2), what);
        }
      }
    }
  }
}

// Rows of ref and got agree where both are NaN, infinite alike, or within tol of the row's
// scale. The warp kernels sum in a butterfly, the CPU loops in sequence: not bitwise.
template <typename T>
bool close_rows(const std::vector<T>& ref, const std::vector<T>& got, int64_t rows, int64_t C,
                double tol, const std::vector<double>& scale) {
  for (int64_t n = 0; n < rows; ++n) {
    for (int64_t c = 0; c < C; ++c) {
      const double a = ref[n * C + c], b = got[n * C + c];
      if (std::isnan(a) || std::isnan(b) || std::isinf(a) || std::isinf(b)) {
        if (!(std::isnan(a) && std::isnan(b)) && a != b) return false;
        continue;
      }
      if (std::fabs(a - b) > tol * scale[n]) return false;
    }
  }
  return true;
}

template <typename T>
std::vector<double> row_scales(const std::vector<T>& x, int64_t rows, int64_t C) {
  std::vector<double> out(rows, 0.0);
  for (int64_t n = 0; n < rows; ++n)
    for (int64_t c = 0; c < C; ++c)
      if (std::isfinite(double(x[n * C + c]))) out[n] = std::max(out[n], std::fabs(double(x[n * C + c])));
  return out;
}

template <typename T>
void softmax(const char* type) {
  std::mt19937_64 rng(11);
  const double eps = std::numeric_limits<T>::epsilon();
  for (int64_t C : {1, 2, 3, 31, 32, 33, 1000}) {
    const double tol = 4.0 * double(C + 32) * eps;  // sums of C terms, in another order
    for (int64_t rows : {1, 9, 70}) {
      std::vector<T> logits = values<T>(rng, rows * C, 4.0, false);
      std::vector<int64_t> target(rows);
      for (int64_t n = 0; n < rows; ++n) {
        target[n] = static_cast<int64_t>(rng() % C);
        if (C > 1 && n % 3 == 1) logits[n * C + C - 1] = logits[n * C];  // a tied maximum
        if (n % 5 == 2) logits[n * C + (C - 1) / 2] = T(80);             // a confident row
        if (n % 7 == 3) logits[n * C + C / 3] = T(1000);  // exp overflows off the max pivot
      }
      const std::string sizes = "rows " + std::to_string(rows) + " C " + std::to_string(C);
      const int64_t n = rows * C;
      std::vector<T> probs(n), grad(n);
      std::vector<double> loss(rows);
      SoftmaxCrossEntropyParams<T> p{logits.data(), target.data(), probs.data(), grad.data(),
                                     loss.data(), rows, C, T(0.25)};
      cpu::softmax_cross_entropy(p, 0, rows);
      std::vector<T> first_probs, first_grad;
      std::vector<double> first_loss;
      for (const Mode& mode : kModes) {
        std::vector<T> probs2(n), grad2(n);
        std::vector<double> loss2(rows);
        SoftmaxCrossEntropyParams<T> q = p;
        q.probs = probs2.data();
        q.grad = grad2.data();
        q.row_loss = loss2.data();
        const std::string what = describe("cross_entropy_kernel", type, mode, sizes);
        if (!emulate(mode, what, [&] { return cuda::softmax_cross_entropy(q, nullptr); }))
          continue;
        if (first_probs.empty()) {  // as launched: against the CPU loops
          std::vector<double> loss_scale(rows);
          for (int64_t r = 0; r < rows; ++r) loss_scale[r] = std::fabs(loss[r]) + 1.0;
          check(close_rows(probs, probs2, rows, C, tol, std::vector<double>(rows, 1.0)) &&
                    close_rows(grad, grad2, rows, C, tol, std::vector<double>(rows, 0.25)) &&
                    close_rows(loss, loss2, rows, 1, tol, loss_scale),
                what + " vs the CPU loops");
          first_probs = probs2, first_grad = grad2, first_loss = loss2;
        } else {  // every other order and grid: the same bits
          check(same_bits(first_probs, probs2) && same_bits(first_grad, grad2) &&
                    same_bits(first_loss, loss2),
                what + " vs as launched");
        }
      }
      for (int64_t k : {int64_t(1), int64_t(4)}) {
        const std::vector<T> u0 = values<T>(rng, rows * k * C, 1.0, false);
        std::vector<T> u(u0);
        SoftmaxHessianParams<T> h{probs.data(), u.data(), rows, k, C, T(0.5)};
        cpu::softmax_hessian(h, 0, rows);
        std::vector<double> scale = row_scales(u0, rows * k, C);
        for (double& v : scale) v *= 2.0 * 0.5;  // |u_c - u_m| <= 2 max|u|, times the scale
        std::vector<T> first_u;
        for (const Mode& mode : kModes) {
          std::vector<T> u2(u0);
          SoftmaxHessianParams<T> g = h;
          g.u = u2.data();
          const std::string what =
              describe("hessian_kernel", type, mode, sizes + " k " + std::to_string(k));
          if (!emulate(mode, what, [&] { return cuda::softmax_hessian(g, nullptr); })) continue;
          if (first_u.empty()) {
            check(close_rows(u, u2, rows * k, C, tol, scale), what + " vs the CPU loops");
            first_u = u2;
          } else {
            check(same_bits(first_u, u2), what + " vs as launched");
          }
        }
      }
    }
  }
}

// Every __global__ of the CUDA sources (csrc/cuda/*.cu) must have been launched above, so
// a new kernel cannot go untested.
void every_kernel_ran() {
  std::set<std::string> declared;
  const std::regex global(R"(__global__\s+void\s+(\w+))");
  for (const auto& entry : std::filesystem::directory_iterator(PYFLAT_CUDA_SOURCES)) {
    if (entry.path().extension() != ".cu") continue;
    std::ifstream in(entry.path());
    std::stringstream text;
    text << in.rdbuf();
    const std::string s = text.str();
    for (std::sregex_iterator it(s.begin(), s.end(), global), end; it != end; ++it)
      declared.insert((*it)[1]);
  }
  check(!declared.empty(), std::string("kernels found in ") + PYFLAT_CUDA_SOURCES);
  for (const std::string& name : declared)
    check(pyflat_emu::launched().count(name) == 1, "kernel " + name + " ran under the emulator");
}

}  // namespace

int main() {
  activations<float>("float");
  activations<double>("double");
  softmax<float>("float");
  softmax<double>("double");
  every_kernel_ran();
  std::printf("%d passed, %d failed\n", passed, failed);
  return failed == 0 ? 0 : 1;
}

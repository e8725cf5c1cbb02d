// The CUDA kernels (csrc/cuda/*.cu, launches rewritten) run under the CPU emulator of
// CUDA's execution model (csrc/emulator) and are compared with the CPU loops (csrc/cpu):
// the per-element kernels bit for bit (both compile the same math with the same host
// compiler), the warp reductions of softmax cross-entropy within a few ulps per summed
// term (a butterfly, not a sequence). Each case runs as launched, with the grid capped
// at 1 and 2 blocks (grid-stride loops wrap) and with blocks and threads in reverse order;
// those runs must give the same bits as the launch (an order-dependent race would not).
// Agreement here says nothing about a GPU (nvcc's FMA contraction, CUDA's libm).
//
// Index width: each kernel also runs on more than 2^31 elements, in arrays reserved but
// not committed, on three of its blocks (the first, the last, and the one that reaches
// the last element); what they wrote is compared with the CPU loops on the same rows. An
// index truncated to 32 bits wraps into the guard around the arrays and faults, which the
// emulator names.
#include <sys/mman.h>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <functional>
#include <fstream>
#include <limits>
#include <random>
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
bool stop_at_first_failure = false;  // for the mutation check: one failure is the answer

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
    if (stop_at_first_failure) {
      std::printf("stopped at the first failure\n");
      std::exit(1);
    }
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
    check(false, what + ": emulator: " + cudaGetErrorString(error));
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
  const Activation kinds[] = {  // every kind of the one list
#define PYFLAT_KIND(KIND, NAME, CURVED) Activation::KIND,
      PYFLAT_FOR_EACH_ACTIVATION(PYFLAT_KIND)
#undef PYFLAT_KIND
  };
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

// An array of n elements in memory reserved but not committed: only the pages touched
// take memory. Inaccessible guards of 2^35 bytes on each side catch indices truncated to
// 32 bits (a wrapped int reaches at most 2^31 elements, 2^34 bytes of doubles, away).
template <typename T>
class ReservedArray {
 public:
  explicit ReservedArray(int64_t n) : bytes_(round_up(std::size_t(n) * sizeof(T))) {
    void* memory = mmap(nullptr, bytes_ + 2 * kGuard, PROT_NONE,
                        MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (memory == MAP_FAILED) return;
    base_ = static_cast<char*>(memory);
    if (mprotect(base_ + kGuard, bytes_, PROT_READ | PROT_WRITE) != 0) {
      munmap(base_, bytes_ + 2 * kGuard);
      base_ = nullptr;
    }
  }
  ~ReservedArray() {
    if (base_ != nullptr) munmap(base_, bytes_ + 2 * kGuard);
  }
  ReservedArray(const ReservedArray&) = delete;
  ReservedArray& operator=(const ReservedArray&) = delete;
  bool ok() const { return base_ != nullptr; }
  T* data() const { return reinterpret_cast<T*>(base_ + kGuard); }
  T& operator[](int64_t i) const { return data()[i]; }

 private:
  static constexpr std::size_t kGuard = std::size_t(1) << 35;
  static std::size_t round_up(std::size_t b) { return (b + 4095) / 4096 * 4096; }
  std::size_t bytes_;
  char* base_ = nullptr;
};

// Runs `launch` once dry (no block) to learn its grid, then on its first block, its last
// and `block_of_last` of that grid. Returns the grid and the blocks run; empty on an error.
struct Selection {
  pyflat_emu::LaunchConfig config;
  std::vector<std::uint64_t> blocks;
};
Selection run_selected(const std::string& what, const std::function<cudaError_t()>& launch,
                       const std::function<std::uint64_t(const pyflat_emu::LaunchConfig&)>& block_of_last,
                       const std::function<void(const Selection&)>& prepare) {
  Selection s;
  pyflat_emu::settings().select_blocks = true;
  const cudaError_t dry = launch();
  if (dry != cudaSuccess) {
    pyflat_emu::settings() = pyflat_emu::Settings();
    check(false, what + ": dry run: " + cudaGetErrorString(dry));
    return {};
  }
  s.config = pyflat_emu::last_launch();
  s.blocks = {0, std::uint64_t(s.config.grid.x) - 1, block_of_last(s.config)};
  std::sort(s.blocks.begin(), s.blocks.end());
  s.blocks.erase(std::unique(s.blocks.begin(), s.blocks.end()), s.blocks.end());
  prepare(s);
  pyflat_emu::settings().blocks = s.blocks;
  const cudaError_t error = launch();
  pyflat_emu::settings() = pyflat_emu::Settings();
  if (error != cudaSuccess) {
    check(false, what + ": emulator: " + cudaGetErrorString(error));
    return {};
  }
  return s;
}

// The elements a grid-stride loop (one thread per element) gives the selected blocks.
std::vector<int64_t> elements_of(const Selection& s, int64_t total) {
  const int64_t threads = s.config.block.x, stride = threads * int64_t(s.config.grid.x);
  std::vector<int64_t> out;
  for (std::uint64_t b : s.blocks)
    for (int64_t t = 0; t < threads; ++t)
      for (int64_t i = int64_t(b) * threads + t; i < total; i += stride) out.push_back(i);
  std::sort(out.begin(), out.end());
  return out;
}

// The rows a grid-stride loop over rows (one warp per row) gives the selected blocks.
std::vector<int64_t> rows_of(const Selection& s, int64_t rows) {
  const int64_t warps = s.config.block.x / 32, stride = warps * int64_t(s.config.grid.x);
  std::vector<int64_t> out;
  for (std::uint64_t b : s.blocks)
    for (int64_t w = 0; w < warps; ++w)
      for (int64_t r = int64_t(b) * warps + w; r < rows; r += stride) out.push_back(r);
  std::sort(out.begin(), out.end());
  return out;
}

std::uint64_t block_of_element(const pyflat_emu::LaunchConfig& c, int64_t i) {
  return std::uint64_t(i % (int64_t(c.block.x) * c.grid.x) / c.block.x);
}
std::uint64_t block_of_row(const pyflat_emu::LaunchConfig& c, int64_t r) {
  const int64_t warps = c.block.x / 32;
  return std::uint64_t(r % (warps * c.grid.x) / warps);
}

template <typename T>
bool same_bits_at(const T* a, const T* b, int64_t i) {
  return (std::isnan(a[i]) && std::isnan(b[i])) || std::memcmp(a + i, b + i, sizeof(T)) == 0;
}

// The per-element kernels over (units, width) with units * width > 2^31: `unit` is the row
// (forward, backward) or sample (tangent, delta) a CPU loop takes as its range.
void activations_past_int32() {
  std::mt19937_64 rng(13);
  std::normal_distribution<float> normal(0.0f, 2.0f);
  const int64_t cols = 16, k = 2;
  const int64_t rows = (int64_t(1) << 27) + 1;  // rows * cols = 2^31 + 16
  const int64_t total = rows * cols;
  const int64_t batch = (int64_t(1) << 26) + 1;  // batch * k * cols = 2^31 + 32
  const int64_t total_k = batch * k * cols;
  {  // forward and backward over (rows, cols)
    ReservedArray<float> z(total), value(total), first(total), second(total), value_cpu(total),
        first_cpu(total), second_cpu(total), grad(total), delta(total), delta_cpu(total),
        second_back(total), second_back_cpu(total);
    for (auto* a : {&z, &value, &first, &second, &value_cpu, &first_cpu, &second_cpu, &grad,
                    &delta, &delta_cpu, &second_back, &second_back_cpu}) {
      if (!a->ok()) {
        check(false, "reserving 2^31 floats of address space (MAP_NORESERVE) for the index-width cases");
        return;
      }
    }
    std::vector<int64_t> units;
    ActivationForwardParams<float> f{z.data(), value.data(), first.data(), second.data(),
                                     rows, cols, Activation::GeluTanh, 0.0f, 0.0f};
    const std::string what = "forward_kernel<float> rows 2^27+1 cols 16 (past 2^31 elements)";
    const Selection s = run_selected(
        what, [&] { return cuda::activation_forward(f, nullptr); },
        [&](const pyflat_emu::LaunchConfig& c) { return block_of_element(c, total - 1); },
        [&](const Selection& sel) {
          for (int64_t i : elements_of(sel, total)) units.push_back(i / cols);
          units.erase(std::unique(units.begin(), units.end()), units.end());
          for (int64_t n : units)
            for (int64_t c = 0; c < cols; ++c) {
              z[n * cols + c] = normal(rng);
              grad[n * cols + c] = normal(rng);
            }
        });
    if (s.blocks.empty()) return;
    ActivationForwardParams<float> f_cpu = f;
    f_cpu.value = value_cpu.data(), f_cpu.first = first_cpu.data(), f_cpu.second = second_cpu.data();
    for (int64_t n : units) cpu::activation_forward(f_cpu, n, n + 1);
    bool ok = units.back() == rows - 1;
    for (int64_t i : elements_of(s, total))
      ok = ok && same_bits_at(value.data(), value_cpu.data(), i) &&
           same_bits_at(first.data(), first_cpu.data(), i) &&
           same_bits_at(second.data(), second_cpu.data(), i);
    check(ok, what);

    // backward on the same rows (second is scaled in place: separate copies)
    for (int64_t n : units)
      for (int64_t c = 0; c < cols; ++c)
        second_back[n * cols + c] = second_back_cpu[n * cols + c] = second_cpu[n * cols + c];
    ActivationBackwardParams<float> b{grad.data(), first_cpu.data(), second_back.data(),
                                      delta.data(), rows, cols};
    const std::string what_b = "backward_kernel<float> rows 2^27+1 cols 16 (past 2^31 elements)";
    const Selection sb = run_selected(
        what_b, [&] { return cuda::activation_backward(b, nullptr); },
        [&](const pyflat_emu::LaunchConfig& c) { return block_of_element(c, total - 1); },
        [](const Selection&) {});
    if (sb.blocks != s.blocks) {
      check(false, what_b + ": the launch differs from the forward's");
      return;
    }
    ActivationBackwardParams<float> b_cpu = b;
    b_cpu.second = second_back_cpu.data(), b_cpu.delta = delta_cpu.data();
    for (int64_t n : units) cpu::activation_backward(b_cpu, n, n + 1);
    ok = true;
    for (int64_t i : elements_of(sb, total))
      ok = ok && same_bits_at(delta.data(), delta_cpu.data(), i) &&
           same_bits_at(second_back.data(), second_back_cpu.data(), i);
    check(ok, what_b);
  }
  {  // tangent and delta over (batch, k, cols)
    ReservedArray<float> first(batch * cols), curvature(batch * cols), tangent(total_k),
        out(total_k), out_cpu(total_k), delta(total_k), delta_cpu(total_k);
    for (auto* a : {&first, &curvature, &tangent, &out, &out_cpu, &delta, &delta_cpu}) {
      if (!a->ok()) {
        check(false, "reserving 2^31 floats of address space (MAP_NORESERVE) for the index-width cases");
        return;
      }
    }
    std::vector<int64_t> units;
    const auto fill = [&](const Selection& sel) {
      for (int64_t i : elements_of(sel, total_k)) units.push_back(i / (k * cols));
      units.erase(std::unique(units.begin(), units.end()), units.end());
      for (int64_t n : units) {
        for (int64_t c = 0; c < cols; ++c) {
          first[n * cols + c] = normal(rng);
          curvature[n * cols + c] = normal(rng);
        }
        for (int64_t j = 0; j < k * cols; ++j) {
          tangent[n * k * cols + j] = normal(rng);
          delta[n * k * cols + j] = delta_cpu[n * k * cols + j] = normal(rng);
        }
      }
    };
    ActivationTangentParams<float> t{first.data(), tangent.data(), out.data(), batch, k, cols};
    const std::string what = "tangent_kernel<float> batch 2^26+1 k 2 cols 16 (past 2^31 elements)";
    const Selection s = run_selected(
        what, [&] { return cuda::activation_tangent(t, nullptr); },
        [&](const pyflat_emu::LaunchConfig& c) { return block_of_element(c, total_k - 1); }, fill);
    if (s.blocks.empty()) return;
    ActivationTangentParams<float> t_cpu = t;
    t_cpu.out = out_cpu.data();
    for (int64_t n : units) cpu::activation_tangent(t_cpu, n, n + 1);
    bool ok = units.back() == batch - 1;
    for (int64_t i : elements_of(s, total_k)) ok = ok && same_bits_at(out.data(), out_cpu.data(), i);
    check(ok, what);

    ActivationDeltaParams<float> d{first.data(), curvature.data(), tangent.data(), delta.data(),
                                   batch, k, cols};
    const std::string what_d = "delta_kernel<float> batch 2^26+1 k 2 cols 16 with curvature (past 2^31 elements)";
    const Selection sd = run_selected(
        what_d, [&] { return cuda::activation_delta(d, nullptr); },
        [&](const pyflat_emu::LaunchConfig& c) { return block_of_element(c, total_k - 1); },
        [](const Selection&) {});
    if (sd.blocks != s.blocks) {
      check(false, what_d + ": the launch differs from the tangent's");
      return;
    }
    ActivationDeltaParams<float> d_cpu = d;
    d_cpu.delta = delta_cpu.data();
    for (int64_t n : units) cpu::activation_delta(d_cpu, n, n + 1);
    ok = true;
    for (int64_t i : elements_of(sd, total_k)) ok = ok && same_bits_at(delta.data(), delta_cpu.data(), i);
    check(ok, what_d);
  }
}

// Softmax cross-entropy and its Hessian product on rows * classes > 2^31.
void softmax_past_int32() {
  std::mt19937_64 rng(17);
  std::normal_distribution<float> normal(0.0f, 3.0f);
  const int64_t C = 1024;
  const double tol = 4.0 * double(C + 32) * std::numeric_limits<float>::epsilon();
  const int64_t rows = (int64_t(1) << 21) + 1;  // rows * C = 2^31 + 1024
  ReservedArray<float> logits(rows * C), probs(rows * C), grad(rows * C), probs_cpu(rows * C),
      grad_cpu(rows * C);
  ReservedArray<int64_t> target(rows);
  ReservedArray<double> loss(rows), loss_cpu(rows);
  for (bool ok : {logits.ok(), probs.ok(), grad.ok(), probs_cpu.ok(), grad_cpu.ok(), target.ok(),
                  loss.ok(), loss_cpu.ok()}) {
    if (!ok) {
      check(false, "reserving 2^31 floats of address space (MAP_NORESERVE) for the index-width cases");
      return;
    }
  }
  std::vector<int64_t> covered;
  SoftmaxCrossEntropyParams<float> p{logits.data(), target.data(), probs.data(), grad.data(),
                                     loss.data(), rows, C, 0.5f};
  const std::string what = "cross_entropy_kernel<float> rows 2^21+1 C 1024 (past 2^31 elements)";
  const Selection s = run_selected(
      what, [&] { return cuda::softmax_cross_entropy(p, nullptr); },
      [&](const pyflat_emu::LaunchConfig& c) { return block_of_row(c, rows - 1); },
      [&](const Selection& sel) {
        covered = rows_of(sel, rows);
        for (int64_t n : covered) {
          for (int64_t c = 0; c < C; ++c) logits[n * C + c] = normal(rng);
          target[n] = int64_t(rng() % C);
        }
      });
  if (s.blocks.empty()) return;
  SoftmaxCrossEntropyParams<float> q = p;
  q.probs = probs_cpu.data(), q.grad = grad_cpu.data(), q.row_loss = loss_cpu.data();
  bool ok = covered.back() == rows - 1;
  for (int64_t n : covered) {
    cpu::softmax_cross_entropy(q, n, n + 1);
    for (int64_t c = 0; c < C; ++c) {
      ok = ok && std::fabs(double(probs[n * C + c]) - probs_cpu[n * C + c]) <= tol &&
           std::fabs(double(grad[n * C + c]) - grad_cpu[n * C + c]) <= 0.5 * tol;
    }
    ok = ok && std::fabs(loss[n] - loss_cpu[n]) <= tol * (std::fabs(loss_cpu[n]) + 1.0);
  }
  check(ok, what);

  // the Hessian product: (batch, k) rows of C, probabilities per sample
  const int64_t batch = (int64_t(1) << 20) + 1, k = 2;  // batch * k * C = 2^31 + 2048
  ReservedArray<float> u(batch * k * C), u_cpu(batch * k * C);
  if (!u.ok() || !u_cpu.ok()) {
    check(false, "reserving 2^31 floats of address space (MAP_NORESERVE) for the index-width cases");
    return;
  }
  std::vector<int64_t> samples;
  SoftmaxHessianParams<float> h{probs_cpu.data(), u.data(), batch, k, C, 0.5f};
  const std::string what_h = "hessian_kernel<float> batch 2^20+1 k 2 C 1024 (past 2^31 elements)";
  const Selection sh = run_selected(
      what_h, [&] { return cuda::softmax_hessian(h, nullptr); },
      [&](const pyflat_emu::LaunchConfig& c) { return block_of_row(c, batch * k - 1); },
      [&](const Selection& sel) {
        for (int64_t r : rows_of(sel, batch * k)) samples.push_back(r / k);
        samples.erase(std::unique(samples.begin(), samples.end()), samples.end());
        for (int64_t n : samples) {
          double total = 0.0;
          for (int64_t c = 0; c < C; ++c) total += (probs_cpu[n * C + c] = std::exp(normal(rng)));
          for (int64_t c = 0; c < C; ++c) probs_cpu[n * C + c] = float(probs_cpu[n * C + c] / total);
          for (int64_t j = 0; j < k * C; ++j) u[n * k * C + j] = u_cpu[n * k * C + j] = normal(rng);
        }
      });
  if (sh.blocks.empty()) return;
  SoftmaxHessianParams<float> g = h;
  g.u = u_cpu.data();
  ok = samples.back() == batch - 1;
  const std::vector<int64_t> rows_run = rows_of(sh, batch * k);
  for (int64_t n : samples) cpu::softmax_hessian(g, n, n + 1);
  for (int64_t r : rows_run) {
    double scale = 0.0;
    for (int64_t c = 0; c < C; ++c) scale = std::max(scale, std::fabs(double(u_cpu[r * C + c])));
    for (int64_t c = 0; c < C; ++c)
      ok = ok && std::fabs(double(u[r * C + c]) - u_cpu[r * C + c]) <= tol * (scale + 1.0);
  }
  check(ok, what_h);
}

// Every __global__ of the CUDA sources (csrc/cuda/*.cu) must have been launched above, so
// a new kernel cannot go untested.
// The name after each "__global__ void" of a source text.
std::set<std::string> kernels_declared(const std::string& text) {
  std::set<std::string> names;
  const auto is_name = [](char c) { return std::isalnum(static_cast<unsigned char>(c)) || c == '_'; };
  std::istringstream words(text);
  std::string word, previous, before;
  while (words >> word) {
    if (before == "__global__" && previous == "void") {
      std::size_t end = 0;
      while (end < word.size() && is_name(word[end])) ++end;
      if (end > 0) names.insert(word.substr(0, end));
    }
    before = previous;
    previous = word;
  }
  return names;
}

void every_kernel_ran(const std::string& sources) {
  std::set<std::string> declared;
  std::error_code error;
  std::filesystem::directory_iterator files(sources, error);
  if (error) {
    check(false, "reading the CUDA sources in " + sources + ": " + error.message());
    return;
  }
  for (const auto& entry : files) {
    if (entry.path().extension() != ".cu") continue;
    std::ifstream in(entry.path());
    std::stringstream text;
    text << in.rdbuf();
    for (const std::string& name : kernels_declared(text.str())) declared.insert(name);
  }
  check(!declared.empty(), "kernels found in " + sources);
  for (const std::string& name : declared)
    check(pyflat_emu::launched().count(name) == 1, "kernel " + name + " ran under the emulator");
}

}  // namespace

// Options: --sources DIR (the .cu files whose kernels must all run; the tree's by default),
// --stop-at-first-failure.
int main(int argc, char** argv) {
  std::string sources = PYFLAT_CUDA_SOURCES;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--stop-at-first-failure") {
      stop_at_first_failure = true;
    } else if (arg == "--sources" && i + 1 < argc) {
      sources = argv[++i];
    } else {
      std::fprintf(stderr, "usage: %s [--sources DIR] [--stop-at-first-failure]\n", argv[0]);
      return 2;
    }
  }
  std::setvbuf(stdout, nullptr, _IOLBF, 0);  // lines reach a pipe before a fault ends the run
  activations<float>("float");
  activations<double>("double");
  softmax<float>("float");
  softmax<double>("double");
  activations_past_int32();
  softmax_past_int32();
  every_kernel_ran(sources);
  std::printf("%d passed, %d failed\n", passed, failed);
  return failed == 0 ? 0 : 1;
}

// ATen glue helpers shared by every op file: argument checks whose messages name the op,
// the argument, what was expected and what came; activation and reduction names; and the
// launcher that runs a fused piece where its tensors live (CPU loops split over rows, or
// the CUDA kernel on the current stream with its launch checked).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <sstream>
#include <string>

#include "cpu/cpu_kernels.h"

#ifdef PYFLAT_WITH_CUDA
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/cuda_kernels.h"
#endif

namespace pyflat {
namespace glue {

struct ActivationName {
  const char* name;
  Activation kind;
};

constexpr ActivationName kActivationNames[] = {
#define PYFLAT_ACTIVATION_NAME(KIND, NAME, CURVED) {NAME, Activation::KIND},
    PYFLAT_FOR_EACH_ACTIVATION(PYFLAT_ACTIVATION_NAME)
#undef PYFLAT_ACTIVATION_NAME
};

// `argument` names where the name came from in the op's schema, for the error message.
inline Activation parse_activation(const char* op, const std::string& argument,
                                   const std::string& name) {
  std::ostringstream known;
  for (const auto& entry : kActivationNames) {
    if (name == entry.name) return entry.kind;
    known << (known.tellp() > 0 ? ", " : "") << entry.name;
  }
  TORCH_CHECK(false, op, ": ", argument, " must be one of ", known.str(), "; got '", name, "'");
}

inline double loss_scale(const char* op, const std::string& reduction, int64_t batch) {
  if (reduction == "mean") return 1.0 / static_cast<double>(batch);
  if (reduction == "sum") return 1.0;
  TORCH_CHECK(false, op, ": reduction must be 'mean' or 'sum'; got '", reduction, "'");
}

inline std::string shape_str(const at::Tensor& t) {
  std::ostringstream s;
  s << t.sizes();
  return s.str();
}

inline void check_like(const char* op, const std::string& name, const at::Tensor& t,
                       const at::Tensor& input) {
  TORCH_CHECK(t.scalar_type() == input.scalar_type(), op, ": ", name, " must have dtype ",
              input.scalar_type(), " like input; got ", t.scalar_type());
  TORCH_CHECK(t.device() == input.device(), op, ": ", name, " must be on ", input.device(),
              " like input; got ", t.device());
}

inline void check_shape(const char* op, const std::string& name, const at::Tensor& t,
                        at::IntArrayRef expected) {
  TORCH_CHECK(t.sizes() == expected, op, ": ", name, " must be ", expected, ", got ",
              shape_str(t));
}

// Split [0, rows) over threads; each chunk gets at least `min_work` elements of work,
// so that small problems run inline instead of paying a thread wake-up.
template <typename Fn>
void parallel_rows(int64_t rows, int64_t elements_per_row, const Fn& fn,
                   int64_t min_work = 32768) {
  const int64_t grain = std::max<int64_t>(1, min_work / std::max<int64_t>(1, elements_per_row));
  at::parallel_for(0, rows, grain, fn);
}

inline void check_device(const char* op, const at::Tensor& t) {
#ifdef PYFLAT_WITH_CUDA
  const bool ok = t.device().is_cpu() || t.device().is_cuda();
#else
  const bool ok = t.device().is_cpu();
#endif
  TORCH_CHECK(ok, op, ": this build of pyflat has kernels for CPU",
#ifdef PYFLAT_WITH_CUDA
              " and CUDA",
#endif
              " tensors; got tensors on ", t.device());
}

// Runs one fused piece where the tensors live: the CPU loop split over rows, or the CUDA
// kernel on the current stream with its launch checked.
#define PYFLAT_CPU_LOOP(rows, work_per_row, params, name) \
  ::pyflat::glue::parallel_rows(                           \
      rows, work_per_row, [&](int64_t b, int64_t e) { ::pyflat::cpu::name(params, b, e); })
#ifdef PYFLAT_WITH_CUDA
#define PYFLAT_LAUNCH(like, rows, work_per_row, params, name)                               \
  do {                                                                                      \
    if ((like).is_cuda()) {                                                                 \
      C10_CUDA_CHECK(::pyflat::cuda::name(                                                  \
          params, c10::cuda::getCurrentCUDAStream((like).device().index()).stream()));      \
    } else {                                                                                \
      PYFLAT_CPU_LOOP(rows, work_per_row, params, name);                                    \
    }                                                                                       \
  } while (0)
#else
#define PYFLAT_LAUNCH(like, rows, work_per_row, params, name) \
  PYFLAT_CPU_LOOP(rows, work_per_row, params, name)
#endif

template <typename T>
T* data(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

}  // namespace glue
}  // namespace pyflat

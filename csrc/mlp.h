// ATen glue of the MLP engine: the prepared forward and the GGN / exact Hessian products
// on k directions. Device-generic recurrences (GEMMs through ATen); the fused
// per-element pieces come from csrc/cpu (and csrc/cuda when built).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/List.h>

#include <string>
#include <tuple>
#include <vector>

namespace pyflat {

using ForwardResult =
    std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>,
               std::vector<at::Tensor>, std::vector<at::Tensor>>;

ForwardResult mlp_forward(const at::Tensor& input, const at::Tensor& target,
                          at::TensorList weights, const c10::List<std::optional<at::Tensor>>& biases,
                          const std::vector<std::string>& activations,
                          at::ArrayRef<double> activation_params, const std::string& reduction,
                          bool with_hessian_terms);

at::Tensor mlp_ggn_matmat(const at::Tensor& input, at::TensorList weights,
                          const c10::List<std::optional<at::Tensor>>& biases,
                          const std::vector<std::string>& activations, const at::Tensor& probs,
                          at::TensorList hidden, at::TensorList first_derivs,
                          const at::Tensor& directions, const std::string& reduction);

at::Tensor mlp_hessian_matmat(const at::Tensor& input, at::TensorList weights,
                              const c10::List<std::optional<at::Tensor>>& biases,
                              const std::vector<std::string>& activations,
                              const at::Tensor& probs, at::TensorList hidden,
                              at::TensorList first_derivs, at::TensorList deltas,
                              at::TensorList curvatures, const at::Tensor& directions,
                              const std::string& reduction);

}  // namespace pyflat

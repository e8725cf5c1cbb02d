// ATen glue of the per-layer pieces the graph engine (pyflat/engines/graph.py) calls for models
// that are not plain MLPs: convnets, residual networks. Convolutions, pooling and GEMMs
// run through ATen there; these ops are the fused per-element parts, on primal tensors
// (B, features...) and tangents or deltas for k directions (B, k, features...).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string>
#include <tuple>

namespace pyflat {

// (value, s', s'') of an activation at z; s'' is empty (0 elements) unless with_second.
std::tuple<at::Tensor, at::Tensor, at::Tensor> activation_forward(const at::Tensor& z,
                                                                  const std::string& activation,
                                                                  double param0, double param1,
                                                                  bool with_second);

// s' * tangent for k directions: first (B, f...), tangent (B, k, f...).
at::Tensor activation_tangent(const at::Tensor& first, const at::Tensor& tangent);

// In place on delta (B, k, f...): delta = s' * delta (+ curvature * tangent_in).
void activation_delta_(at::Tensor& delta, const std::optional<at::Tensor>& first,
                       const std::optional<at::Tensor>& curvature,
                       const std::optional<at::Tensor>& tangent_in);

// (loss, probs, dloss/dlogits) of the cross-entropy on logits (B, C) and labels (B,).
std::tuple<at::Tensor, at::Tensor, at::Tensor> softmax_cross_entropy(
    const at::Tensor& logits, const at::Tensor& target, const std::string& reduction);

// The same on checked, contiguous logits and labels, on the current device, with the
// reduction's scale; shared with the MLP engine's prepared forward.
std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_entropy_terms(const at::Tensor& logits,
                                                                   const at::Tensor& labels,
                                                                   double scale);

// The loss Hessian on (B, k, C) logit tangents, in place, for checked, contiguous
// probabilities and tangents on the current device; shared with the MLP engine.
void apply_softmax_hessian(const at::Tensor& probs, at::Tensor& tangent, double scale);

// The loss Hessian on k tangents of the logits: (B, k, C) -> (B, k, C).
at::Tensor softmax_hessian(const at::Tensor& probs, const at::Tensor& tangent,
                           const std::string& reduction);

// matrix^T, row-major: how blocks of directions move between the (P, k) layout of the
// operators and the (k, P) layout of the products.
at::Tensor transpose(const at::Tensor& matrix);

}  // namespace pyflat

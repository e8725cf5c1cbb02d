// The per-layer fused pieces of the graph engine (see layers.h): checks, then the same
// CPU loops and CUDA kernels the MLP engine runs, on tensors viewed as (rows, cols).
#include "layers.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/core/DeviceGuard.h>
#include <c10/util/irange.h>

#include "glue.h"

namespace pyflat {
namespace {

using glue::check_device;
using glue::check_like;
using glue::data;
using glue::shape_str;

void check_floating(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, op, ": ", name,
              " must be float32 or float64, got ", t.scalar_type());
  check_device(op, t);
}

// A primal tensor (B, f...) and a tangent block (B, k, f...) of the same sample shape.
void check_tangent(const char* op, const char* primal_name, const at::Tensor& primal,
                   const char* tangent_name, const at::Tensor& tangent) {
  check_like(op, tangent_name, tangent, primal);
  const bool ok = tangent.dim() == primal.dim() + 1 && tangent.size(0) == primal.size(0) &&
                  tangent.sizes().slice(2) == primal.sizes().slice(1);
  TORCH_CHECK(ok, op, ": ", tangent_name, " must be (batch, k, features...) matching ",
              primal_name, " ", shape_str(primal), " as (batch, features...); got ",
              shape_str(tangent));
}

int64_t features(const at::Tensor& primal) {
  return primal.size(0) == 0 ? 0 : primal.numel() / primal.size(0);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> activation_forward(const at::Tensor& z_arg,
                                                                  const std::string& activation,
                                                                  double param0, double param1,
                                                                  bool with_second) {
  const char* op = "activation_forward";
  check_floating(op, "z", z_arg);
  TORCH_CHECK(z_arg.dim() >= 1, op, ": z must be (batch, features...), got ", shape_str(z_arg));
  const Activation kind = glue::parse_activation(op, "activation", activation);
  const c10::OptionalDeviceGuard device_guard(z_arg.device());
  const at::Tensor z = z_arg.contiguous();
  at::Tensor value = at::empty_like(z);
  at::Tensor first = at::empty_like(z);
  at::Tensor second = with_second ? at::empty_like(z) : at::empty({0}, z.options());
  if (z.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "pyflat_activation_forward", [&] {
      ActivationForwardParams<scalar_t> p{
          data<scalar_t>(z), data<scalar_t>(value), data<scalar_t>(first),
          with_second ? data<scalar_t>(second) : nullptr, z.size(0), features(z), kind,
          static_cast<scalar_t>(param0), static_cast<scalar_t>(param1)};
      PYFLAT_LAUNCH(z, p.rows, p.cols, p, activation_forward);
    });
  }
  return {value, first, second};
}

at::Tensor activation_tangent(const at::Tensor& first_arg, const at::Tensor& tangent_arg) {
  const char* op = "activation_tangent";
  check_floating(op, "first", first_arg);
  TORCH_CHECK(first_arg.dim() >= 1, op, ": first must be (batch, features...), got ",
              shape_str(first_arg));
  check_tangent(op, "first", first_arg, "tangent", tangent_arg);
  const c10::OptionalDeviceGuard device_guard(first_arg.device());
  const at::Tensor first = first_arg.contiguous();
  const at::Tensor tangent = tangent_arg.contiguous();
  at::Tensor out = at::empty_like(tangent);
  if (out.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES(tangent.scalar_type(), "pyflat_activation_tangent", [&] {
      ActivationTangentParams<scalar_t> p{data<scalar_t>(first), data<scalar_t>(tangent),
                                          data<scalar_t>(out), first.size(0), tangent.size(1),
                                          features(first)};
      PYFLAT_LAUNCH(tangent, p.batch, p.k * p.cols, p, activation_tangent);
    });
  }
  return out;
}

void activation_delta_(at::Tensor& delta, const std::optional<at::Tensor>& first_arg,
                       const std::optional<at::Tensor>& curvature_arg,
                       const std::optional<at::Tensor>& tangent_in_arg) {
  const char* op = "activation_delta_";
  check_floating(op, "delta", delta);
  TORCH_CHECK(delta.dim() >= 2, op, ": delta must be (batch, k, features...), got ",
              shape_str(delta));
  TORCH_CHECK(delta.is_contiguous(), op, ": delta is updated in place and must be contiguous");
  const int64_t batch = delta.size(0), k = delta.size(1);
  const at::Tensor like = delta.select(1, 0);  // the sample shape, as (batch, features...)
  auto per_sample = [&](const char* name, const std::optional<at::Tensor>& t) {
    if (!t.has_value() || !t->defined()) return at::Tensor();
    check_like(op, name, *t, delta);
    TORCH_CHECK(t->sizes() == like.sizes(), op, ": ", name, " must be ", like.sizes(),
                " (delta without its k axis), got ", shape_str(*t));
    return t->contiguous();
  };
  const at::Tensor first = per_sample("first", first_arg);
  const at::Tensor curvature = per_sample("curvature", curvature_arg);
  at::Tensor tangent_in;
  if (curvature.defined()) {
    TORCH_CHECK(tangent_in_arg.has_value() && tangent_in_arg->defined(), op,
                ": tangent_in is required with curvature");
    check_like(op, "tangent_in", *tangent_in_arg, delta);
    check_tangent(op, "curvature", curvature, "tangent_in", *tangent_in_arg);
    // the kernel reads tangent_in at delta's offsets: a different k would read past it
    TORCH_CHECK(tangent_in_arg->sizes() == delta.sizes(), op, ": tangent_in must have delta's "
                "shape ", shape_str(delta), " (the same k), got ", shape_str(*tangent_in_arg));
    tangent_in = tangent_in_arg->contiguous();
  }
  if ((!first.defined() && !curvature.defined()) || delta.numel() == 0) return;
  const c10::OptionalDeviceGuard device_guard(delta.device());
  const int64_t cols = features(like);
  AT_DISPATCH_FLOATING_TYPES(delta.scalar_type(), "pyflat_activation_delta", [&] {
    ActivationDeltaParams<scalar_t> p{data<scalar_t>(first), data<scalar_t>(curvature),
                                      data<scalar_t>(tangent_in), data<scalar_t>(delta), batch,
                                      k, cols};
    PYFLAT_LAUNCH(delta, batch, k * cols, p, activation_delta);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> softmax_cross_entropy(
    const at::Tensor& logits_arg, const at::Tensor& target, const std::string& reduction) {
  const char* op = "softmax_cross_entropy";
  check_floating(op, "logits", logits_arg);
  TORCH_CHECK(logits_arg.dim() == 2 && logits_arg.size(0) > 0 && logits_arg.size(1) > 0, op,
              ": logits must be (batch, classes) with batch >= 1, got ", shape_str(logits_arg));
  const int64_t B = logits_arg.size(0), C = logits_arg.size(1);
  const double scale = glue::loss_scale(op, reduction, B);
  TORCH_CHECK(target.scalar_type() == at::kLong, op,
              ": target must hold class indices as int64, got ", target.scalar_type());
  glue::check_shape(op, "target", target, {B});
  TORCH_CHECK(target.device() == logits_arg.device(), op, ": target must be on ",
              logits_arg.device(), " like logits; got ", target.device());
  const at::Tensor labels = target.contiguous();
  const auto [low, high] = at::aminmax(labels);
  const int64_t lo = low.item<int64_t>(), hi = high.item<int64_t>();
  TORCH_CHECK(lo >= 0 && hi < C, op, ": target must hold class indices in [0, ", C,
              "); got values from ", lo, " to ", hi);
  const c10::OptionalDeviceGuard device_guard(logits_arg.device());
  return cross_entropy_terms(logits_arg.contiguous(), labels, scale);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_entropy_terms(const at::Tensor& logits,
                                                                   const at::Tensor& labels,
                                                                   double scale) {
  const int64_t B = logits.size(0), C = logits.size(1);
  at::Tensor probs = at::empty_like(logits);
  at::Tensor grad = at::empty_like(logits);
  at::Tensor row_loss = at::empty({B}, logits.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "pyflat_softmax_cross_entropy", [&] {
    SoftmaxCrossEntropyParams<scalar_t> p{data<scalar_t>(logits), labels.data_ptr<int64_t>(),
                                          data<scalar_t>(probs), data<scalar_t>(grad),
                                          row_loss.data_ptr<double>(), B, C,
                                          static_cast<scalar_t>(scale)};
    PYFLAT_LAUNCH(logits, B, C, p, softmax_cross_entropy);
  });
  // Sequential float64 sum: the same bits whatever the thread count.
  double total = 0.0;
  const at::Tensor row_host = row_loss.cpu();
  const double* row = row_host.data_ptr<double>();
  for (const auto n : c10::irange(B)) total += row[n];
  return {at::scalar_tensor(total * scale, logits.options()), probs, grad};
}

at::Tensor softmax_hessian(const at::Tensor& probs_arg, const at::Tensor& tangent,
                           const std::string& reduction) {
  const char* op = "softmax_hessian";
  check_floating(op, "probs", probs_arg);
  TORCH_CHECK(probs_arg.dim() == 2 && probs_arg.size(0) > 0, op,
              ": probs must be (batch, classes) with batch >= 1, got ", shape_str(probs_arg));
  check_tangent(op, "probs", probs_arg, "tangent", tangent);
  const double scale = glue::loss_scale(op, reduction, probs_arg.size(0));
  const c10::OptionalDeviceGuard device_guard(probs_arg.device());
  const at::Tensor probs = probs_arg.contiguous();
  at::Tensor out = tangent.contiguous().clone();
  if (out.numel() > 0) apply_softmax_hessian(probs, out, scale);
  return out;
}

void apply_softmax_hessian(const at::Tensor& probs, at::Tensor& tangent, double scale) {
  const int64_t B = probs.size(0), C = probs.size(1), k = tangent.numel() / (B * C);
  AT_DISPATCH_FLOATING_TYPES(tangent.scalar_type(), "pyflat_softmax_hessian", [&] {
    SoftmaxHessianParams<scalar_t> p{data<scalar_t>(probs), data<scalar_t>(tangent), B, k, C,
                                     static_cast<scalar_t>(scale)};
    // a row costs about eight elementwise passes (the argmax, the dot product, the
    // update): weighted so, a 1024 x 10 block splits over threads
    PYFLAT_LAUNCH(tangent, B, 8 * k * C, p, softmax_hessian);
  });
}

at::Tensor transpose(const at::Tensor& matrix) {
  const char* op = "transpose";
  check_floating(op, "matrix", matrix);
  TORCH_CHECK(matrix.dim() == 2, op, ": matrix must be 2-D, got ", shape_str(matrix));
  // the transpose of a row-major matrix is one already: a plain copy; other devices: ATen
  if (!matrix.is_cpu() || matrix.t().is_contiguous()) {
    return matrix.t().clone(at::MemoryFormat::Contiguous);
  }
  const at::Tensor in = matrix.contiguous();
  at::Tensor out = at::empty({in.size(1), in.size(0)}, in.options());
  const int64_t tiles = ((in.size(0) + kTransposeTile - 1) / kTransposeTile) *
                        ((in.size(1) + kTransposeTile - 1) / kTransposeTile);
  AT_DISPATCH_FLOATING_TYPES(in.scalar_type(), "pyflat_transpose", [&] {
    TransposeParams<scalar_t> p{data<scalar_t>(in), data<scalar_t>(out), in.size(0), in.size(1)};
    glue::parallel_rows(tiles, kTransposeTile * kTransposeTile,
                        [&](int64_t lo, int64_t hi) { cpu::transpose(p, lo, hi); });
  });
  return out;
}

}  // namespace pyflat

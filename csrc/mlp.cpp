// The MLP engine's recurrences: Pearlmutter's R-forward for the tangents, the backward
// for the deltas, and for the exact Hessian the second-order terms of each layer.
//
// Layers l = 0..L-1: z_l = a_{l-1} W_l^T + b_l, a_l = s_l(z_l), logits = a_{L-1}.
// Tangents for k directions live as (B, k, d): every term below is one GEMM over all k.
// This file validates every input (errors name the op, the argument, what was expected
// and what came), runs the GEMMs through ATen and hands the per-element work to the
// fused loops in csrc/cpu.
#include "mlp.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/irange.h>

#include <sstream>

#include <c10/core/DeviceGuard.h>

#include "glue.h"
#include "layers.h"

namespace pyflat {
namespace {

using glue::check_device;
using glue::check_like;
using glue::check_shape;
using glue::data;
using glue::loss_scale;
using glue::parallel_rows;
using glue::parse_activation;
using glue::shape_str;

struct Layer {
  at::Tensor weight;  // (out, in)
  at::Tensor bias;    // (out,), undefined without bias
  Activation activation = Activation::Identity;
  int64_t in = 0;
  int64_t out = 0;
  int64_t weight_offset = 0;  // where W_l starts in a flat direction
  int64_t bias_offset = -1;   // where b_l starts, -1 without bias
  int64_t first_index = -1;   // index into first_derivs, -1 for identity
  int64_t curvature_index = -1;  // index into curvatures, -1 without s''
};

struct Network {
  std::vector<Layer> layers;
  int64_t batch = 0;
  int64_t classes = 0;
  int64_t num_params = 0;
  int64_t num_first = 0;
  int64_t num_curvature = 0;
};

std::string indexed(const char* list, size_t i) {
  return std::string(list) + "[" + std::to_string(i) + "]";
}

Network check_network(const char* op, const at::Tensor& input, at::TensorList weights,
                      const c10::List<std::optional<at::Tensor>>& biases,
                      const std::vector<std::string>& activations) {
  TORCH_CHECK(input.dim() == 2, op, ": input must be 2-D (batch, features), got ",
              shape_str(input));
  TORCH_CHECK(input.scalar_type() == at::kFloat || input.scalar_type() == at::kDouble, op,
              ": input must be float32 or float64, got ", input.scalar_type());
  TORCH_CHECK(input.size(0) > 0, op, ": input must hold at least one sample, got ",
              shape_str(input));
  TORCH_CHECK(!weights.empty(), op, ": weights must hold at least one layer");
  TORCH_CHECK(biases.size() == weights.size(), op, ": biases must have one entry per layer (",
              weights.size(), "), got ", biases.size());
  TORCH_CHECK(activations.size() == weights.size(), op,
              ": activations must have one entry per layer (", weights.size(), "), got ",
              activations.size());

  Network net;
  net.batch = input.size(0);
  int64_t width = input.size(1);
  for (const auto l : c10::irange(weights.size())) {
    Layer layer;
    const at::Tensor& w = weights[l];
    const std::string wname = indexed("weights", l);
    TORCH_CHECK(w.dim() == 2 && w.size(1) == width, op, ": ", wname, " must be [out, ", width,
                "], got ", shape_str(w));
    check_like(op, wname, w, input);
    layer.in = width;
    layer.out = w.size(0);
    TORCH_CHECK(layer.out > 0, op, ": ", wname, " must have at least one output, got ",
                shape_str(w));
    layer.weight = w.contiguous();
    layer.weight_offset = net.num_params;
    net.num_params += layer.out * layer.in;
    const std::optional<at::Tensor> b = biases.get(l);
    if (b.has_value() && b->defined()) {
      const std::string bname = indexed("biases", l);
      check_shape(op, bname, *b, {layer.out});
      check_like(op, bname, *b, input);
      layer.bias = b->contiguous();
      layer.bias_offset = net.num_params;
      net.num_params += layer.out;
    }
    layer.activation = parse_activation(op, indexed("activations", l), activations[l]);
    if (!activation_is_identity(layer.activation)) layer.first_index = net.num_first++;
    if (activation_has_curvature(layer.activation)) layer.curvature_index = net.num_curvature++;
    width = layer.out;
    net.layers.push_back(std::move(layer));
  }
  net.classes = width;
  return net;
}

// Per-sample tensors the products reuse: one (batch, width) tensor per entry.
void check_prepared(const char* op, const char* list_name, at::TensorList list,
                    const std::vector<int64_t>& widths, const at::Tensor& input) {
  TORCH_CHECK(list.size() == widths.size(), op, ": ", list_name, " must hold ", widths.size(),
              " tensors for these layers, got ", list.size());
  for (const auto i : c10::irange(list.size())) {
    const std::string name = indexed(list_name, i);
    check_shape(op, name, list[i], {input.size(0), widths[i]});
    check_like(op, name, list[i], input);
  }
}

// Multiply-adds per thread chunk of a small GEMM (about 10 us of work): below this, waking
// a second thread costs more than it saves.
constexpr int64_t kSmallGemmChunk = 1 << 17;

bool row_major(const at::Tensor& t) { return t.is_contiguous(); }
bool col_major(const at::Tensor& t) { return t.t().is_contiguous(); }

enum class Into { Fresh, Overwrite, Add };

// a @ b into a new tensor (Fresh), over c (Overwrite) or added to c (Add); a and b are 2-D,
// each stored row-major or as the transpose of a row-major matrix, c row-major. Shapes
// with a dimension of at most kSmallGemmMax, in the layouts the small-GEMM loops read,
// take those loops (csrc/cpu/small_gemm_kernel.cpp); everything else goes to BLAS
// through ATen.
at::Tensor gemm(const at::Tensor& a, const at::Tensor& b, Into into = Into::Fresh,
                at::Tensor c = at::Tensor()) {
  const int64_t m = a.size(0), k = a.size(1), n = b.size(1);
  enum class Path { Blas, SmallK, SmallN, SmallM } path = Path::Blas;
  static const bool small_supported = cpu::small_gemm_supported();
  if (small_supported && a.device().is_cpu() && (into == Into::Fresh || row_major(c))) {
    if (k <= kSmallGemmMax && row_major(a) && row_major(b)) path = Path::SmallK;
    else if (n <= kSmallGemmMax && row_major(a)) path = Path::SmallN;
    else if (m <= kSmallGemmMax && col_major(a) && row_major(b)) path = Path::SmallM;
  }
  if (path == Path::Blas) {
    if (into == Into::Fresh) return at::mm(a, b);
    if (into == Into::Add) return c.addmm_(a, b);
    return at::mm_out(c, a, b);
  }
  if (into == Into::Fresh) c = at::empty({m, n}, a.options());
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "pyflat_small_gemm", [&] {
    // small_gemm_m reads a^T row-major, small_gemm_n b^T row-major (for the products'
    // b = V^T or W^T that is the tensor itself: no copy)
    const at::Tensor a_rows = path == Path::SmallM ? a.t() : a;
    const at::Tensor b_rows = path == Path::SmallN ? b.t().contiguous() : b;
    SmallGemmParams<scalar_t> p{a_rows.data_ptr<scalar_t>(), b_rows.data_ptr<scalar_t>(),
                                c.data_ptr<scalar_t>(), m, n, k, into == Into::Add};
    if (path == Path::SmallK) {
      parallel_rows(m, n * k, [&](int64_t lo, int64_t hi) { cpu::small_gemm_k(p, lo, hi); },
                    kSmallGemmChunk);
    } else if (path == Path::SmallN) {
      parallel_rows(m, n * k, [&](int64_t lo, int64_t hi) { cpu::small_gemm_n(p, lo, hi); },
                    kSmallGemmChunk);
    } else {
      // split whole tiles of two float vectors, so that no thread is left a scalar remainder
      constexpr int64_t kTile = 16;
      const int64_t tiles = (n + kTile - 1) / kTile;
      parallel_rows(tiles, kTile * m * k, [&](int64_t lo, int64_t hi) {
        cpu::small_gemm_m(p, lo * kTile, std::min(hi * kTile, n));
      }, kSmallGemmChunk);
    }
  });
  return c;
}

// s applied in place on z; returns (s', s'') buffers as asked.
void activation_forward(const Layer& layer, double param0, double param1, at::Tensor& z,
                        at::Tensor& first, at::Tensor& second) {
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "pyflat_activation_forward", [&] {
    ActivationForwardParams<scalar_t> p{data<scalar_t>(z), data<scalar_t>(z),
                                        data<scalar_t>(first), data<scalar_t>(second),
                                        z.size(0), z.size(1), layer.activation,
                                        static_cast<scalar_t>(param0),
                                        static_cast<scalar_t>(param1)};
    PYFLAT_LAUNCH(z, p.rows, p.cols, p, activation_forward);
  });
}

// (B, k, d) tangents: out = s' * tangent.
void activation_tangent(const at::Tensor& first, const at::Tensor& tangent, at::Tensor& out,
                        int64_t k) {
  AT_DISPATCH_FLOATING_TYPES(tangent.scalar_type(), "pyflat_activation_tangent", [&] {
    ActivationTangentParams<scalar_t> p{data<scalar_t>(first), data<scalar_t>(tangent),
                                        data<scalar_t>(out), first.size(0), k, first.size(1)};
    PYFLAT_LAUNCH(tangent, p.batch, p.k * p.cols, p, activation_tangent);
  });
}

// (B, k, d) deltas in place: delta = s' * delta + curvature * tangent_in.
void activation_delta(const at::Tensor& first, const at::Tensor& curvature,
                      const at::Tensor& tangent_in, at::Tensor& delta, int64_t batch, int64_t k,
                      int64_t cols) {
  AT_DISPATCH_FLOATING_TYPES(delta.scalar_type(), "pyflat_activation_delta", [&] {
    ActivationDeltaParams<scalar_t> p{data<scalar_t>(first), data<scalar_t>(curvature),
                                      data<scalar_t>(tangent_in), data<scalar_t>(delta),
                                      batch, k, cols};
    PYFLAT_LAUNCH(delta, batch, k * cols, p, activation_delta);
  });
}

// Curvature products shared by the GGN and the exact Hessian (exact = true).
at::Tensor curvature_matmat(const char* op, bool exact, const at::Tensor& input_arg,
                            at::TensorList weights,
                            const c10::List<std::optional<at::Tensor>>& biases,
                            const std::vector<std::string>& activations,
                            const at::Tensor& probs_arg, at::TensorList hidden,
                            at::TensorList first_derivs, at::TensorList deltas,
                            at::TensorList curvatures, const at::Tensor& directions,
                            const std::string& reduction) {
  const Network net = check_network(op, input_arg, weights, biases, activations);
  const int64_t B = net.batch;
  const int64_t L = static_cast<int64_t>(net.layers.size());
  const double scale = loss_scale(op, reduction, B);
  check_device(op, input_arg);
  const c10::OptionalDeviceGuard device_guard(input_arg.device());

  check_shape(op, "probs", probs_arg, {B, net.classes});
  check_like(op, "probs", probs_arg, input_arg);
  std::vector<int64_t> hidden_widths, first_widths, delta_widths, curvature_widths;
  for (const auto l : c10::irange(L)) {
    const Layer& layer = net.layers[l];
    if (l + 1 < L) hidden_widths.push_back(layer.out);
    if (layer.first_index >= 0) first_widths.push_back(layer.out);
    if (l > 0) delta_widths.push_back(layer.out);
    if (layer.curvature_index >= 0) curvature_widths.push_back(layer.out);
  }
  check_prepared(op, "hidden", hidden, hidden_widths, input_arg);
  check_prepared(op, "first_derivs", first_derivs, first_widths, input_arg);
  if (exact) {
    check_prepared(op, "deltas", deltas, delta_widths, input_arg);
    check_prepared(op, "curvatures", curvatures, curvature_widths, input_arg);
  }
  TORCH_CHECK(directions.dim() == 2 && directions.size(1) == net.num_params, op,
              ": directions must be [k, ", net.num_params,
              "] (one row per direction, parameters flattened layer by layer as weight then "
              "bias), got ",
              shape_str(directions));
  TORCH_CHECK(directions.size(0) > 0, op, ": directions must hold at least one direction");
  check_like(op, "directions", directions, input_arg);

  const int64_t k = directions.size(0);
  const at::Tensor input = input_arg.contiguous();
  const at::Tensor probs = probs_arg.contiguous();
  auto prepared = [](at::TensorList list, int64_t i) {
    return i >= 0 ? list[i].contiguous() : at::Tensor();
  };
  auto layer_input = [&](int64_t l) { return l == 0 ? input : hidden[l - 1].contiguous(); };

  // R-forward: Rz_l = Ra_{l-1} W_l^T + a_{l-1} V_l^T + c_l, Ra_l = s'_l * Rz_l.
  std::vector<at::Tensor> dir_weights(L);  // V_l as (k, out, in)
  std::vector<at::Tensor> tangent_in(L);   // Ra_{l-1} as (B, k, in), kept for exact products
  std::vector<at::Tensor> pre_tangent(L);  // Rz_l, kept where the curvature term needs it
  at::Tensor tangent;                      // Ra_{l-1} of the current layer
  for (const auto l : c10::irange(L)) {
    const Layer& layer = net.layers[l];
    dir_weights[l] = directions.narrow(1, layer.weight_offset, layer.out * layer.in)
                         .reshape({k, layer.out, layer.in})
                         .contiguous();
    at::Tensor rz = gemm(layer_input(l), dir_weights[l].view({k * layer.out, layer.in}).t());
    if (l > 0) {
      gemm(tangent.view({B * k, layer.in}), layer.weight.t(), Into::Add,
           rz.view({B * k, layer.out}));
      if (exact) tangent_in[l] = tangent;
    }
    if (layer.bias_offset >= 0) {
      rz.view({B, k, layer.out}).add_(directions.narrow(1, layer.bias_offset, layer.out));
    }
    if (layer.first_index < 0) {
      tangent = rz;
    } else if (exact && layer.curvature_index >= 0) {
      pre_tangent[l] = rz;
      tangent = at::empty_like(rz);
      activation_tangent(first_derivs[layer.first_index].contiguous(), rz, tangent, k);
    } else {
      activation_tangent(first_derivs[layer.first_index].contiguous(), rz, rz, k);
      tangent = rz;
    }
  }

  // Loss Hessian on the logits' tangents, in place: (B, k, C).
  apply_softmax_hessian(probs, tangent, scale);

  // Backward: Re_l = s'_l * Rg_l (+ s''_l g_l * Rz_l), grad V_l = Re_l^T a_{l-1}
  // (+ e_l^T Ra_{l-1}), Rg_{l-1} = Re_l W_l (+ e_l V_l).
  at::Tensor out = at::empty({k, net.num_params}, input.options());
  at::Tensor delta = tangent;
  for (int64_t l = L - 1; l >= 0; --l) {
    const Layer& layer = net.layers[l];
    const at::Tensor first = prepared(first_derivs, layer.first_index);
    const at::Tensor curvature = exact ? prepared(curvatures, layer.curvature_index) : at::Tensor();
    if (first.defined() || curvature.defined()) {
      activation_delta(first, curvature, pre_tangent[l], delta, B, k, layer.out);
    }
    const at::Tensor delta_flat = delta.view({B, k * layer.out});
    const at::Tensor e = (exact && l > 0) ? deltas[l - 1].contiguous() : at::Tensor();
    at::Tensor out_w = out.narrow(1, layer.weight_offset, layer.out * layer.in);
    if (k == 1) {
      // one direction: the weight block of `out` is a contiguous (out, in) matrix
      at::Tensor grad_w = out_w.view({layer.out, layer.in});
      gemm(delta_flat.t(), layer_input(l), Into::Overwrite, grad_w);
      if (e.defined()) gemm(e.t(), tangent_in[l].view({B, layer.in}), Into::Add, grad_w);
    } else {
      at::Tensor grad_w = gemm(delta_flat.t(), layer_input(l));  // (k*out, in)
      if (e.defined()) {
        grad_w.view({k, layer.out, layer.in})
            .add_(gemm(e.t(), tangent_in[l].view({B, k * layer.in}))
                      .view({layer.out, k, layer.in})
                      .permute({1, 0, 2}));
      }
      out_w.copy_(grad_w.view({k, layer.out * layer.in}));
    }
    if (layer.bias_offset >= 0) {
      at::Tensor out_b = out.narrow(1, layer.bias_offset, layer.out);
      at::sum_out(out_b, delta.view({B, k, layer.out}), {0});
    }
    if (l > 0) {
      at::Tensor next = gemm(delta.view({B * k, layer.out}), layer.weight);  // (B*k, in)
      if (e.defined()) {
        gemm(e, dir_weights[l].permute({1, 0, 2}).reshape({layer.out, k * layer.in}), Into::Add,
             next.view({B, k * layer.in}));
      }
      delta = next;
    }
  }
  return out;
}

}  // namespace

ForwardResult mlp_forward(const at::Tensor& input_arg, const at::Tensor& target,
                          at::TensorList weights, const c10::List<std::optional<at::Tensor>>& biases,
                          const std::vector<std::string>& activations,
                          at::ArrayRef<double> activation_params, const std::string& reduction,
                          bool with_hessian_terms) {
  const char* op = "mlp_forward";
  const Network net = check_network(op, input_arg, weights, biases, activations);
  const int64_t B = net.batch;
  const int64_t L = static_cast<int64_t>(net.layers.size());
  const double scale = loss_scale(op, reduction, B);
  check_device(op, input_arg);
  const c10::OptionalDeviceGuard device_guard(input_arg.device());
  TORCH_CHECK(activation_params.size() == 2 * weights.size(), op,
              ": activation_params must hold two numbers per layer (", 2 * weights.size(),
              "), got ", activation_params.size());
  TORCH_CHECK(target.scalar_type() == at::kLong, op,
              ": target must hold class indices as int64, got ", target.scalar_type());
  check_shape(op, "target", target, {B});
  TORCH_CHECK(target.device() == input_arg.device(), op, ": target must be on ",
              input_arg.device(), " like input; got ", target.device());
  const at::Tensor labels = target.contiguous();
  if (labels.is_cpu()) {
    const int64_t* y = labels.data_ptr<int64_t>();
    for (const auto n : c10::irange(B)) {
      TORCH_CHECK(y[n] >= 0 && y[n] < net.classes, op, ": target must hold class indices in [0, ",
                  net.classes, "); got target[", n, "] = ", y[n]);
    }
  } else {  // one reduction and one synchronization, before any kernel reads the labels
    const auto [low, high] = at::aminmax(labels);
    const int64_t lo = low.item<int64_t>(), hi = high.item<int64_t>();
    TORCH_CHECK(lo >= 0 && hi < net.classes, op, ": target must hold class indices in [0, ",
                net.classes, "); got values from ", lo, " to ", hi);
  }

  std::vector<at::Tensor> hidden, firsts, seconds(L), deltas, curvatures;
  at::Tensor a = input_arg.contiguous();
  for (const auto l : c10::irange(L)) {
    const Layer& layer = net.layers[l];
    at::Tensor z = layer.bias.defined() ? at::addmm(layer.bias, a, layer.weight.t())
                                        : at::mm(a, layer.weight.t());
    if (layer.first_index >= 0) {
      at::Tensor first = at::empty_like(z);
      if (with_hessian_terms && layer.curvature_index >= 0) seconds[l] = at::empty_like(z);
      activation_forward(layer, activation_params[2 * l], activation_params[2 * l + 1], z, first,
                         seconds[l]);
      firsts.push_back(first);
    }
    if (l + 1 < L) hidden.push_back(z);
    a = z;
  }

  at::Tensor loss, probs, grad;
  std::tie(loss, probs, grad) = cross_entropy_terms(a, labels, scale);

  if (with_hessian_terms) {
    // Ordinary backprop on the prepared batch: e_l = s'_l * g_l and s''_l * g_l, with
    // g_{l-1} = e_l W_l; the products need e_l for l >= 1 and s'' g where s'' exists.
    at::Tensor g = grad;
    std::vector<at::Tensor> layer_deltas(L);
    for (int64_t l = L - 1; l >= 0; --l) {
      const Layer& layer = net.layers[l];
      if (layer.first_index >= 0) {
        AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "pyflat_activation_backward", [&] {
          ActivationBackwardParams<scalar_t> p{data<scalar_t>(g), data<scalar_t>(firsts[layer.first_index]),
                                               data<scalar_t>(seconds[l]), data<scalar_t>(g), B,
                                               layer.out};
          PYFLAT_LAUNCH(g, B, layer.out, p, activation_backward);
        });
      }
      layer_deltas[l] = g;
      if (l > 0) g = gemm(g, layer.weight);
    }
    for (const auto l : c10::irange(1, L)) deltas.push_back(layer_deltas[l]);
    for (const auto l : c10::irange(L)) {
      if (net.layers[l].curvature_index >= 0) curvatures.push_back(seconds[l]);
    }
  }
  return {loss, probs, hidden, firsts, deltas, curvatures};
}

at::Tensor mlp_ggn_matmat(const at::Tensor& input, at::TensorList weights,
                          const c10::List<std::optional<at::Tensor>>& biases,
                          const std::vector<std::string>& activations, const at::Tensor& probs,
                          at::TensorList hidden, at::TensorList first_derivs,
                          const at::Tensor& directions, const std::string& reduction) {
  return curvature_matmat("mlp_ggn_matmat", /*exact=*/false, input, weights, biases, activations,
                          probs, hidden, first_derivs, {}, {}, directions, reduction);
}

at::Tensor mlp_hessian_matmat(const at::Tensor& input, at::TensorList weights,
                              const c10::List<std::optional<at::Tensor>>& biases,
                              const std::vector<std::string>& activations,
                              const at::Tensor& probs, at::TensorList hidden,
                              at::TensorList first_derivs, at::TensorList deltas,
                              at::TensorList curvatures, const at::Tensor& directions,
                              const std::string& reduction) {
  return curvature_matmat("mlp_hessian_matmat", /*exact=*/true, input, weights, biases,
                          activations, probs, hidden, first_derivs, deltas, curvatures,
                          directions, reduction);
}

}  // namespace pyflat

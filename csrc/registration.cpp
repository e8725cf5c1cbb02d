// Every schema of the pyflat library, and the kernels each device provides.
// Ops are reached through torch.ops.pyflat.*, and pyflat/ops.py holds the typed wrappers
// and the fake (meta) implementations. The Python module holds one attribute,
// `activations`: ((name, has a second derivative), ...) from the C++ list, which
// tests/test_activations.py compares with the Python registry.
#include <Python.h>
#include <torch/library.h>

#include <iterator>

#include "glue.h"
#include "layers.h"
#include "mlp.h"

extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef definition = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr,
                                   nullptr, nullptr, nullptr, nullptr};
  PyObject* module = PyModule_Create(&definition);
  if (module == nullptr) return nullptr;
  PyObject* activations = PyTuple_New(std::size(pyflat::glue::kActivationNames));
  if (activations == nullptr) {
    Py_DECREF(module);
    return nullptr;
  }
  Py_ssize_t i = 0;
  for (const auto& entry : pyflat::glue::kActivationNames) {
    PyObject* pair = Py_BuildValue("(sO)", entry.name,
                                   pyflat::activation_has_curvature(entry.kind) ? Py_True
                                                                                 : Py_False);
    if (pair == nullptr) {
      Py_DECREF(activations);
      Py_DECREF(module);
      return nullptr;
    }
    PyTuple_SET_ITEM(activations, i++, pair);
  }
  if (PyModule_AddObject(module, "activations", activations) < 0) {
    Py_DECREF(activations);
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}

TORCH_LIBRARY(pyflat, m) {
  // Forward pass of a cross-entropy MLP, prepared once and reused by every product:
  // (loss, probs, hidden activations a_1..a_{L-1}, s' of each non-identity layer,
  //  deltas e_2..e_L and s'' * g of each curved layer when with_hessian_terms).
  m.def(
      "mlp_forward(Tensor input, Tensor target, Tensor[] weights, Tensor?[] biases, "
      "str[] activations, float[] activation_params, str reduction, bool with_hessian_terms) "
      "-> (Tensor, Tensor, Tensor[], Tensor[], Tensor[], Tensor[])");
  // GGN products J^T H J on k directions: (k, P) -> (k, P).
  m.def(
      "mlp_ggn_matmat(Tensor input, Tensor[] weights, Tensor?[] biases, str[] activations, "
      "Tensor probs, Tensor[] hidden, Tensor[] first_derivs, Tensor directions, str reduction) "
      "-> Tensor");
  // Exact Hessian products on k directions: (k, P) -> (k, P).
  m.def(
      "mlp_hessian_matmat(Tensor input, Tensor[] weights, Tensor?[] biases, "
      "str[] activations, Tensor probs, Tensor[] hidden, Tensor[] first_derivs, "
      "Tensor[] deltas, Tensor[] curvatures, Tensor directions, str reduction) -> Tensor");

  // Per-layer pieces of the graph engine (convnets, residual networks): primal tensors
  // are (batch, features...), tangents and deltas of k directions (batch, k, features...).
  // (value, s', s'') of an activation; s'' has 0 elements unless with_second.
  m.def(
      "activation_forward(Tensor z, str activation, float param0, float param1, "
      "bool with_second) -> (Tensor, Tensor, Tensor)");
  // s' * tangent.
  m.def("activation_tangent(Tensor first, Tensor tangent) -> Tensor");
  // delta <- s' * delta (+ curvature * tangent_in), in place.
  m.def(
      "activation_delta_(Tensor(a!) delta, Tensor? first, Tensor? curvature, "
      "Tensor? tangent_in) -> ()");
  // (loss, probs, dloss/dlogits) of the cross-entropy.
  m.def("softmax_cross_entropy(Tensor logits, Tensor target, str reduction) -> "
        "(Tensor, Tensor, Tensor)");
  // The loss Hessian on k tangents of the logits, (batch, k, classes).
  m.def("softmax_hessian(Tensor probs, Tensor tangent, str reduction) -> Tensor");

  // matrix^T as a new row-major tensor (blocks of directions between layouts).
  m.def("transpose(Tensor matrix) -> Tensor");
}

#define PYFLAT_IMPL_ALL(m)                                              \
  m.impl("mlp_forward", &pyflat::mlp_forward);                          \
  m.impl("mlp_ggn_matmat", &pyflat::mlp_ggn_matmat);                    \
  m.impl("mlp_hessian_matmat", &pyflat::mlp_hessian_matmat);            \
  m.impl("activation_forward", &pyflat::activation_forward);            \
  m.impl("activation_tangent", &pyflat::activation_tangent);            \
  m.impl("activation_delta_", &pyflat::activation_delta_);              \
  m.impl("softmax_cross_entropy", &pyflat::softmax_cross_entropy);      \
  m.impl("softmax_hessian", &pyflat::softmax_hessian);                  \
  m.impl("transpose", &pyflat::transpose)

TORCH_LIBRARY_IMPL(pyflat, CPU, m) { PYFLAT_IMPL_ALL(m); }

#ifdef PYFLAT_WITH_CUDA
// The same glue: GEMMs and convolutions through ATen (cuBLAS, cuDNN), the fused pieces
// from csrc/cuda.
TORCH_LIBRARY_IMPL(pyflat, CUDA, m) { PYFLAT_IMPL_ALL(m); }
#endif

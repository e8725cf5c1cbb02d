// Every schema of the pyflat library, and the kernels each device provides.
// The Python module is empty: ops are reached through torch.ops.pyflat.*, and
// pyflat/ops.py holds the typed wrappers and the fake (meta) implementations.
#include <Python.h>
#include <torch/library.h>

#include "mlp.h"

extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr,
                               nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module);
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
}

TORCH_LIBRARY_IMPL(pyflat, CPU, m) {
  m.impl("mlp_forward", &pyflat::mlp_forward);
  m.impl("mlp_ggn_matmat", &pyflat::mlp_ggn_matmat);
  m.impl("mlp_hessian_matmat", &pyflat::mlp_hessian_matmat);
}

#ifdef PYFLAT_WITH_CUDA
// The same glue: GEMMs through ATen (cuBLAS), the fused pieces from csrc/cuda.
TORCH_LIBRARY_IMPL(pyflat, CUDA, m) {
  m.impl("mlp_forward", &pyflat::mlp_forward);
  m.impl("mlp_ggn_matmat", &pyflat::mlp_ggn_matmat);
  m.impl("mlp_hessian_matmat", &pyflat::mlp_hessian_matmat);
}
#endif

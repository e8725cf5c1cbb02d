"""Every refusal names the argument, what was expected and what came."""
import re
import warnings

import pytest
import torch
from torch import nn

import pyflat
from pyflat import ops

from helpers import make_batch, make_mlp, num_params


def mlp():
    return make_mlp([4, 6, 3], "tanh")


def data():
    return make_batch(8, 4, 3)


# ---- models -----------------------------------------------------------------------------

class Custom(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x).softmax(-1)


@pytest.mark.parametrize("model, message", [
    (nn.Sequential(nn.Linear(4, 6), nn.Conv1d(1, 1, 1), nn.Linear(6, 3)),
     r"Conv1d at '1' gets input of shape \(8, 6\); it takes \(batch, 1, ...\)"),
    (nn.Sequential(nn.Linear(4, 6), nn.Sequential(nn.Tanh(), nn.LayerNorm(6)), nn.Linear(6, 3)),
     "unsupported module LayerNorm at '1.1': the fused engine supports Linear, Conv1d, Conv2d"),
    (Custom(), r"unsupported call_method 'softmax' \(node 'softmax'\)"),
    (nn.Sequential(nn.Flatten(start_dim=0), nn.Linear(32, 3)),
     r"Flatten at '0' does not keep the batch axis \(output \(32,\) for a batch of 8\)"),
    (nn.Sequential(nn.ReLU(), nn.Identity()), "model Sequential has no parameters"),
    (nn.Sequential(nn.Conv2d(1, 2, 2, padding_mode="circular"), nn.Flatten()),
     "unsupported module Conv2d at '0': padding_mode 'circular'"),
    (nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6, track_running_stats=False).eval(),
                   nn.Linear(6, 3)),
     "BatchNorm1d at '1': track_running_stats=False"),
])
def test_unsupported_models_are_named(model, message):
    with pytest.raises(TypeError, match=message):
        pyflat.GGN(model.double(), data(), backend="fused")


@pytest.mark.parametrize("module", [nn.Dropout(0.5), nn.BatchNorm1d(6)])
def test_training_mode_is_refused_before_any_backend(module):
    model = nn.Sequential(nn.Linear(4, 6), module, nn.Linear(6, 3)).double()
    for backend in ("auto", "fused", "reference"):
        with pytest.raises(ValueError, match=rf"{type(module).__name__} at '1' is in training "
                                             r"mode; curvature is measured in eval mode: call "
                                             r"model.eval\(\) first"):
            pyflat.GGN(model, data(), backend=backend)


def test_shared_layer_is_refused():
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.Tanh(), shared, nn.Linear(4, 3)).double()
    with pytest.raises(TypeError, match="shared parameters are not supported"):
        pyflat.Hessian(model, data(), backend="fused")


def test_model_must_be_a_module():
    with pytest.raises(TypeError, match="pyflat.GGN: model must be a torch.nn.Module, got list"):
        pyflat.GGN([nn.Linear(4, 3)], data(), backend="fused")
    with pytest.raises(TypeError, match="pyflat.GGN: model must be a torch.nn.Module, got list"):
        pyflat.GGN([nn.Linear(4, 3)], data())
    with pytest.raises(TypeError, match="pyflat.GGN: model ReLU has no parameters"):
        pyflat.GGN(nn.ReLU(), data(), backend="reference")


def _convnet():
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", ["auto", "fused", "reference"])
@pytest.mark.parametrize("make", [mlp, _convnet], ids=["mlp", "convnet"])
def test_half_precision_models_are_refused_by_every_backend(make, backend, dtype):
    # one rule for MLPs and convnets: curvature in half precision keeps about 3 digits
    model = make().to(dtype)
    X = torch.randn(4, 4, dtype=dtype) if make is mlp else torch.randn(4, 1, 6, 6, dtype=dtype)
    with pytest.raises(TypeError, match=f"the model must be float32 or float64, got {dtype}"):
        pyflat.GGN(model, (X, torch.tensor([0, 1, 2, 0])), backend=backend)


def test_non_finite_parameter_is_named():
    model = mlp()
    with torch.no_grad():
        model[2].bias[1] = float("inf")
    with pytest.raises(ValueError, match="parameter '2.bias' holds NaN or inf"):
        pyflat.GGN(model, data())


# ---- data -------------------------------------------------------------------------------

def test_data_must_be_a_pair():
    X, y = data()
    with pytest.raises(TypeError, match=r"data must be a pair \(X, y\) of tensors, a DataLoader "
                                        r"or an iterable of \(X, y\) batches, got Tensor"):
        pyflat.GGN(mlp(), X)
    with pytest.raises(TypeError, match=r"got \(Tensor, list\)"):
        pyflat.GGN(mlp(), (X, [0] * 8))


def test_dtype_mismatch():
    X, y = data()
    with pytest.raises(TypeError, match="X must have the model's dtype torch.float64, got "
                                        "torch.float32"):
        pyflat.GGN(mlp(), (X.float(), y))


def test_device_mismatch():
    X, y = data()
    with pytest.raises(ValueError, match="X and y must be on the model's device cpu, got meta"):
        pyflat.GGN(mlp(), (X.to("meta"), y))


def test_wrong_feature_count():
    X, y = make_batch(8, 5, 3)
    with pytest.raises(ValueError, match=r"the first Linear \('0'\) expects 4 features per "
                                         r"sample, but X becomes \(8, 5\)"):
        pyflat.Hessian(mlp(), (X, y))


@pytest.mark.parametrize("bad, message", [(-1, "got -1"), (3, "got 3")])
def test_labels_out_of_range(bad, message):
    X, y = data()
    y[5] = bad
    with pytest.raises(ValueError, match=r"y must hold class indices in \[0, 3\), " + message):
        pyflat.GGN(mlp(), (X, y))


def test_soft_labels_refused():
    X, y = data()
    with pytest.raises(TypeError, match="y must hold integer class indices, got torch.float64"):
        pyflat.GGN(mlp(), (X, y.double()))


def test_label_shape():
    X, y = data()
    with pytest.raises(ValueError, match=r"y must have shape \(8,\) to match X, got \(8, 1\)"):
        pyflat.GGN(mlp(), (X, y[:, None]))


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_inputs(value):
    X, y = data()
    X[3, 1] = value
    with pytest.raises(ValueError, match="X holds NaN or inf"):
        pyflat.Hessian(mlp(), (X, y))


def test_empty_batch():
    X, y = data()
    with pytest.raises(ValueError, match=r"X must be \(batch, features...\) with batch >= 1"):
        pyflat.GGN(mlp(), (X[:0], y[:0]))


@pytest.mark.parametrize("kwargs, message", [
    ({"backend": "gpu"}, "backend must be 'auto', 'fused' or 'reference', got 'gpu'"),
    ({"reduction": "none"}, "reduction must be 'mean' or 'sum', got 'none'"),
    ({"weight_decay": -1.0}, "weight_decay must be a finite number >= 0, got -1.0"),
    ({"weight_decay": float("nan")}, "weight_decay must be a finite number >= 0, got nan"),
    ({"batch_size": 0}, "batch_size must be an int >= 1, got 0"),
])
def test_bad_options(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        pyflat.GGN(mlp(), data(), **kwargs)


@pytest.mark.parametrize("kwargs, message", [
    ({"weight_decay": True}, "weight_decay must be a number (mu of mu I), got bool True"),
    ({"weight_decay": "0.1"}, "weight_decay must be a number (mu of mu I), got str '0.1'"),
    ({"batch_size": True}, "batch_size must be an int >= 1, got bool True"),
    ({"batch_size": 2.0}, "batch_size must be an int >= 1, got float 2.0"),
])
def test_options_of_the_wrong_type(kwargs, message):
    with pytest.raises(TypeError, match=re.escape(message)):
        pyflat.GGN(mlp(), data(), **kwargs)


def test_numpy_data_is_named():
    X, y = data()
    with pytest.raises(TypeError, match=r"data must be a pair \(X, y\) of torch tensors, got "
                                        r"\(ndarray, ndarray\); torch.from_numpy converts"):
        pyflat.GGN(mlp(), (X.numpy(), y.numpy()))


def test_eigsh_arguments_of_the_wrong_type():
    import numpy as np
    G = pyflat.GGN(mlp(), data())
    with pytest.raises(TypeError, match="tol must be a number >= 0 .*got NoneType None"):
        pyflat.eigsh(G, k=1, tol=None)
    with pytest.raises(TypeError, match="A must be a pyflat operator or a torch.Tensor .*got "
                                        "ndarray; torch.from_numpy"):
        pyflat.eigsh(np.eye(3), k=1)


@pytest.mark.parametrize("kind", [pyflat.GGN, pyflat.Hessian])
def test_vectors_that_require_grad_are_taken_as_data(kind):
    G = kind(mlp(), data())
    V = torch.randn(G.shape[0], 2, dtype=torch.float64)
    expected = G @ V
    for block in (V.clone().requires_grad_(True), V.clone().requires_grad_(True) * 1.0):
        assert torch.equal(G @ block, expected)
        assert torch.equal(G @ block[:, 0], expected[:, 0])


def test_linear_on_tokens_goes_to_the_autograd_backend_which_names_the_output():
    model = nn.Linear(4, 3).double()
    X = torch.randn(8, 5, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (8,))
    with pytest.raises(TypeError, match=r"gets X as \(8, 5, 4\), applied along its last axis"):
        pyflat.GGN(model, (X, y), backend="fused")
    with pytest.warns(UserWarning, match="Falling back"), \
            pytest.raises(ValueError, match=r"logits of shape \(8, classes\), got \(8, 5, 3\); "
                                            "token-level losses"):
        pyflat.GGN(model, (X, y))


# ---- vectors ----------------------------------------------------------------------------

def test_vector_of_wrong_length():
    G = pyflat.GGN(mlp(), data())
    P = G.shape[0]
    with pytest.raises(ValueError, match=rf"GGN.matvec: expected a vector of shape \({P},\), "
                                         rf"got \({P + 1},\)"):
        G @ torch.zeros(P + 1, dtype=torch.float64)


def test_block_of_wrong_rows():
    H = pyflat.Hessian(mlp(), data())
    P = H.shape[0]
    with pytest.raises(ValueError, match=rf"Hessian.matmat: expected a block of shape \({P}, k\) "
                                         rf"with k >= 1, got \({P - 1}, 2\)"):
        H @ torch.zeros(P - 1, 2, dtype=torch.float64)


def test_vector_dtype_mismatch():
    G = pyflat.GGN(mlp(), data())
    with pytest.raises(TypeError, match="expected dtype torch.float64, got torch.float32"):
        G @ torch.zeros(G.shape[0])


def test_vector_device_mismatch():
    G = pyflat.GGN(mlp(), data())
    with pytest.raises(ValueError, match="expected a tensor on cpu, got one on meta"):
        G @ torch.zeros(G.shape[0], dtype=torch.float64, device="meta")


def test_parameter_list_of_wrong_form():
    model = mlp()
    G = pyflat.GGN(model, data())
    shapes = [p.shape for p in model.parameters()]
    with pytest.raises(ValueError, match="expected 4 tensors \\(one per parameter\\), got 3"):
        G.matvec([torch.zeros(s, dtype=torch.float64) for s in shapes[:3]])
    wrong = [torch.zeros(s, dtype=torch.float64) for s in shapes]
    wrong[1] = torch.zeros(7, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"entry 1 must have shape \(6,\), got \(7,\)"):
        G.matvec(wrong)


# ---- ops (C++ checks) -------------------------------------------------------------------

def op_args(model=None):
    model = model or mlp()
    spec = pyflat.engines.mlp.parse_mlp(model, "test")
    return spec.weights, spec.biases, spec.activations, spec.activation_params


def test_op_weight_shape_is_checked():
    X, y = data()
    weights, biases, acts, params = op_args()
    weights = [weights[0], weights[1][:, :5]]
    with pytest.raises(RuntimeError, match=r"mlp_forward: weights\[1\] must be \[out, 6\], "
                                           r"got \[3, 5\]"):
        ops.mlp_forward(X, y, weights, biases, acts, params)


def test_op_bias_shape_and_dtype_are_checked():
    X, y = data()
    weights, biases, acts, params = op_args()
    with pytest.raises(RuntimeError, match=r"mlp_forward: biases\[0\] must be \[6\], got \[5\]"):
        ops.mlp_forward(X, y, weights, [biases[0][:5], biases[1]], acts, params)
    with pytest.raises(RuntimeError, match=r"biases\[1\] must have dtype Double like input; "
                                           r"got Float"):
        ops.mlp_forward(X, y, weights, [biases[0], biases[1].float()], acts, params)


def test_op_activation_name_is_checked():
    X, y = data()
    weights, biases, _, params = op_args()
    with pytest.raises(RuntimeError, match=r"mlp_forward: activations\[0\] must be one of "
                                           r"identity, relu, .*; got 'swish'"):
        ops.mlp_forward(X, y, weights, biases, ["swish", "identity"], params)


def test_op_target_is_checked():
    X, y = data()
    weights, biases, acts, params = op_args()
    y[2] = 7
    with pytest.raises(RuntimeError, match=r"mlp_forward: target must hold class indices in "
                                           r"\[0, 3\); got target\[2\] = 7"):
        ops.mlp_forward(X, y, weights, biases, acts, params)
    with pytest.raises(RuntimeError, match="target must hold class indices as int64, got Int"):
        ops.mlp_forward(X, y.int(), weights, biases, acts, params)


def test_op_reduction_and_params_are_checked():
    X, y = data()
    weights, biases, acts, params = op_args()
    with pytest.raises(RuntimeError, match="mlp_forward: reduction must be 'mean' or 'sum'; "
                                           "got 'max'"):
        ops.mlp_forward(X, y, weights, biases, acts, params, reduction="max")
    with pytest.raises(RuntimeError, match=r"activation_params must hold two numbers per layer "
                                           r"\(4\), got 3"):
        ops.mlp_forward(X, y, weights, biases, acts, params[:3])


def test_op_input_is_checked():
    X, y = data()
    weights, biases, acts, params = op_args()
    with pytest.raises(RuntimeError, match=r"mlp_forward: input must be 2-D \(batch, features\), "
                                           r"got \[8, 4, 1\]"):
        ops.mlp_forward(X[..., None], y, weights, biases, acts, params)


def test_op_directions_and_prepared_lists_are_checked():
    model = mlp()
    X, y = data()
    weights, biases, acts, params = op_args(model)
    prepared = ops.mlp_forward(X, y, weights, biases, acts, params)
    P = num_params(model)
    with pytest.raises(RuntimeError, match=rf"mlp_ggn_matmat: directions must be \[k, {P}\] "
                                           rf".*got \[2, {P + 1}\]"):
        ops.mlp_ggn_matmat(X, weights, biases, acts, prepared,
                           torch.zeros(2, P + 1, dtype=torch.float64))
    broken = prepared._replace(hidden=[])
    with pytest.raises(RuntimeError, match="mlp_hessian_matmat: hidden must hold 1 tensors for "
                                           "these layers, got 0"):
        ops.mlp_hessian_matmat(X, weights, biases, acts, broken,
                               torch.zeros(2, P, dtype=torch.float64))
    broken = prepared._replace(first_derivs=[prepared.first_derivs[0][:4]])
    with pytest.raises(RuntimeError, match=r"first_derivs\[0\] must be \[8, 6\], got \[4, 6\]"):
        ops.mlp_ggn_matmat(X, weights, biases, acts, broken,
                           torch.zeros(2, P, dtype=torch.float64))


@pytest.mark.parametrize("k_in", [1, 5])
def test_op_activation_delta_tangent_k_must_be_deltas(k_in):
    # the kernel reads tangent_in at delta's offsets: a smaller k read past its end
    B, k, f = 4, 3, 6
    delta = torch.ones(B, k, f, dtype=torch.float64)
    first = torch.full((B, f), 2.0, dtype=torch.float64)
    curvature = torch.ones(B, f, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=rf"activation_delta_: tangent_in must have delta's "
                                           rf"shape \[{B}, {k}, {f}\] \(the same k\), got "
                                           rf"\[{B}, {k_in}, {f}\]"):
        ops.activation_delta_(delta, first, curvature, torch.ones(B, k_in, f,
                                                                  dtype=torch.float64))
    assert bool((delta == 1).all())  # nothing half written
    ops.activation_delta_(delta, first, curvature, torch.full((B, k, f), 0.5,
                                                              dtype=torch.float64))
    assert bool((delta == 2.5).all())


@pytest.mark.parametrize("make", [mlp, _convnet], ids=["mlp", "convnet"])
def test_data_of_another_dtype_is_a_data_error_not_a_fallback(make):
    # not "unsupported model, falling back": the autograd backend would refuse it too
    model = make().double()
    X = torch.randn(4, 4) if make is mlp else torch.randn(4, 1, 6, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(TypeError, match="X must have the model's dtype torch.float64, got "
                                            "torch.float32"):
            pyflat.GGN(model, (X, torch.tensor([0, 1, 2, 0])))

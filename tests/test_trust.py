"""No silent wrong answers: an operator computes the model's own function or refuses.

Each test here builds a model or a data source on which an engine could compute the
curvature of some other function (a forward it did not read, hooks it did not run, a
constant it dropped, data that moved) and checks that the operator either matches the
float64 autograd oracle on the model as it was at construction, or raises.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import pyflat
from pyflat import reference
from pyflat.engines.mlp import parse_mlp

from helpers import make_batch, make_mlp, num_params, random_block, relative_error

TOL = 1e-10


def _operator(kind, model, data, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return kind(model, data, **kwargs)


def _oracle(kind, model, data, V, **kwargs):
    fn = reference.hessian_matmat if kind is pyflat.Hessian else reference.ggn_matmat
    return fn(model, (data[0].clone(), data[1].clone()), V, **kwargs)


def _assert_own_function(kind, model, data, **kwargs):
    """The operator (backend 'auto') matches the oracle on the model's own forward."""
    V = random_block(num_params(model), 3)
    expected = _oracle(kind, model, data, V, **kwargs)
    op = _operator(kind, model, data, **kwargs)
    assert relative_error(op @ V, expected) < TOL, (op.backend, op.engine)
    return op


# ---------------------------------------------------------------- forwards and hooks

class Normalised(nn.Sequential):
    """A chain whose forward normalises the input first."""

    def forward(self, x):
        return super().forward((x - 0.5) / 0.25)


class Shifted(nn.Sequential):
    def forward(self, x):
        return super().forward(x) + 0.0  # same function, but not the plain chain


def _chain(cls=nn.Sequential, activation=nn.Tanh):
    ref = make_mlp([5, 7, 3], "tanh", seed=3)
    model = cls(nn.Linear(5, 7), activation(), nn.Linear(7, 3)).double()
    model.load_state_dict(ref.state_dict())
    return model


@pytest.mark.parametrize("kind", [pyflat.GGN, pyflat.Hessian], ids=["ggn", "hessian"])
def test_subclassed_sequential_forward_is_the_function(kind):
    model = _chain(Normalised)
    data = make_batch(6, 5, 3)
    # not the MLP engine, which reads the chain; the graph engine traces the forward
    op = _assert_own_function(kind, model, data)
    assert op.engine == "graph"
    with pytest.raises(TypeError, match="Normalised at '<model>'.*own forward"):
        parse_mlp(model, "pyflat.GGN")


@pytest.mark.parametrize("cls", [Normalised, Shifted])
def test_nested_subclassed_sequential_is_not_read_as_a_chain(cls):
    model = nn.Sequential(_chain(cls)).double()
    with pytest.raises(TypeError, match=f"{cls.__name__} at '0'.*own forward"):
        parse_mlp(model, "pyflat.GGN")
    op = _assert_own_function(pyflat.Hessian, model, make_batch(6, 5, 3))
    assert op.engine == "graph"


def test_a_forward_replaced_on_an_instance_is_refused():
    model = _chain()
    plain = model[0].forward
    model[0].forward = lambda x: plain(x) * 3
    with pytest.raises(TypeError, match="Linear at '0' has its forward replaced"):
        pyflat.GGN(model, make_batch(6, 5, 3), backend="fused")
    assert _assert_own_function(pyflat.GGN, model, make_batch(6, 5, 3)).backend == "reference"


class DoubledOnCall(nn.Sequential):
    """Overrides the call, not the forward: torch.fx traces forward() alone."""

    def __call__(self, x):
        return super().__call__(x) * 2.0


class DoubledOnCallImpl(nn.Sequential):
    def _call_impl(self, *args, **kwargs):
        return super()._call_impl(*args, **kwargs) * 2.0


@pytest.mark.parametrize("cls", [DoubledOnCall, DoubledOnCallImpl])
@pytest.mark.parametrize("kind", [pyflat.GGN, pyflat.Hessian], ids=["ggn", "hessian"])
def test_a_call_overridden_by_the_class_is_the_function(cls, kind):
    # Zero logits: model(X) = 2 * 0 matches the traced forward, so only a structural check
    # can see that the curvature of 2 f is asked for, not that of f.
    model = _chain(cls, activation=nn.ReLU)
    with torch.no_grad():
        model[2].weight.zero_()
        model[2].bias.zero_()
    assert not model(make_batch(6, 5, 3)[0]).any()
    with pytest.raises(TypeError, match=f"{cls.__name__} at '<model>' overrides"):
        pyflat.GGN(model, make_batch(6, 5, 3), backend="fused")
    assert _assert_own_function(kind, model, make_batch(6, 5, 3)).backend == "reference"


def _hooked(where: str):
    model = _chain()
    if where == "forward_hook":
        model[1].register_forward_hook(lambda m, i, o: o * 2)
    elif where == "pre_hook":
        model[2].register_forward_pre_hook(lambda m, i: (i[0] + 0.1,))
    elif where == "hook_with_kwargs":
        model[0].register_forward_hook(lambda m, a, kw, o: o - 0.3, with_kwargs=True)
    elif where == "model_hook":
        model.register_forward_hook(lambda m, i, o: o * 0.5)
    return model


@pytest.mark.parametrize("where", ["forward_hook", "pre_hook", "hook_with_kwargs",
                                   "model_hook"])
@pytest.mark.parametrize("kind", [pyflat.GGN, pyflat.Hessian], ids=["ggn", "hessian"])
def test_forward_hooks_are_part_of_the_function(kind, where):
    model = _hooked(where)
    data = make_batch(6, 5, 3)
    op = _assert_own_function(kind, model, data)
    assert op.backend == "reference"
    with pytest.raises(TypeError, match="hook"):
        kind(model, data, backend="fused")


def test_forward_hooks_on_a_convnet_are_refused_by_the_graph_engine():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8, 3)).double()
    model[0].register_forward_hook(lambda m, i, o: o + 1e-3)
    gen = torch.Generator().manual_seed(0)
    data = (torch.randn(4, 1, 4, 4, generator=gen, dtype=torch.float64),
            torch.tensor([0, 1, 2, 0]))
    with pytest.raises(TypeError, match="Conv2d at '0' has a forward hook"):
        pyflat.GGN(model, data, backend="fused")
    _assert_own_function(pyflat.Hessian, model, data)


@pytest.mark.parametrize("pre", [False, True], ids=["hook", "pre_hook"])
def test_global_module_hooks_are_refused(pre):
    register = (torch.nn.modules.module.register_module_forward_pre_hook if pre else
                torch.nn.modules.module.register_module_forward_hook)
    hook = (lambda m, i: tuple(t * 1.5 for t in i)) if pre else (lambda m, i, o: o * 1.5)
    model, data = _chain(), make_batch(6, 5, 3)
    handle = register(hook)
    try:
        with pytest.raises(TypeError, match="global"):
            pyflat.GGN(model, data, backend="fused")
        _assert_own_function(pyflat.GGN, model, data)
    finally:
        handle.remove()
    assert pyflat.GGN(model, data, backend="fused").engine == "mlp"


class Doubled(nn.Module):
    def forward(self, W):
        return 2 * W


@pytest.mark.parametrize("kind", [pyflat.GGN, pyflat.Hessian], ids=["ggn", "hessian"])
def test_parametrized_weights_are_refused_by_the_fused_engines(kind):
    model = _chain()
    parametrize.register_parametrization(model[0], "weight", Doubled())
    data = make_batch(6, 5, 3)
    with pytest.raises(TypeError, match="Linear at '0' has parametrized tensors"):
        kind(model, data, backend="fused")
    op = _assert_own_function(kind, model, data)
    assert op.backend == "reference"


def test_model_check_tolerance_sees_a_small_change_in_float32():
    # A function off by 1e-4 relative in float32 passes a 1e-4 check; the check is
    # tied to float32's own error now, so a structural miss cannot slip through it.
    from pyflat.curvature.checks import forward_tolerance as _forward_tolerance

    assert _forward_tolerance(torch.float32) < 1e-5
    assert _forward_tolerance(torch.float64) < 1e-12


# ---------------------------------------------------------------- constants in forwards

class PlusConstant(nn.Module):
    def __init__(self, constant, form):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.fc = nn.Linear(8, 3)
        self.constant, self.form = constant, form

    def forward(self, x):
        h = self.conv(x)
        c = self.constant
        h = {"x+c": lambda: h + c, "c+x": lambda: c + h, "x-c": lambda: h - c,
             "c-x": lambda: c - h, "x/c": lambda: h / c}[self.form]()
        return self.fc(torch.tanh(h).flatten(1))


@pytest.mark.parametrize("form", ["x+c", "c+x", "x-c", "c-x", "x/c"])
@pytest.mark.parametrize("constant", [1e-4, 3.0])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_constants_in_a_traced_forward_are_computed(form, constant, dtype):
    torch.manual_seed(0)
    model = PlusConstant(constant, form).to(dtype)
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(5, 1, 4, 4, generator=gen, dtype=dtype)
    y = torch.tensor([0, 1, 2, 0, 1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback: the graph engine computes it
        op = pyflat.Hessian(model, (X, y))
    assert op.engine == "graph"
    V = random_block(num_params(model), 2)
    exact = reference.hessian_matmat(copy.deepcopy(model).double(), (X.double(), y), V)
    ours = relative_error((op @ V.to(dtype)).double(), exact)
    if dtype == torch.float64:
        assert ours < TOL
    else:
        autograd = relative_error(
            reference.hessian_matmat(model, (X, y), V.to(dtype)).double(), exact)
        assert ours <= 4 * max(autograd, 8 * torch.finfo(torch.float32).eps), (ours, autograd)


# ---------------------------------------------------------------- snapshots of the data

def _mutators():
    return {
        "mul_": lambda X: X.mul_(3),
        "numpy": lambda X: X.numpy().__setitem__(Ellipsis, 0.25),
        "data": lambda X: X.data.add_(1),
        "dlpack": lambda X: torch.from_dlpack(X).neg_(),
    }


@pytest.mark.parametrize("how", list(_mutators()))
@pytest.mark.parametrize("model_kind", ["mlp", "graph", "reference"])
def test_operator_is_a_snapshot_of_its_batch(how, model_kind):
    if model_kind == "graph":
        model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(),
                              nn.Linear(8, 3)).double()
        X = torch.randn(5, 1, 4, 4, generator=torch.Generator().manual_seed(0),
                        dtype=torch.float64)
    else:
        model = make_mlp([5, 6, 3], "tanh", seed=1)
        if model_kind == "reference":
            model = nn.Sequential(model, nn.LayerNorm(3, dtype=torch.float64))
        X = make_batch(5, 5, 3)[0]
    y = torch.tensor([0, 1, 2, 0, 1])
    V = random_block(num_params(model), 2)
    expected = _oracle(pyflat.Hessian, model, (X, y), V)
    op = _operator(pyflat.Hessian, model, (X, y))
    assert op.engine == (None if model_kind == "reference" else model_kind)
    _mutators()[how](X)
    y[0] = 2
    assert relative_error(op @ V, expected) < TOL


def test_reference_operator_is_a_snapshot_of_buffers():
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.LayerNorm(3)).double().eval()
    with torch.no_grad():
        model[1].running_var.fill_(2.0)
    data = make_batch(6, 4, 3)
    V = random_block(num_params(model), 2)
    expected = _oracle(pyflat.GGN, model, data, V)
    op = _operator(pyflat.GGN, model, data)
    assert op.backend == "reference"
    with torch.no_grad():
        model[1].running_var.fill_(0.1)
    assert relative_error(op @ V, expected) < TOL


# ---------------------------------------------------------------- changing data sources

class Changing:
    """Yields ``first`` on the first pass and ``later`` on every later one."""

    def __init__(self, first, later):
        self.first, self.later, self.passes = first, later, 0

    def __iter__(self):
        self.passes += 1
        return iter(self.first if self.passes == 1 else self.later)


def _batches(n, seed=0, size=4):
    X, y = make_batch(n * size, 5, 3, seed=seed)
    return list(zip(X.split(size), y.split(size)))


@pytest.mark.parametrize("later", ["halved", "doubled", "empty", "values"])
def test_a_data_source_that_changes_between_passes_is_refused(later):
    first = _batches(4)
    later_batches = {"halved": first[:2], "doubled": first + first, "empty": [],
                     "values": _batches(4, seed=5)}[later]
    model = make_mlp([5, 6, 3], "tanh", seed=1)
    with pytest.raises(ValueError, match="batch"):
        op = pyflat.GGN(model, Changing(first, later_batches), cache_bytes=0,
                        check_determinism=False)
        op @ random_block(num_params(model), 1)


def test_a_one_shot_generator_in_a_reiterable_wrapper_is_refused():
    batches = _batches(3)

    class OneShot:
        def __init__(self):
            self.gen = (b for b in batches)

        def __iter__(self):
            return self.gen

    model = make_mlp([5, 6, 3], "tanh", seed=1)
    with pytest.raises(ValueError, match="batch"):
        pyflat.GGN(model, OneShot(), cache_bytes=0)


def test_a_cached_data_set_is_a_snapshot_of_its_first_pass():
    first = _batches(3)
    model = make_mlp([5, 6, 3], "tanh", seed=1)
    op = pyflat.GGN(model, Changing(first, _batches(3, seed=9)))
    assert op.cache_report["cached_batches"] == 3
    X = torch.cat([b[0] for b in first])
    y = torch.cat([b[1] for b in first])
    V = random_block(num_params(model), 2)
    assert relative_error(op @ V, reference.ggn_matmat(model, (X, y), V)) < TOL


# ---------------------------------------------------------------- BatchNorm state

@pytest.mark.parametrize("bad", ["nan_var", "negative_var", "inf_mean"])
@pytest.mark.parametrize("backend", ["auto", "fused", "reference"])
def test_invalid_batchnorm_statistics_are_refused(bad, backend):
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8, 3)).double().eval()
    with torch.no_grad():
        if bad == "nan_var":
            model[1].running_var[0] = float("nan")
        elif bad == "negative_var":
            model[1].running_var[1] = -0.5
        else:
            model[1].running_mean[0] = float("inf")
    X = torch.randn(4, 1, 4, 4, generator=torch.Generator().manual_seed(0),
                    dtype=torch.float64)
    with pytest.raises(ValueError, match="BatchNorm2d at '1'.*running_"):
        pyflat.GGN(model, (X, torch.tensor([0, 1, 2, 0])), backend=backend)


def test_a_model_whose_output_is_not_finite_is_refused():
    model = make_mlp([5, 6, 3], "tanh", seed=1)
    with torch.no_grad():
        model[0].weight.fill_(1e308)
        model[0].bias.fill_(1e308)
        model[2].weight.fill_(1e308)
    with pytest.raises(ValueError, match="not finite"):
        pyflat.GGN(model, make_batch(4, 5, 3))


def test_a_shuffled_loader_with_some_batches_cached_is_refused():
    # with nothing cached a shuffle only reorders the sum; with the first batch cached,
    # the batches read again would hold other samples than the cache leaves out
    from torch.utils.data import DataLoader, TensorDataset

    X, y = make_batch(12, 5, 3)
    model = make_mlp([5, 6, 3], "tanh", seed=1)
    one_batch = pyflat.GGN(model, (X[:4], y[:4]), reduction="sum").backend_operator.prepared_bytes()
    loader = DataLoader(TensorDataset(X, y), batch_size=4, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="no shuffle unless nothing is cached"):
        op = pyflat.GGN(model, loader, cache_bytes=one_batch, check_determinism=False)
        assert op.cache_report["cached_batches"] == 1
        op @ random_block(num_params(model), 1)
    op = pyflat.GGN(model, loader, cache_bytes=0)
    V = random_block(num_params(model), 1)
    assert relative_error(op @ V, reference.ggn_matmat(model, (X, y), V)) < 1e-12


@pytest.mark.parametrize("cache_bytes", [0, None], ids=["re-prepared", "cached"])
def test_a_data_set_operator_is_a_snapshot_of_the_model(cache_bytes):
    batches = _batches(3)
    model = make_mlp([5, 6, 3], "tanh", seed=1)
    X = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    V = random_block(num_params(model), 2)
    expected = reference.ggn_matmat(copy.deepcopy(model), (X, y), V)
    op = pyflat.GGN(model, batches, cache_bytes=cache_bytes)
    model[0].weight.data.mul_(2)  # training goes on
    if cache_bytes == 0:
        with pytest.raises(ValueError, match="model's parameters or buffers changed"):
            op @ V
    else:
        assert relative_error(op @ V, expected) < TOL


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_a_model_whose_output_is_not_a_tensor_or_not_finite_is_refused(backend):
    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(5, 3).double()

        def forward(self, x):
            return self.fc(x), x

    with pytest.raises(TypeError, match="must return a tensor of logits, got tuple"):
        _operator(pyflat.GGN, Pair(), make_batch(4, 5, 3), backend=backend)
    model = nn.Sequential(make_mlp([5, 6, 3], "tanh", seed=1), nn.LayerNorm(3).double())
    with torch.no_grad():
        model[1].weight.fill_(float("inf"))
    with pytest.raises(ValueError, match="not finite|NaN or inf"):
        _operator(pyflat.GGN, model, make_batch(4, 5, 3), backend=backend)


def test_a_hook_added_after_a_data_set_operator_was_built_is_refused():
    batches = _batches(3)
    model = make_mlp([5, 6, 3], "tanh", seed=1)
    op = pyflat.GGN(model, batches, cache_bytes=0)
    assert op.backend == "fused"
    model[1].register_forward_hook(lambda m, i, o: o * 2)
    with pytest.raises(TypeError, match="Tanh at '1' has a forward hook"):
        op @ random_block(num_params(model), 1)


@pytest.mark.parametrize("kind", [pyflat.GGN, pyflat.Hessian], ids=["ggn", "hessian"])
def test_a_channels_last_model_runs_through_the_graph_engine(kind):
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.GELU(),
                          nn.Conv2d(3, 2, 2, stride=2), nn.SiLU(), nn.Flatten(),
                          nn.Linear(8, 3)).double().eval()
    model = model.to(memory_format=torch.channels_last)
    X = torch.randn(5, 2, 4, 4, generator=torch.Generator().manual_seed(0),
                    dtype=torch.float64).to(memory_format=torch.channels_last)
    op = _assert_own_function(kind, model, (X, torch.tensor([0, 1, 2, 0, 1])))
    assert op.engine == "graph"


@pytest.mark.parametrize("model_kind", ["mlp", "graph", "reference"])
def test_inputs_that_require_grad_are_taken_as_data(model_kind):
    model = make_mlp([5, 6, 3], "tanh", seed=1)
    if model_kind == "graph":
        model = nn.Sequential(model, nn.Identity()).double()
        model = Shifted(*model[0])
    elif model_kind == "reference":
        model = nn.Sequential(model, nn.LayerNorm(3).double())
    X, y = make_batch(5, 5, 3)
    op = _assert_own_function(pyflat.Hessian, model, (X.requires_grad_(True), y))
    assert op.engine == (None if model_kind == "reference" else model_kind)


def test_a_reference_operator_keeps_the_modes_of_its_snapshot():
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Dropout(0.5),
                          nn.LayerNorm(3)).double().eval()
    with torch.no_grad():
        model[1].running_var.fill_(3.0)
    data = make_batch(6, 4, 3)
    V = random_block(num_params(model), 2)
    expected = _oracle(pyflat.Hessian, model, data, V)
    op = _operator(pyflat.Hessian, model, data)
    assert op.backend == "reference"
    model.train()
    assert relative_error(op @ V, expected) < TOL
    assert model[1].training and model[2].training  # the user's modes are left as set


class DoublesItsInput(nn.Module):
    """A forward that writes to its input: every call would compound on a kept X."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 3).double()
        self.norm = nn.LayerNorm(3).double()

    def forward(self, x):
        x.mul_(2)
        return self.norm(torch.tanh(self.fc(x)))


@pytest.mark.parametrize("which", ["inplace_relu_first", "forward_writes_input"])
def test_forwards_that_write_to_their_input_leave_the_data_and_products_alone(which):
    if which == "inplace_relu_first":
        model = nn.Sequential(nn.ReLU(inplace=True), make_mlp([5, 6, 3], "tanh", seed=1))
    else:
        model = DoublesItsInput()
    X, y = make_batch(5, 5, 3)
    original = X.clone()
    V = random_block(num_params(model), 2)
    # the oracle: the function of the data as given, for a fresh copy on every call
    fns = reference.functions(model, (X.clone(), y))
    expected = torch.stack([fns.hessian_vp(V[:, j]) for j in range(2)], 1)
    op = _operator(pyflat.Hessian, model, (X, y))
    first = op @ V
    assert torch.equal(X, original)
    assert relative_error(first, expected) < TOL
    assert torch.equal(op @ V, first)  # no drift from call to call

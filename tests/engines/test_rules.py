"""Each layer rule of the graph engine alone (pyflat/engines/rules.py), against torch.func in
float64: its forward against the module, its tangent against jvp, its backward against
vjp (input deltas and parameter rows), and, for the exact Hessian, its second-order terms
against the derivative of the vjp at the stored gradient delta e along the same
directions. These run before and independently of the whole-model tests: a wrong rule
fails here, by name."""
from __future__ import annotations

import types

import pytest
import torch
from torch import fx, nn
from torch.func import functional_call, jvp, vjp

from pyflat.engines import graph as _graph
from pyflat.engines import rules as _rules
from pyflat.linalg import ParameterLayout

ACTIVATION_MODULES = [nn.ReLU(), nn.LeakyReLU(0.3), nn.Tanh(), nn.Sigmoid(), nn.GELU(),
                      nn.GELU(approximate="tanh"), nn.Softplus(beta=2.0, threshold=5.0),
                      nn.ELU(0.7), nn.SiLU()]


def _batchnorm(kind, features, affine=True):
    torch.manual_seed(3)
    m = kind(features, affine=affine).double().eval()
    m.running_mean.normal_()
    m.running_var.uniform_(0.5, 2.0)
    if affine:
        with torch.no_grad():
            m.weight.normal_()
            m.bias.normal_()
    return m


# (id, module, input shape without the batch axis)
MODULE_CASES = [
    ("linear", nn.Linear(5, 4), (5,)),
    ("linear without bias", nn.Linear(5, 4, bias=False), (5,)),
    ("conv1d", nn.Conv1d(3, 4, 3, padding=1), (3, 7)),
    ("conv2d strided", nn.Conv2d(2, 4, 3, stride=2, padding=1), (2, 7, 6)),
    ("conv2d grouped dilated same", nn.Conv2d(4, 6, 3, groups=2, dilation=2, padding="same"),
     (4, 6, 6)),
    ("conv2d 1x1", nn.Conv2d(3, 5, 1), (3, 4, 5)),
    ("conv2d 1x1 strided", nn.Conv2d(3, 5, 1, stride=2), (3, 5, 5)),
    ("conv2d without bias", nn.Conv2d(3, 4, 2, bias=False), (3, 5, 4)),
    *[(f"activation {m!r}", m, (6,)) for m in ACTIVATION_MODULES],
    ("activation on images", nn.Tanh(), (2, 3, 3)),
    ("maxpool", nn.MaxPool2d(2), (2, 6, 4)),
    ("maxpool padded ceil", nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True), (2, 7, 6)),
    ("avgpool", nn.AvgPool2d(2), (2, 6, 4)),
    ("avgpool padded ceil", nn.AvgPool2d(3, stride=2, padding=1, ceil_mode=True,
                                         count_include_pad=False), (2, 7, 6)),
    ("adaptive avgpool", nn.AdaptiveAvgPool2d((3, 2)), (2, 7, 5)),
    ("batchnorm1d", _batchnorm(nn.BatchNorm1d, 5), (5,)),
    ("batchnorm2d", _batchnorm(nn.BatchNorm2d, 3), (3, 4, 3)),
    ("batchnorm2d without affine", _batchnorm(nn.BatchNorm2d, 3, affine=False), (3, 4, 3)),
    ("flatten", nn.Flatten(), (2, 3, 2)),
    ("identity", nn.Identity(), (4,)),
    ("dropout in eval mode", nn.Dropout(0.5).eval(), (4,)),
]


class _Affine(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


AFFINE_CASES = [("times", lambda x: x * 2.5), ("from a number", lambda x: 3.0 - x),
                ("negated", lambda x: -x), ("divided", lambda x: x / 4)]


class _Case:
    """A node and its inputs, with the function it computes for torch.func."""

    def __init__(self, node, inputs, function, parameters: dict, env=None):
        self.node, self.inputs, self.function, self.env = node, inputs, function, env or {}
        self.names = list(parameters)
        self.parameters = parameters
        node.inputs = list(range(len(inputs)))
        node.params = dict(parameters)
        self.layout = ParameterLayout([p.shape for p in parameters.values()], self.names,
                                      list(parameters.values()))

    def site(self, exact: bool):
        engine = types.SimpleNamespace(batch=self.inputs[0].shape[0], exact=exact,
                                       caller="test", shapes=[tuple(x.shape[1:])
                                                              for x in self.inputs])
        index = len(self.inputs)
        params = {n: p.detach().clone() for n, p in self.parameters.items()}
        site = _rules.Site(self.node, index, {}, params, engine)
        value = self.node.rule.forward(site, self.inputs[0], list(self.inputs) + [None],
                                       self.env)
        engine.shapes.append(tuple(value.shape[1:]))
        return site, value

    def call(self, *args):
        """f(inputs..., parameters...) for torch.func."""
        n = len(self.inputs)
        return self.function(list(args[:n]), dict(zip(self.names, args[n:])))

    @property
    def primals(self):
        return tuple(self.inputs) + tuple(p.detach() for p in self.parameters.values())


def _module_case(module, in_shape, batch=3):
    module = module.double()
    node = _graph._module_node("test", "m", module)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(batch, *in_shape, dtype=torch.float64, generator=gen)
    return _Case(node, [x], lambda xs, ps: functional_call(module, ps, (xs[0],)),
                 dict(module.named_parameters(recurse=False)))


def _add_case(shape=(3, 4), batch=3):
    gen = torch.Generator().manual_seed(6)
    xs = [torch.randn(batch, *shape, dtype=torch.float64, generator=gen) for _ in range(2)]
    return _Case(_graph.Node("add", "addition"), xs, lambda xs, ps: xs[0] + xs[1], {})


def _affine_case(fn, batch=3):
    traced = fx.symbolic_trace(_Affine(fn))
    placeholder = next(n for n in traced.graph.nodes if n.op == "placeholder")
    call = next(n for n in traced.graph.nodes if n.op == "call_function")
    node = _graph._affine_node("test", call, {placeholder: 0}, set())
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(batch, 5, dtype=torch.float64, generator=gen)
    return _Case(node, [x], lambda xs, ps: fn(xs[0]), {}, env={placeholder: x})


CASES = ([(name, lambda m=m, s=s: _module_case(m, s)) for name, m, s in MODULE_CASES]
         + [("add", _add_case)]
         + [(f"affine {name}", lambda fn=fn: _affine_case(fn)) for name, fn in AFFINE_CASES])


def test_every_rule_has_a_case():
    tested = {_module_case(m, s).node.kind for _, m, s in MODULE_CASES} | {"add", "affine"}
    assert tested == set(_rules.RULES) - {"input"}
    assert {type(m) for _, m, _ in MODULE_CASES} >= set(_rules.MODULE_RULES) - {
        nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout}  # identity, as Dropout


def _directions(case, k, seed):
    gen = torch.Generator().manual_seed(seed)
    V = torch.randn(k, case.layout.size, dtype=torch.float64, generator=gen)
    T = [torch.randn(x.shape[0], k, *x.shape[1:], dtype=torch.float64, generator=gen)
         for x in case.inputs]
    return V, T


def _per_direction(case, V, T, j):
    return tuple(t[:, j] for t in T) + tuple(case.layout.split(V[j]))


def _sum_sends(sends, count):
    deltas = [None] * count
    for position, delta, _ in sends:
        deltas[position] = delta if deltas[position] is None else deltas[position] + delta
    return deltas


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("name, make", CASES, ids=[c[0] for c in CASES])
def test_forward_and_tangent(name, make, k):
    case = make()
    site, value = case.site(exact=False)
    torch.testing.assert_close(value, case.call(*case.primals), rtol=1e-14, atol=1e-14)
    V, T = _directions(case, k, seed=11)
    for overwritable in (False, True):  # a copy, or over the input's tangent
        p = _rules.Products(V, None, k, False, case.layout)
        out, _ = case.node.rule.tangent(site, [t.clone() for t in T],
                                        [overwritable] * len(T), p)
        for j in range(k):
            _, expected = jvp(case.call, case.primals, _per_direction(case, V, T, j))
            torch.testing.assert_close(out[:, j], expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("exact", [False, True], ids=["vjp", "second order"])
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("name, make", CASES, ids=[c[0] for c in CASES])
def test_backward(name, make, k, exact):
    """The vjp of d; with ``exact``, plus the derivative of the vjp of e along the
    directions (the first input's tangent and the parameters' rows), as the exact
    Hessian's backward adds it."""
    case = make()
    site, value = case.site(exact=exact)
    gen = torch.Generator().manual_seed(13)
    d = torch.randn(value.shape[0], k, *value.shape[1:], dtype=torch.float64, generator=gen)
    e = torch.randn(value.shape, dtype=torch.float64, generator=gen)
    V, T = _directions(case, k, seed=17)
    T[1:] = [torch.zeros_like(t) for t in T[1:]]  # the engine passes the first input's
    if exact:
        case.node.rule.keep_second_order(site, e)
    out = torch.zeros(k, case.layout.size, dtype=torch.float64)
    p = _rules.Products(V, out, k, exact, case.layout)
    sends = case.node.rule.backward(site, d.clone(), T[0] if exact else None,
                                    [True] * len(case.inputs), False, p)
    deltas = _sum_sends(sends, len(case.inputs))
    n = len(case.inputs)
    for j in range(k):
        _, pull = vjp(case.call, *case.primals)
        expected = list(pull(d[:, j]))
        if exact:
            def pulled_e(*args):
                return vjp(case.call, *args)[1](e)
            _, second = jvp(pulled_e, case.primals, _per_direction(case, V, T, j))
            expected = [a + b for a, b in zip(expected, second)]
        for position in range(n):
            torch.testing.assert_close(deltas[position][:, j], expected[position],
                                       rtol=1e-10, atol=1e-12)
        if case.layout.size:
            torch.testing.assert_close(out[j], case.layout.concatenate(expected[n:]),
                                       rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name, make", CASES, ids=[c[0] for c in CASES])
def test_the_first_input_tangent_is_kept_exactly_where_the_exact_backward_reads_it(name, make):
    """A rule that reads its input's tangent in the exact backward must say so (the engine
    keeps that tangent); one that says so must change its result with it."""
    case = make()
    site, value = case.site(exact=True)
    gen = torch.Generator().manual_seed(19)
    case.node.rule.keep_second_order(site, torch.randn(value.shape, dtype=torch.float64,
                                                       generator=gen))
    k = 2
    d = torch.randn(value.shape[0], k, *value.shape[1:], dtype=torch.float64, generator=gen)
    V, T = _directions(case, k, seed=23)
    results = []
    for t_in in (T[0], 2 * T[0]):
        out = torch.zeros(k, case.layout.size, dtype=torch.float64)
        p = _rules.Products(V, out, k, True, case.layout)
        sends = case.node.rule.backward(site, d.clone(), t_in, [True] * len(case.inputs),
                                        False, p)
        results.append(torch.cat([out.reshape(-1)] + [s[1].reshape(-1) for s in sends]))
    changes = not torch.equal(results[0], results[1])
    assert changes == case.node.rule.reads_input_tangent(site)

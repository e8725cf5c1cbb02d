"""Seeded fuzz cases for the operators' contract: every product is the model's own
function, or an error.

For any model and data, ``pyflat.GGN`` / ``pyflat.Hessian`` must either raise a TypeError or
ValueError (at construction or at a product) or return products equal to the autograd
oracle, ``pyflat.reference``, on a float64 deep copy of the model and of the data as they
were at construction: relative error (max |a - b| / max |b|) at most 1e-10 in float64, and
in float32 within 4x float32 autograd's own error against float64 (its largest over the
case's vectors and fifteen more: on one vector it varies tenfold; floor: 8 float32
epsilons). Where a product misses, the oracle runs again with saturation-exact tanh and
sigmoid rules (``helpers.exact_saturation``); if that moves it, the product is judged
against it. Warnings
(a fallback to the reference backend) are allowed; a silent wrong number is the failure,
and so is any other exception (a user should get a clear error, not a crash).

``make_case(seed)`` draws one case deterministically: the family comes from the seed (round
robin over :data:`FAMILIES`, so a range of seeds covers them all), every other choice from
``random.Random(seed)`` and every tensor from a ``torch.Generator`` seeded with the seed.
``run_case(case)`` runs it and returns the outcome, or raises AssertionError with the seed,
the description and a command that reproduces it.
"""
from __future__ import annotations

import copy
import math
import random
import types
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

import pyflat
from pyflat import reference

from helpers import exact_saturation, relative_error

__all__ = ["Built", "Case", "FAMILIES", "REQUIRED_TAGS", "make_case", "reproduce_command",
           "run_case"]

#: the families of cases; ``make_case`` takes them round robin by seed
FAMILIES = ("mlp", "convnet", "constants", "subclass", "hooks", "parametrize",
            "memory_format", "data_source", "mutation")

FLOAT64_TOLERANCE = 1e-10
FLOAT32_EPS = torch.finfo(torch.float32).eps
#: random vectors besides the case's own on which float32 autograd's error is measured
FLOAT32_BAR_VECTORS = 15

ACTIVATIONS = ("relu", "leaky_relu", "tanh", "sigmoid", "gelu", "gelu_tanh", "softplus",
               "elu", "silu")
# activations with a kink, and where it sits (softplus: threshold / beta)
KINKED = ("relu", "leaky_relu", "elu", "softplus")

#: features every default run must draw at least once (checked by the suite), so that a
#: change to the generator cannot silently stop exercising one of them
REQUIRED_TAGS = frozenset(
    [f"act:{a}" for a in ACTIVATIONS]
    + [f"kink:{a}" for a in KINKED]
    + ["mlp:nested", "mlp:flatten", "mlp:identity", "mlp:dropout", "mlp:no_bias",
       "conv:1d", "conv:2d", "conv:stride", "conv:same", "conv:dilation", "conv:groups",
       "conv:depthwise", "conv:no_bias", "pool:max", "pool:avg", "pool:adaptive",
       "bn:1d", "bn:2d", "bn:bad_stats", "bn:train", "residual",
       "flatten:module", "flatten:view", "flatten:torch", "fn:F.relu", "fn:torch.tanh",
       "fn:F.gelu", "fn:F.silu", "fn:method_relu", "scale:mul", "scale:div"]
    + [f"const:{f}" for f in ("x+c", "c+x", "x-c", "x*c", "x/c", "norm")]
    + ["const:small", "const:large"]
    + [f"subclass:{v}" for v in ("norm_seq", "add_seq", "scaled_linear", "wrapper",
                                 "instance_forward")]
    + [f"hook:{v}" for v in ("forward", "pre", "none", "global_forward", "global_pre")]
    + [f"param:{v}" for v in ("scale2", "symmetric", "orthogonal", "normalize", "conv")]
    + ["layout:channels_last_model", "layout:channels_last_input", "layout:transposed",
       "layout:sliced"]
    + [f"source:{v}" for v in ("fewer", "more", "values", "labels", "oneshot", "stable",
                               "dataloader", "batch_size")]
    + ["cache:none", "cache:default"]
    + [f"mutate:{v}" for v in ("X.mul_", "X.numpy", "X.data", "y", "weight", "running_var")]
    + [f"edge:{v}" for v in ("confident", "reuse_activation", "reuse_linear",
                             "dropout_train", "int32_labels", "x_requires_grad")]
    + ["dtype:float32", "dtype:float64", "curvature:ggn", "curvature:hessian",
       "reduction:mean", "reduction:sum", "weight_decay", "k:1", "k:3", "backend:auto",
       "backend:fused"])


@dataclass
class Built:
    """A case's objects, fresh from its builder.

    ``oracle_batches`` is the data the oracle uses: None for a batch (X, y), which is
    cloned right before the operator is built; else the batches a data source yields on
    its first pass, concatenated for the oracle (sample-weighted curvature of a data set
    equals the curvature of the concatenation, for either reduction). ``global_hooks`` are
    (kind, hook) pairs that ``run_case`` registers around the whole run and always removes.
    """

    model: nn.Module
    data: Any
    kwargs: dict[str, Any]
    oracle_batches: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    global_hooks: list[tuple[str, Callable]] = field(default_factory=list)


@dataclass(frozen=True)
class Case:
    """One drawn case: a builder of fresh objects, an optional in-place write applied after
    the operator is built, and how it is measured.

    ``must_raise`` names a documented refusal (e.g. a negative BatchNorm variance): the
    operator must then raise, products that match are not enough.
    """

    seed: int
    family: str
    description: str
    build: Callable[[], Built]
    curvature: str                      # "ggn" or "hessian"
    dtype: torch.dtype
    k: int
    vector_form: bool                   # k == 1 given as a flat (P,) vector
    mutate: Callable[[nn.Module, Any], None] | None = None
    must_raise: str = ""
    oracle_data: str = "the batch (X, y) as it was at construction"
    #: how many times the product runs (each compared): data sources change on later passes
    repeats: int = 1
    tags: frozenset[str] = frozenset()


def reproduce_command(seed: int) -> str:
    """The one line that reruns a seed."""
    return f"PYFLAT_FUZZ_SEEDS={seed} .venv/bin/python -m pytest -q tests/test_fuzz.py"


# ---------------------------------------------------------------------------- tensors


def _randn(gen: torch.Generator, *shape: int) -> torch.Tensor:
    """Standard normal draws in float64 (cast later), so a case's values do not depend on
    its dtype."""
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


def _labels(gen: torch.Generator, n: int, classes: int) -> torch.Tensor:
    return torch.randint(0, classes, (n,), generator=gen)


def _fill(model: nn.Module, gen: torch.Generator, gain: float) -> None:
    """Overwrites every parameter and BatchNorm statistic with draws from ``gen``: weights
    N(0, gain^2 / fan_in), biases N(0, 0.25), BatchNorm scales 1 + N(0, 0.04), running
    means N(0, 0.09) and variances U(0.5, 2)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                value = _randn(gen, *p.shape) * gain / math.sqrt(p[0].numel())
            elif name.endswith("bias"):
                value = _randn(gen, *p.shape) * 0.5
            else:
                value = 1 + 0.2 * _randn(gen, *p.shape)
            p.copy_(value)
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                n = module.running_mean.numel()
                module.running_mean.copy_(0.3 * _randn(gen, n))
                module.running_var.copy_(0.5 + 1.5 * torch.rand(n, generator=gen,
                                                                dtype=torch.float64))


def _build_quietly(make: Callable[[], Built]) -> Callable[[], Built]:
    """Runs a builder with the global RNG forked: module constructors draw their initial
    weights from it, which every case overwrites from its own generator, so the global
    state other tests see is left as it was."""

    def build() -> Built:
        with torch.random.fork_rng(devices=[]):
            return make()

    return build


# ---------------------------------------------------------------------------- modules


def _activation(spec: tuple) -> nn.Module:
    name, a, b = spec
    return {
        "relu": lambda: nn.ReLU(),
        "leaky_relu": lambda: nn.LeakyReLU(a),
        "tanh": lambda: nn.Tanh(),
        "sigmoid": lambda: nn.Sigmoid(),
        "gelu": lambda: nn.GELU(),
        "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
        "softplus": lambda: nn.Softplus(beta=a, threshold=b),
        "elu": lambda: nn.ELU(alpha=a),
        "silu": lambda: nn.SiLU(),
    }[name]()


def _draw_activation(rng: random.Random, name: str | None = None) -> tuple:
    name = name or rng.choice(ACTIVATIONS)
    if name == "leaky_relu":
        return (name, rng.choice([0.01, 0.2, -0.3, 1.5]), 0.0)
    if name == "softplus":  # threshold / beta exactly representable: kinks land on it
        return (name, rng.choice([0.5, 1.0, 2.0]), rng.choice([1.0, 2.0, 4.0, 20.0]))
    if name == "elu":
        return (name, rng.choice([0.5, 1.0, 1.7]), 0.0)
    return (name, 0.0, 0.0)


def _kink_point(act: tuple) -> float:
    name, a, b = act
    return b / a if name == "softplus" else 0.0


def _act_text(act: tuple) -> str:
    name, a, b = act
    if name == "leaky_relu":
        return f"LeakyReLU({a})"
    if name == "softplus":
        return f"Softplus(beta={a}, threshold={b})"
    if name == "elu":
        return f"ELU({a})"
    return {"relu": "ReLU", "tanh": "Tanh", "sigmoid": "Sigmoid", "gelu": "GELU",
            "gelu_tanh": "GELU(tanh)", "silu": "SiLU"}[name]


@dataclass
class _Chain:
    """An MLP as drawn: a flat list of items, how they nest, and where kinks go.

    Items: ("linear", d_in, d_out, bias), ("act", spec), ("flatten",), ("identity",),
    ("dropout", p). ``groups`` nests items[i:j] into an inner nn.Sequential for each
    (i, j). ``kinks`` maps a Linear's position among the Linear layers to the number of
    its output rows set to zero weights and a bias on the following activation's kink.
    """

    items: list[tuple]
    in_shape: tuple[int, ...]
    classes: int
    groups: list[tuple[int, int]] = field(default_factory=list)
    kinks: dict[int, int] = field(default_factory=dict)
    zero_sample: bool = False

    def text(self) -> str:
        parts = []
        for item in self.items:
            if item[0] == "linear":
                parts.append(f"Linear({item[1]},{item[2]}{'' if item[3] else ',nobias'})")
            elif item[0] == "act":
                parts.append(_act_text(item[1]))
            elif item[0] == "dropout":
                parts.append(f"Dropout({item[1]})")
            else:
                parts.append(item[0].capitalize())
        text = "[" + ", ".join(parts) + "]"
        extras = []
        if self.groups:
            extras.append(f"nested {self.groups}")
        if self.kinks:
            extras.append(f"kinks {self.kinks}")
        if self.zero_sample:
            extras.append("a zero sample")
        return f"X{self.in_shape} {text}" + (f" ({'; '.join(extras)})" if extras else "")

    def tags(self) -> set[str]:
        tags = set()
        for item in self.items:
            if item[0] == "act":
                tags.add(f"act:{item[1][0]}")
            elif item[0] == "linear" and not item[3]:
                tags.add("mlp:no_bias")
            elif item[0] in ("flatten", "identity", "dropout"):
                tags.add(f"mlp:{item[0]}")
        if self.groups:
            tags.add("mlp:nested")
        for position in self.kinks:
            tags.add(f"kink:{self._activation_after(position)[0]}")
        return tags

    def linear_positions(self) -> list[int]:
        return [i for i, item in enumerate(self.items) if item[0] == "linear"]

    def _activation_after(self, linear: int) -> tuple:
        start = self.linear_positions()[linear]
        for item in self.items[start + 1:]:
            if item[0] == "linear":
                break
            if item[0] == "act":
                return item[1]
        raise AssertionError("no activation after that Linear")

    def build(self, gen: torch.Generator, dtype: torch.dtype, gain: float = 1.2
              ) -> nn.Sequential:
        modules: list[nn.Module] = []
        for item in self.items:
            if item[0] == "linear":
                modules.append(nn.Linear(item[1], item[2], bias=item[3]))
            elif item[0] == "act":
                modules.append(_activation(item[1]))
            elif item[0] == "flatten":
                modules.append(nn.Flatten())
            elif item[0] == "identity":
                modules.append(nn.Identity())
            else:
                modules.append(nn.Dropout(item[1]))
        linears = [m for m in modules if isinstance(m, nn.Linear)]
        top: list[nn.Module] = []
        i = 0
        for start, stop in sorted(self.groups):
            top += modules[i:start]
            top.append(nn.Sequential(*modules[start:stop]))
            i = stop
        top += modules[i:]
        model = nn.Sequential(*top).to(dtype)
        _fill(model, gen, gain)
        with torch.no_grad():
            for position, rows in self.kinks.items():
                layer = linears[position]
                layer.weight[:rows] = 0
                if layer.bias is not None:
                    layer.bias[:rows] = _kink_point(self._activation_after(position))
        return model.eval()

    def batch(self, gen: torch.Generator, batch: int, dtype: torch.dtype
              ) -> tuple[torch.Tensor, torch.Tensor]:
        X = _randn(gen, batch, *self.in_shape).to(dtype)
        if self.zero_sample:
            X[0] = 0
        return X, _labels(gen, batch, self.classes)


def _draw_chain(rng: random.Random, *, kinks: bool | None = None, min_depth: int = 1,
                square_hidden: bool = False) -> _Chain:
    """A random MLP: 1-4 Linear layers of widths 1-12, 2-6 classes, activations between
    them (sometimes before the first and after the last), Flatten, Identity, eval-mode
    Dropout and nesting."""
    depth = rng.randint(max(min_depth, 2 if square_hidden else 1), 4)
    classes = rng.randint(2, 6)
    if rng.random() < 0.2:
        in_shape: tuple[int, ...] = (rng.randint(1, 3), rng.randint(1, 4))
        features = in_shape[0] * in_shape[1]
    else:
        features = rng.randint(1, 12)
        in_shape = (features,)
    widths = [features] + [rng.randint(1, 12) for _ in range(depth - 1)] + [classes]
    if square_hidden:
        widths[1] = widths[0]  # a square weight for parametrizations that need one
    items: list[tuple] = []
    if len(in_shape) > 1:
        items.append(("flatten",))
    if rng.random() < 0.1:
        items.append(("act", _draw_activation(rng)))
    for i in range(depth):
        items.append(("linear", widths[i], widths[i + 1], rng.random() < 0.75))
        last = i == depth - 1
        if rng.random() < 0.1:
            items.append(rng.choice([("identity",), ("dropout", 0.3)]))
        if (not last and rng.random() < 0.85) or (last and rng.random() < 0.1):
            items.append(("act", _draw_activation(rng)))
        if rng.random() < 0.1:
            items.append(rng.choice([("identity",), ("dropout", 0.5)]))
    chain = _Chain(items, in_shape, classes)
    if rng.random() < 0.35 and len(items) >= 2:
        start = rng.randrange(len(items) - 1)
        chain.groups = [(start, rng.randint(start + 1, len(items)))]
    if kinks if kinks is not None else rng.random() < 0.3:
        linear_at = chain.linear_positions()
        for position, start in enumerate(linear_at):
            following = items[start + 1:linear_at[position + 1]] if position + 1 < len(
                linear_at) else items[start + 1:]
            acts = [item[1] for item in following if item[0] == "act"]
            # without a bias the kink must sit at z = 0
            if acts and acts[0][0] in KINKED and (items[start][3] or
                                                   _kink_point(acts[0]) == 0.0):
                chain.kinks[position] = rng.randint(1, items[start][2])
        chain.zero_sample = rng.random() < 0.3
    return chain


def _draw_kinked_chain(rng: random.Random) -> _Chain:
    """A chain whose hidden activation has a kink and a bias, with kinks placed."""
    act = _draw_activation(rng, rng.choice(KINKED))
    features, hidden, classes = rng.randint(1, 6), rng.randint(1, 8), rng.randint(2, 5)
    items = [("linear", features, hidden, True), ("act", act),
             ("linear", hidden, classes, rng.random() < 0.5)]
    return _Chain(items, (features,), classes, kinks={0: rng.randint(1, hidden)},
                  zero_sample=rng.random() < 0.3)


# ---------------------------------------------------------------------------- programs


def _constant_op(form: str, x: torch.Tensor, c: float, offset: torch.Tensor | None
                 ) -> torch.Tensor:
    """One operation with a number (or a constant tensor) inside a traced forward."""
    if form == "x+c":
        return x + c
    if form == "c+x":
        return c + x
    if form == "x-c":
        return x - c
    if form == "c-x":
        return c - x
    if form == "x*c":
        return x * c
    if form == "c*x":
        return c * x
    if form == "x/c":
        return x / c
    if form == "norm":
        return (x - 0.5) / 0.25
    if form == "neg":
        return -x
    if form == "torch.add":
        return torch.add(x, c)
    if form == "torch.mul":
        return torch.mul(x, c)
    if form == "x.add":
        return x.add(c)
    if form == "x+c-c":  # not the identity in floating point
        return x + c - c
    if form == "x*x":
        return x * x
    if form == "buffer":
        return x + offset
    raise AssertionError(form)


def _function_activation(kind: str, x: torch.Tensor) -> torch.Tensor:
    """Activations called as functions or methods inside a traced forward."""
    if kind == "F.relu":
        return F.relu(x)
    if kind == "torch.tanh":
        return torch.tanh(x)
    if kind == "F.gelu":
        return F.gelu(x)
    if kind == "F.gelu_tanh":
        return F.gelu(x, approximate="tanh")
    if kind == "F.silu":
        return F.silu(x)
    if kind == "method_relu":
        return x.relu()
    if kind == "torch.sigmoid":
        return torch.sigmoid(x)
    raise AssertionError(kind)


class Program(nn.Module):
    """A model whose forward runs a list of steps over its modules: ("mod", i) calls
    module i, ("fn", kind) an activation function, ("const", form, c) an operation with
    a number, ("push",) / ("add_pop",) a residual connection, ("flatten", how) one of the
    flattening idioms. torch.fx unrolls the loop, so the engine sees a plain graph."""

    def __init__(self, mods: Sequence[nn.Module], steps: Sequence[tuple],
                 offset: torch.Tensor | None = None):
        super().__init__()
        self.mods = nn.ModuleList(mods)
        self.steps = list(steps)
        if offset is not None:
            self.register_buffer("offset", offset)
        else:
            self.offset = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        saved = []
        for step in self.steps:
            if step[0] == "mod":
                x = self.mods[step[1]](x)
            elif step[0] == "fn":
                x = _function_activation(step[1], x)
            elif step[0] == "const":
                x = _constant_op(step[1], x, step[2], self.offset)
            elif step[0] == "push":
                saved.append(x)
            elif step[0] == "add_pop":
                x = x + saved.pop()
            elif step[0] == "flatten":
                if step[1] == "view":
                    x = x.view(x.size(0), -1)
                elif step[1] == "torch":
                    x = torch.flatten(x, 1)
                else:
                    x = x.reshape(x.shape[0], -1)
        return x


def _conv_out(size: int, kernel: int, stride: int, padding, dilation: int) -> int:
    if padding == "same":
        return size
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


@dataclass
class _ConvPlan:
    """A small convnet as drawn: module constructors and the program's steps."""

    dim: int
    in_shape: tuple[int, ...]
    classes: int
    makers: list[Callable[[], nn.Module]]
    steps: list[tuple]
    words: list[str]
    tags: set[str]
    bad_bn: str = ""          # "", "nan", "negative", "tiny_negative", "zero"
    bn_train: bool = False

    def build(self, gen: torch.Generator, dtype: torch.dtype) -> Program:
        model = Program([make() for make in self.makers], self.steps).to(dtype)
        _fill(model, gen, 1.3)
        bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if self.bad_bn and bns:
            with torch.no_grad():
                var = bns[0].running_var
                var[0] = {"nan": math.nan, "negative": -0.5, "tiny_negative": -1e-6,
                          "zero": 0.0}[self.bad_bn]
        model.eval()
        if self.bn_train and bns:
            bns[0].train()
        return model

    def text(self) -> str:
        extra = f" (running_var[0] {self.bad_bn})" if self.bad_bn else ""
        extra += " (BatchNorm in training mode)" if self.bn_train else ""
        return f"X{self.in_shape} [" + ", ".join(self.words) + "]" + extra


def _draw_convnet(rng: random.Random, *, dim: int | None = None, allow_bad: bool = True
                  ) -> _ConvPlan:
    """A tiny convnet: 1-3 blocks of Conv (stride, padding incl. 'same', dilation, groups,
    depthwise, bias or not), sometimes BatchNorm (eval, random statistics), an activation
    (module or function), a residual addition, a product with a number and pooling; then a
    flattening idiom and a Linear head."""
    dim = dim or (2 if rng.random() < 0.7 else 1)
    channels = rng.randint(1, 4)
    spatial = [rng.randint(4, 7) for _ in range(dim)]
    in_shape = (channels, *spatial)
    classes = rng.randint(2, 6)
    makers: list[Callable[[], nn.Module]] = []
    steps: list[tuple] = []
    words: list[str] = []
    tags = {f"conv:{dim}d"}
    conv_type = nn.Conv2d if dim == 2 else nn.Conv1d
    bn_type = nn.BatchNorm2d if dim == 2 else nn.BatchNorm1d

    def add(make: Callable[[], nn.Module], word: str) -> None:
        steps.append(("mod", len(makers)))
        makers.append(make)
        words.append(word)

    has_bn = False
    for _ in range(rng.randint(1, 3)):
        for _attempt in range(20):
            kernel = rng.choice([1, 2, 3])
            stride = rng.choice([1, 1, 2])
            dilation = rng.choice([1, 1, 2])
            padding = rng.choice([0, 1, "same"]) if stride == 1 else rng.choice([0, 1])
            residual = stride == 1 and rng.random() < 0.3
            if residual:
                padding = "same"
                if dilation * (kernel - 1) % 2:
                    kernel = 3
            groups_kind = rng.choice(["plain", "plain", "groups", "depthwise"])
            if groups_kind == "depthwise":
                out_channels, groups = channels * rng.choice([1, 2]), channels
            elif groups_kind == "groups":
                out_channels = rng.randint(1, 4)
                common = [g for g in range(2, 5) if channels % g == 0 and out_channels % g == 0]
                groups = rng.choice(common) if common else 1
            else:
                out_channels, groups = rng.randint(1, 4), 1
            if residual:
                out_channels = channels
                if channels % groups:
                    groups = 1
            new = [_conv_out(s, kernel, stride, padding, dilation) for s in spatial]
            if min(new) >= 1:
                break
        else:
            raise AssertionError("no valid convolution drawn")
        bias = rng.random() < 0.75
        if residual:
            steps.append(("push",))
        add(lambda c=channels, o=out_channels, k=kernel, s=stride, p=padding, d=dilation,
            g=groups, b=bias: conv_type(c, o, k, stride=s, padding=p, dilation=d, groups=g,
                                        bias=b),
            f"Conv{dim}d({channels},{out_channels},k={kernel},s={stride},p={padding},"
            f"d={dilation},g={groups}{'' if bias else ',nobias'})")
        tags |= {"conv:stride"} if stride > 1 else set()
        tags |= {"conv:same"} if padding == "same" else set()
        tags |= {"conv:dilation"} if dilation > 1 else set()
        tags |= {"conv:no_bias"} if not bias else set()
        if groups > 1:
            tags.add("conv:depthwise" if groups_kind == "depthwise" else "conv:groups")
        if rng.random() < 0.4:
            add(lambda o=out_channels: bn_type(o), f"BatchNorm{dim}d")
            tags.add(f"bn:{dim}d")
            has_bn = True
        if rng.random() < 0.85:
            if rng.random() < 0.5:
                act = _draw_activation(rng)
                add(lambda a=act: _activation(a), _act_text(act))
                tags.add(f"act:{act[0]}")
            else:
                kind = rng.choice(["F.relu", "torch.tanh", "F.gelu", "F.gelu_tanh", "F.silu",
                                   "method_relu", "torch.sigmoid"])
                steps.append(("fn", kind))
                words.append(kind)
                tags.add(f"fn:{kind}")
        if residual:
            steps.append(("add_pop",))
            words.append("+residual")
            tags.add("residual")
        if rng.random() < 0.2:
            form, c = rng.choice([("x*c", 0.5), ("x/c", 3.0)])
            steps.append(("const", form, c))
            words.append(form.replace("c", str(c)))
            tags.add("scale:mul" if form == "x*c" else "scale:div")
        channels, spatial = out_channels, new
        if dim == 2 and rng.random() < 0.35:
            pool = rng.choice(["max", "avg", "adaptive", "F.max_pool2d"])
            if pool == "adaptive":
                out = rng.choice([1, 2])
                add(lambda o=out: nn.AdaptiveAvgPool2d(o), f"AdaptiveAvgPool2d({out})")
                spatial = [out, out]
                tags.add("pool:adaptive")
            elif min(spatial) >= 2:
                kernel, stride = rng.choice([(2, 2), (2, 1), (3, 2)]) if min(spatial) >= 3 \
                    else (2, rng.choice([1, 2]))
                padding = rng.choice([0, 1]) if kernel == 3 else 0
                if pool == "max":
                    add(lambda k=kernel, s=stride, p=padding: nn.MaxPool2d(k, s, p),
                        f"MaxPool2d({kernel},{stride},{padding})")
                elif pool == "avg":
                    add(lambda k=kernel, s=stride, p=padding: nn.AvgPool2d(k, s, p),
                        f"AvgPool2d({kernel},{stride},{padding})")
                else:  # F.max_pool2d(x, 2), the functional form
                    add(_FunctionalMaxPool, "F.max_pool2d(2)")
                    kernel, stride, padding = 2, 2, 0
                spatial = [(s + 2 * padding - kernel) // stride + 1 for s in spatial]
                tags.add("pool:avg" if pool == "avg" else "pool:max")
    how = rng.choice(["module", "view", "torch", "reshape"])
    if how == "module":
        add(nn.Flatten, "Flatten")
    else:
        steps.append(("flatten", how))
        words.append({"view": "x.view(x.size(0), -1)", "torch": "torch.flatten(x, 1)",
                      "reshape": "x.reshape(x.shape[0], -1)"}[how])
    tags.add("flatten:" + {"module": "module", "torch": "torch"}.get(how, "view"))
    features = channels * math.prod(spatial)
    if rng.random() < 0.15:
        add(lambda f=features: nn.BatchNorm1d(f), "BatchNorm1d")
        tags.add("bn:1d")
        has_bn = True
    if rng.random() < 0.3:
        hidden = rng.randint(2, 8)
        act = _draw_activation(rng)
        add(lambda f=features, h=hidden: nn.Linear(f, h), f"Linear({features},{hidden})")
        add(lambda a=act: _activation(a), _act_text(act))
        tags.add(f"act:{act[0]}")
        features = hidden
    add(lambda f=features, c=classes: nn.Linear(f, c), f"Linear({features},{classes})")
    plan = _ConvPlan(dim, in_shape, classes, makers, steps, words, tags)
    if has_bn and allow_bad and rng.random() < 0.35:
        if rng.random() < 0.25:
            plan.bn_train = True
            tags.add("bn:train")
        else:
            plan.bad_bn = rng.choice(["nan", "negative", "tiny_negative", "zero"])
            tags.add("bn:bad_stats")
    return plan


class _FunctionalMaxPool(nn.Module):
    """F.max_pool2d called as a function in a traced forward (not a module the engine
    reads: fx traces into this module and records the function)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(x, 2)


def _conv_batch(plan: _ConvPlan, gen: torch.Generator, batch: int, dtype: torch.dtype
                ) -> tuple[torch.Tensor, torch.Tensor]:
    return _randn(gen, batch, *plan.in_shape).to(dtype), _labels(gen, batch, plan.classes)


def _bad_bn_reason(plan: _ConvPlan) -> str:
    if plan.bn_train:
        return "a BatchNorm in training mode is refused (curvature is of the eval-mode function)"
    if plan.bad_bn in ("nan", "negative", "tiny_negative"):
        return f"a {plan.bad_bn.replace('_', ' ')} BatchNorm running_var is refused"
    return ""


# ---------------------------------------------------------------------------- common draws


@dataclass
class _Settings:
    """What every case draws besides its model: dtype, curvature, reduction, L2, k,
    backend."""

    dtype: torch.dtype
    curvature: str
    reduction: str
    weight_decay: float
    k: int
    vector_form: bool
    backend: str
    batch: int

    def kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"reduction": self.reduction, "weight_decay": self.weight_decay}
        if self.backend != "auto":
            kwargs["backend"] = self.backend
        return kwargs

    def text(self) -> str:
        dtype = "float32" if self.dtype == torch.float32 else "float64"
        form = " as a vector" if self.vector_form else ""
        return (f"{dtype} {self.curvature} {self.reduction} wd={self.weight_decay:g} "
                f"k={self.k}{form} backend={self.backend} batch={self.batch}")

    def tags(self) -> set[str]:
        tags = {f"dtype:{'float32' if self.dtype == torch.float32 else 'float64'}",
                f"curvature:{self.curvature}", f"reduction:{self.reduction}", f"k:{self.k}",
                f"backend:{self.backend}"}
        if self.weight_decay:
            tags.add("weight_decay")
        return tags


def _draw_settings(rng: random.Random) -> _Settings:
    k = rng.choice([1, 3])
    return _Settings(dtype=torch.float32 if rng.random() < 0.25 else torch.float64,
                     curvature=rng.choice(["ggn", "hessian"]),
                     reduction=rng.choice(["mean", "mean", "sum"]),
                     weight_decay=0.0 if rng.random() < 0.7 else rng.choice([1e-3, 0.05]),
                     k=k, vector_form=k == 1 and rng.random() < 0.5,
                     backend="fused" if rng.random() < 0.15 else "auto",
                     batch=rng.randint(1, 9))


def _case(seed: int, family: str, words: str, settings: _Settings, make: Callable[[], Built],
          tags: set[str], **extra: Any) -> Case:
    return Case(seed=seed, family=family, description=f"{family}: {words}; {settings.text()}",
                build=_build_quietly(make), curvature=settings.curvature,
                dtype=settings.dtype, k=settings.k, vector_form=settings.vector_form,
                tags=frozenset(tags | settings.tags()), **extra)


# ---------------------------------------------------------------------------- families


def _mlp_case(seed: int, rng: random.Random, s: _Settings) -> Case:
    """MLP chains, with edges: kinks hit exactly, confident logits (large weights), one
    activation or Linear object used twice, Dropout left in training mode, int32 labels,
    an X that requires grad."""
    chain = _draw_kinked_chain(rng) if rng.random() < 0.25 else _draw_chain(rng)
    edge = rng.choice(["none"] * 6 + ["confident", "reuse_activation", "reuse_linear",
                                      "dropout_train", "int32_labels", "x_requires_grad"])
    gain = 6.0 if edge == "confident" else 1.2
    width = rng.randint(1, 6)

    def make() -> Built:
        gen = torch.Generator().manual_seed(seed)
        model: nn.Module = chain.build(gen, s.dtype, gain)
        X, y = chain.batch(gen, s.batch, s.dtype)
        if edge == "reuse_activation":  # the same object runs twice: two activations
            act = nn.Tanh()
            hidden = nn.Linear(chain.classes, width).to(s.dtype)
            out = nn.Linear(width, chain.classes).to(s.dtype)
            _fill(hidden, gen, 1.2)
            _fill(out, gen, 1.2)
            model = nn.Sequential(*model, act, hidden, act, out).eval()
        elif edge == "reuse_linear":  # a square Linear applied twice: shared parameters
            square = nn.Linear(chain.classes, chain.classes).to(s.dtype)
            _fill(square, gen, 1.0)
            model = nn.Sequential(*model, nn.Tanh(), square, nn.Tanh(), square).eval()
        elif edge == "dropout_train":
            model = nn.Sequential(*model, nn.Dropout(0.5))
        elif edge == "int32_labels":
            y = y.int()
        elif edge == "x_requires_grad":
            X.requires_grad_(True)
        return Built(model, (X, y), s.kwargs())

    words = {"none": "", "confident": "; weights x5 (confident logits)",
             "reuse_activation": "; then Tanh, Linear, the same Tanh object, Linear",
             "reuse_linear": "; then one square Linear applied twice (shared parameters)",
             "dropout_train": "; then Dropout(0.5) in training mode",
             "int32_labels": "; int32 labels", "x_requires_grad": "; X requires grad"}[edge]
    return _case(seed, "mlp", chain.text() + words, s, make, chain.tags() | {f"edge:{edge}"},
                 must_raise="Dropout in training mode is refused (curvature is of the "
                            "eval-mode function)" if edge == "dropout_train" else "")


def _convnet_case(seed: int, rng: random.Random, s: _Settings) -> Case:
    plan = _draw_convnet(rng)

    def make() -> Built:
        gen = torch.Generator().manual_seed(seed)
        model = plan.build(gen, s.dtype)
        return Built(model, _conv_batch(plan, gen, s.batch, s.dtype), s.kwargs())

    return _case(seed, "convnet", plan.text(), s, make, set(plan.tags),
                 must_raise=_bad_bn_reason(plan))


_AFFINE_FORMS = ("x+c", "c+x", "x-c", "c-x", "x*c", "x/c", "norm")
_CONSTANT_FORMS = ("x+c", "c+x", "x-c", "c-x", "x*c", "c*x", "x/c", "norm", "neg",
                   "torch.add", "torch.mul", "x.add", "x+c-c", "x*x", "buffer")


def _constants_case(seed: int, rng: random.Random, s: _Settings) -> Case:
    """A forward that computes with constants: before the first layer, between layers or
    on the logits; c small (1e-4) or large (10), so a dropped or misplaced constant shows."""
    features, classes = rng.randint(1, 8), rng.randint(2, 6)
    depth = rng.randint(1, 3)
    widths = [features] + [rng.randint(2, 8) for _ in range(depth - 1)] + [classes]
    acts = [_draw_activation(rng) for _ in range(depth - 1)]
    makers: list[Callable[[], nn.Module]] = []
    steps: list[tuple] = []
    words: list[str] = []
    tags: set[str] = set()
    slots = list(range(depth + 1))  # before layer i, or (depth) on the logits
    chosen = sorted(rng.sample(slots, rng.randint(1, min(3, len(slots)))))
    offset_needed = False
    for i in range(depth + 1):
        if i in chosen:
            # mostly the affine forms the graph engine computes itself
            form = rng.choice(_AFFINE_FORMS if rng.random() < 0.7 else _CONSTANT_FORMS)
            size = rng.choice(["small", "large", "other"])
            c = {"small": rng.choice([1e-4, -1e-4]), "large": rng.choice([10.0, -10.0]),
                 "other": rng.choice([0.5, 3.0, 1e-8])}[size]
            steps.append(("const", form, c))
            words.append(f"{form} (c={c:g})" if form not in ("norm", "neg", "x*x") else form)
            tags |= {f"const:{form}", f"const:{size}"}
            offset_needed |= form == "buffer"
        if i == depth:
            break
        steps.append(("mod", len(makers)))
        makers.append(lambda a=widths[i], b=widths[i + 1]: nn.Linear(a, b))
        words.append(f"Linear({widths[i]},{widths[i + 1]})")
        if i < depth - 1:
            if rng.random() < 0.5:
                steps.append(("mod", len(makers)))
                makers.append(lambda a=acts[i]: _activation(a))
                words.append(_act_text(acts[i]))
                tags.add(f"act:{acts[i][0]}")
            else:
                kind = rng.choice(["F.relu", "torch.tanh", "F.gelu", "F.silu", "method_relu"])
                steps.append(("fn", kind))
                words.append(kind)
                tags.add(f"fn:{kind}")

    def make() -> Built:
        gen = torch.Generator().manual_seed(seed)
        offset = _randn(gen, 1) * 0.1 if offset_needed else None
        model = Program([m() for m in makers], steps,
                        None if offset is None else offset.to(s.dtype)).to(s.dtype)
        _fill(model, gen, 1.2)
        X = _randn(gen, s.batch, features).to(s.dtype)
        return Built(model.eval(), (X, _labels(gen, s.batch, classes)), s.kwargs())

    return _case(seed, "constants", f"X({features},) [" + ", ".join(words) + "]", s, make, tags)


class NormalizingSequential(nn.Sequential):
    """Normalises its input, then runs the chain."""

    def __init__(self, *modules: nn.Module, mean: float = 0.0, std: float = 1.0):
        super().__init__(*modules)
        self.mean, self.std = mean, std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward((x - self.mean) / self.std)


class ScaledOutputSequential(nn.Sequential):
    """Runs the chain, then scales and shifts the logits."""

    def __init__(self, *modules: nn.Module, scale: float = 1.0, shift: float = 0.0):
        super().__init__(*modules)
        self.scale, self.shift = scale, shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * self.scale + self.shift


class SkippingSequential(nn.Sequential):
    """Runs every module but the first: that layer's parameters have no curvature."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for module in list(self)[1:]:
            x = module(x)
        return x


class CallingSequential(nn.Sequential):
    """Overrides __call__ rather than forward: the call doubles the logits."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return super().__call__(x) * 2.0


class ScaledLinear(nn.Linear):
    """A Linear layer whose forward scales its output."""

    def __init__(self, *args: Any, scale: float = 1.0, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * self.scale


class PlainLinear(nn.Linear):
    """A Linear subclass that changes nothing."""


class DoubledTanh(nn.Tanh):
    """A Tanh subclass whose forward doubles it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x) * 2.0


class Wrapper(nn.Module):
    """A module whose forward is a chain plus extra operations."""

    def __init__(self, body: nn.Module, mode: str, skip: nn.Module | None = None):
        super().__init__()
        self.body, self.mode, self.skip = body, mode, skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "half":
            return self.body(x) * 0.5
        if self.mode == "shift_input":
            return self.body(x + 1.0)
        if self.mode == "tanh_logits":
            return torch.tanh(self.body(x)) * 3.0
        return self.body(x) + self.skip(x)  # "skip": a linear shortcut to the logits


def _doubled_forward(self: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    return nn.Sequential.forward(self, x) * 2.0


_SUBCLASS_VARIANTS = ("norm_seq", "add_seq", "skip_seq", "call_seq", "scaled_linear",
                      "plain_linear", "doubled_tanh", "wrapper", "instance_forward")


def _subclass_case(seed: int, rng: random.Random, s: _Settings) -> Case:
    """Subclassed forwards: the model's function is its own forward, not the chain."""
    variant = rng.choice(_SUBCLASS_VARIANTS)
    chain = _draw_chain(rng, min_depth=2 if variant == "skip_seq" else 1)
    if variant == "skip_seq":  # the first Linear is skipped: its output width must be its input's
        first = chain.linear_positions()[0]
        lin = chain.items[first]
        second = chain.linear_positions()[1]
        chain.items = [("linear", lin[1], lin[1], lin[3])] + [
            ("act", _draw_activation(rng))] + [("linear", lin[1]) + chain.items[second][2:]] + \
            chain.items[second + 1:]
        chain.in_shape, chain.groups, chain.kinks = (lin[1],), [], {}
    mean, std = rng.choice([0.5, -2.0, 1e-4]), rng.choice([0.25, 3.0])
    scale, shift = rng.choice([2.0, 0.5, -1.0]), rng.choice([0.0, 0.1])
    wrapper_mode = rng.choice(["half", "shift_input", "tanh_logits", "skip"])

    def make() -> Built:
        gen = torch.Generator().manual_seed(seed)
        base = chain.build(gen, s.dtype)
        modules = list(base)
        if variant == "norm_seq":
            model: nn.Module = NormalizingSequential(*modules, mean=mean, std=std)
        elif variant == "add_seq":
            model = ScaledOutputSequential(*modules, scale=scale, shift=shift)
        elif variant == "skip_seq":
            model = SkippingSequential(*modules)
        elif variant == "call_seq":
            model = CallingSequential(*modules)
        elif variant in ("scaled_linear", "plain_linear"):
            model = _replace_linear(base, variant, scale)
        elif variant == "doubled_tanh":
            model = nn.Sequential(*modules[:-1], DoubledTanh(), modules[-1]) if len(
                modules) > 1 else nn.Sequential(DoubledTanh(), *modules)
        elif variant == "wrapper":
            skip = nn.Linear(math.prod(chain.in_shape), chain.classes).to(s.dtype)
            _fill(skip, gen, 1.0)
            flat = nn.Sequential(nn.Flatten(), skip) if len(chain.in_shape) > 1 else skip
            model = Wrapper(base, wrapper_mode, flat if wrapper_mode == "skip" else None)
        else:
            model = base
            model.forward = types.MethodType(_doubled_forward, model)
        model = model.to(s.dtype).eval()
        return Built(model, chain.batch(gen, s.batch, s.dtype), s.kwargs())

    words = {"norm_seq": f"Sequential subclass normalising (x - {mean}) / {std}",
             "add_seq": f"Sequential subclass returning chain(x) * {scale} + {shift}",
             "skip_seq": "Sequential subclass skipping its first Linear",
             "call_seq": "Sequential subclass overriding __call__ (logits * 2)",
             "scaled_linear": f"a Linear subclass scaling its output by {scale}",
             "plain_linear": "a Linear subclass with no override",
             "doubled_tanh": "a Tanh subclass returning 2 tanh(x)",
             "wrapper": f"a Module wrapping the chain ({wrapper_mode})",
             "instance_forward": "forward replaced on the instance (logits * 2)"}[variant]
    tags = chain.tags() | {f"subclass:{variant}"}
    return _case(seed, "subclass", f"{words} of {chain.text()}", s, make, tags)


def _replace_linear(model: nn.Sequential, variant: str, scale: float) -> nn.Sequential:
    """The same chain with its first Linear replaced by a subclass holding the same
    weights (searching nested Sequentials)."""
    for container in model.modules():
        if not isinstance(container, nn.Sequential):
            continue
        for name, child in container._modules.items():
            if type(child) is nn.Linear:
                new = (ScaledLinear(child.in_features, child.out_features,
                                    bias=child.bias is not None, scale=scale)
                       if variant == "scaled_linear" else
                       PlainLinear(child.in_features, child.out_features,
                                   bias=child.bias is not None))
                new = new.to(child.weight.dtype)
                new.load_state_dict(child.state_dict())
                container._modules[name] = new
                return model
    raise AssertionError("no Linear layer")


def _scale_output(m: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
    return output * 2.0


def _shift_output(m: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
    return output + 0.1


def _tanh_output(m: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
    return torch.tanh(output)


def _scale_output_in_place(m: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
    output.mul_(2.0)


def _observe(m: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
    return None


def _scale_input(m: nn.Module, inputs: tuple) -> tuple:
    return (inputs[0] * 0.5,)


def _shift_input_single(m: nn.Module, inputs: tuple) -> torch.Tensor:
    return inputs[0] + 0.1


def _observe_input(m: nn.Module, inputs: tuple) -> None:
    return None


def _scale_output_kwargs(m: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor
                         ) -> torch.Tensor:
    return output * 1.5


def _global_scale_linear(m: nn.Module, inputs: tuple, output: Any) -> Any:
    return output * 1.5 if isinstance(m, nn.Linear) else None


def _global_shift_linear_input(m: nn.Module, inputs: tuple) -> Any:
    return (inputs[0] + 0.25,) if isinstance(m, nn.Linear) else None


_HOOK_VARIANTS = {
    # name: (registration, hook, tag, whether it changes the function)
    "forward_scale": ("forward", _scale_output, "hook:forward", True),
    "forward_shift": ("forward", _shift_output, "hook:forward", True),
    "forward_tanh": ("forward", _tanh_output, "hook:forward", True),
    "forward_kwargs": ("forward_kwargs", _scale_output_kwargs, "hook:forward", True),
    "forward_none": ("forward", _observe, "hook:none", False),
    "forward_in_place": ("forward", _scale_output_in_place, "hook:forward", True),
    "pre_scale": ("pre", _scale_input, "hook:pre", True),
    "pre_single": ("pre", _shift_input_single, "hook:pre", True),
    "pre_none": ("pre", _observe_input, "hook:none", False),
    "removed": ("removed", _scale_output, "hook:removed", False),
    "global_forward": ("global_forward", _global_scale_linear, "hook:global_forward", True),
    "global_forward_none": ("global_forward", _observe, "hook:global_forward", False),
    "global_pre": ("global_pre", _global_shift_linear_input, "hook:global_pre", True),
    "global_pre_none": ("global_pre", _observe_input, "hook:global_pre", False),
}


def _attach_hook(model: nn.Module, variant: str, target_index: int) -> list[tuple[str, Callable]]:
    """Registers a hook variant on the ``target_index``-th module of ``model`` (modulo the
    count, the model itself included); returns the global hooks to register."""
    kind, hook, _, _ = _HOOK_VARIANTS[variant]
    if kind.startswith("global"):
        return [(kind, hook)]
    modules = list(model.modules())
    if variant == "forward_in_place":  # autograd allows writing a Linear's output in place
        modules = [m for m in modules if type(m) in (nn.Linear, nn.Conv1d, nn.Conv2d)]
    target = modules[target_index % len(modules)]
    if kind == "forward":
        target.register_forward_hook(hook)
    elif kind == "forward_kwargs":
        target.register_forward_hook(hook, with_kwargs=True)
    elif kind == "pre":
        target.register_forward_pre_hook(hook)
    else:
        target.register_forward_hook(hook).remove()
    return []


def _hooks_case(seed: int, rng: random.Random, s: _Settings) -> Case:
    """Forward hooks and pre-hooks on a module, the model or globally."""
    variant = rng.choice(sorted(_HOOK_VARIANTS))
    target = rng.randrange(12)
    if rng.random() < 0.7:
        chain = _draw_chain(rng)
        text, tags = chain.text(), chain.tags()

        def build_model(gen: torch.Generator) -> tuple[nn.Module, tuple]:
            return chain.build(gen, s.dtype), chain.batch(gen, s.batch, s.dtype)
    else:
        plan = _draw_convnet(rng, allow_bad=False)
        text, tags = plan.text(), set(plan.tags)

        def build_model(gen: torch.Generator) -> tuple[nn.Module, tuple]:
            return plan.build(gen, s.dtype), _conv_batch(plan, gen, s.batch, s.dtype)

    def make() -> Built:
        gen = torch.Generator().manual_seed(seed)
        model, data = build_model(gen)
        global_hooks = _attach_hook(model, variant, target)
        return Built(model, data, s.kwargs(), global_hooks=global_hooks)

    where = "" if variant.startswith("global") else f" on module #{target} (mod count)"
    tags = tags | {_HOOK_VARIANTS[variant][2]}
    return _case(seed, "hooks", f"{variant} hook{where} of {text}", s, make, tags)


class _Scale2(nn.Module):
    def forward(self, X: torch.Tensor) -> torch.Tensor:
        return X * 2


class _Symmetric(nn.Module):
    def forward(self, X: torch.Tensor) -> torch.Tensor:
        return X.triu() + X.triu(1).transpose(-1, -2)


class _Cayley(nn.Module):
    """An orthogonal matrix from a square one: (I + A)^-1 (I - A), A = X - X^T."""

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        A = X - X.transpose(-1, -2)
        eye = torch.eye(X.shape[-1], dtype=X.dtype, device=X.device)
        return torch.linalg.solve(eye + A, eye - A)


class _NormalizeRows(nn.Module):
    def forward(self, X: torch.Tensor) -> torch.Tensor:
        dims = tuple(range(1, X.dim()))
        return X / (X.square().sum(dim=dims, keepdim=True) + 1.0).sqrt()


class _Shift(nn.Module):
    def forward(self, X: torch.Tensor) -> torch.Tensor:
        return X + 0.5


_PARAM_VARIANTS = ("scale2", "symmetric", "orthogonal", "normalize", "bias_shift",
                   "identity", "chained", "conv")


def _parametrize_case(seed: int, rng: random.Random, s: _Settings) -> Case:
    """torch.nn.utils.parametrize on a weight: the parameters become the originals."""
    variant = rng.choice(_PARAM_VARIANTS)
    square = variant in ("symmetric", "orthogonal")
    if variant == "conv":
        plan = _draw_convnet(rng, allow_bad=False)
        conv_map = rng.choice(["scale2", "normalize"])
        text, tags = f"{conv_map} on the first conv weight of {plan.text()}", set(plan.tags)
    else:
        chain = _draw_chain(rng, square_hidden=square)
        text, tags = f"{variant} on the first Linear of {chain.text()}", chain.tags()

    def make() -> Built:
        gen = torch.Generator().manual_seed(seed)
        if variant == "conv":
            model: nn.Module = plan.build(gen, s.dtype)
            data = _conv_batch(plan, gen, s.batch, s.dtype)
            conv = next(m for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d)))
            parametrize.register_parametrization(
                conv, "weight", _Scale2() if conv_map == "scale2" else _NormalizeRows())
            return Built(model, data, s.kwargs())
        model = chain.build(gen, s.dtype)
        data = chain.batch(gen, s.batch, s.dtype)
        layer = next(m for m in model.modules() if isinstance(m, nn.Linear))
        if variant == "bias_shift" and layer.bias is None:
            layer = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
        if variant == "scale2":
            parametrize.register_parametrization(layer, "weight", _Scale2())
        elif variant == "symmetric":
            parametrize.register_parametrization(layer, "weight", _Symmetric())
        elif variant == "orthogonal":
            parametrize.register_parametrization(layer, "weight", _Cayley())
        elif variant == "normalize":
            parametrize.register_parametrization(layer, "weight", _NormalizeRows())
        elif variant == "bias_shift" and layer.bias is not None:
            parametrize.register_parametrization(layer, "bias", _Shift())
        elif variant == "bias_shift":
            parametrize.register_parametrization(layer, "weight", _Shift())
        elif variant == "identity":  # harmless: the weight is its original
            parametrize.register_parametrization(layer, "weight", nn.Identity())
        else:
            parametrize.register_parametrization(layer, "weight", _Scale2())
            parametrize.register_parametrization(layer, "weight", _NormalizeRows())
        return Built(model, data, s.kwargs())

    tags = tags | {f"param:{variant}"}
    return _case(seed, "parametrize", text, s, make, tags)


def _memory_format_case(seed: int, rng: random.Random, s: _Settings) -> Case:
    """channels_last models and inputs, and non-contiguous inputs (transposed, sliced,
    expanded views)."""
    if rng.random() < 0.7:
        plan = _draw_convnet(rng, dim=2, allow_bad=False)
        # x.view(x.size(0), -1) fails in torch itself on a channels_last activation: a
        # broken model, not a test of pyflat
        plan.steps = [("flatten", "reshape") if step == ("flatten", "view") else step
                      for step in plan.steps]
        plan.words = [w.replace("x.view(x.size(0), -1)", "x.reshape(x.shape[0], -1)")
                      for w in plan.words]
        model_cl = rng.random() < 0.5
        layout = rng.choice(["channels_last", "transposed", "sliced", "batch_sliced",
                             "contiguous"])
        if not model_cl and layout == "contiguous":
            layout = "channels_last"
        words = (f"{'channels_last model, ' if model_cl else ''}{layout} X of "
                 f"{plan.text()}")
        tags = set(plan.tags)
        if model_cl:
            tags.add("layout:channels_last_model")
        tags.add({"channels_last": "layout:channels_last_input", "transposed":
                  "layout:transposed", "sliced": "layout:sliced",
                  "batch_sliced": "layout:sliced", "contiguous": "layout:contiguous"}[layout])

        def make() -> Built:
            gen = torch.Generator().manual_seed(seed)
            model = plan.build(gen, s.dtype)
            if model_cl:
                model = model.to(memory_format=torch.channels_last)
            B, (C, H, W) = s.batch, plan.in_shape
            if layout == "channels_last":
                X = _randn(gen, B, C, H, W).to(s.dtype).to(memory_format=torch.channels_last)
            elif layout == "transposed":
                X = _randn(gen, B, C, W, H).to(s.dtype).transpose(2, 3)
            elif layout == "sliced":
                X = _randn(gen, B, C, H, 2 * W).to(s.dtype)[..., ::2]
            elif layout == "batch_sliced":
                X = _randn(gen, 2 * B, C, H, W).to(s.dtype)[1::2]
            else:
                X = _randn(gen, B, C, H, W).to(s.dtype)
            return Built(model, (X, _labels(gen, B, plan.classes)), s.kwargs())
    else:
        chain = _draw_chain(rng)
        layout = rng.choice(["transposed", "sliced", "expanded"])
        words, tags = f"{layout} X of {chain.text()}", chain.tags()
        tags.add("layout:sliced" if layout == "sliced" else f"layout:{layout}")

        def make() -> Built:
            gen = torch.Generator().manual_seed(seed)
            model = chain.build(gen, s.dtype)
            shape = chain.in_shape
            if layout == "transposed" and len(shape) == 1:
                X = _randn(gen, shape[0], s.batch).to(s.dtype).t()
            elif layout == "transposed":
                X = _randn(gen, s.batch, shape[1], shape[0]).to(s.dtype).transpose(1, 2)
            elif layout == "sliced":
                X = _randn(gen, s.batch, *shape[:-1], 2 * shape[-1]).to(s.dtype)[..., 1::2]
            else:
                X = _randn(gen, 1, *shape).to(s.dtype).expand(s.batch, *shape)
            return Built(model, (X, _labels(gen, s.batch, chain.classes)), s.kwargs())

    return _case(seed, "memory_format", words, s, make, tags)


class ChangingSource:
    """An iterable of (X, y) batches whose passes from ``change_from`` on differ from the
    first: fewer or more batches, other inputs, other labels, or the same batches in
    another order."""

    def __init__(self, batches: list[tuple[torch.Tensor, torch.Tensor]], change: str,
                 change_from: int, classes: int, extra: tuple[torch.Tensor, torch.Tensor]):
        self.batches, self.change, self.change_from = batches, change, change_from
        self.classes, self.extra = classes, extra
        self.passes = 0

    def pass_batches(self, index: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """What pass ``index`` yields (0 is the first)."""
        if index < self.change_from or self.change == "stable":
            return list(self.batches)
        if self.change == "fewer":
            return self.batches[:-1]
        if self.change == "more":
            return self.batches + [self.extra]
        if self.change == "values":
            X, y = self.batches[-1]
            return self.batches[:-1] + [(X + 0.5, y)]
        if self.change == "labels":
            X, y = self.batches[0]
            return [(X, (y + 1) % self.classes)] + self.batches[1:]
        if self.change == "reordered":
            return self.batches[::-1]
        raise AssertionError(self.change)

    def __iter__(self):
        index, self.passes = self.passes, self.passes + 1
        return iter(self.pass_batches(index))


class OneShotSource:
    """A re-iterable wrapper around one generator: every pass after the first is empty."""

    def __init__(self, batches: list[tuple[torch.Tensor, torch.Tensor]]):
        self._generator = (batch for batch in batches)

    def __iter__(self):
        return self._generator


# sources that change between passes come twice as often as the others
_SOURCES = ("fewer", "more", "values", "labels", "oneshot") * 2 + (
    "reordered", "generator", "stable", "list", "dataloader", "dataloader_shuffle",
    "batch_size")


def _dataset_model(rng: random.Random, s: _Settings):
    """A model for data-set cases: an MLP, a convnet, or a hooked MLP (reference backend)."""
    pick = rng.random()
    if pick < 0.6:
        chain = _draw_chain(rng)
        return chain.text(), chain.tags(), chain.in_shape, chain.classes, \
            lambda gen: chain.build(gen, s.dtype)
    if pick < 0.85:
        plan = _draw_convnet(rng, allow_bad=False)
        return plan.text(), set(plan.tags), plan.in_shape, plan.classes, \
            lambda gen: plan.build(gen, s.dtype)
    chain = _draw_chain(rng)

    def hooked(gen: torch.Generator) -> nn.Module:
        model = chain.build(gen, s.dtype)
        model.register_forward_hook(_scale_output)
        return model

    return "a forward hook (output * 2) on " + chain.text(), chain.tags() | {"hook:forward"}, \
        chain.in_shape, chain.classes, hooked


def _data_source_case(seed: int, rng: random.Random, s: _Settings) -> Case:
    """Data sets: iterables whose later passes change, one-shot generators, DataLoaders;
    without a cache (every product reads the batches again) or with the default one."""
    source = rng.choice(_SOURCES)
    text, tags, in_shape, classes, build_model = _dataset_model(rng, s)
    sizes = [rng.randint(1, 5) for _ in range(rng.randint(1, 4))]
    if source in ("fewer", "values", "labels", "reordered") and len(sizes) < 2:
        sizes.append(rng.randint(1, 5))
    change_from = rng.choice([1, 1, 2, 3])
    cache = "none" if rng.random() < 0.7 else "default"
    check = rng.random() < 0.7
    kwargs = s.kwargs()
    if cache == "none":
        kwargs["cache_bytes"] = 0
    if not check:
        kwargs["check_determinism"] = False
    loader_batch = rng.randint(1, 4)

    def make() -> Built:
        gen = torch.Generator().manual_seed(seed)
        model = build_model(gen)
        batches = [(_randn(gen, n, *in_shape).to(s.dtype), _labels(gen, n, classes))
                   for n in sizes]
        extra = (_randn(gen, 2, *in_shape).to(s.dtype), _labels(gen, 2, classes))
        X, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
        if source in ("fewer", "more", "values", "labels", "reordered", "stable"):
            data: Any = ChangingSource(batches, source, change_from, classes, extra)
        elif source == "oneshot":
            data = OneShotSource(batches)
        elif source == "generator":
            data = (batch for batch in batches)
        elif source == "list":
            data = batches
        elif source in ("dataloader", "dataloader_shuffle"):
            data = torch.utils.data.DataLoader(
                torch.utils.data.TensorDataset(X, y), batch_size=loader_batch,
                shuffle=source == "dataloader_shuffle",
                generator=torch.Generator().manual_seed(seed))
        else:
            data = (X, y)
            kw = dict(kwargs, batch_size=loader_batch)
            return Built(model, data, kw, oracle_batches=[(X.clone(), y.clone())])
        return Built(model, data, kwargs, oracle_batches=[(X.clone(), y.clone())])

    what = {"fewer": f"one batch fewer from pass {change_from + 1}",
            "more": f"one batch more from pass {change_from + 1}",
            "values": f"other inputs in the last batch from pass {change_from + 1}",
            "labels": f"other labels in the first batch from pass {change_from + 1}",
            "reordered": f"batches reversed from pass {change_from + 1}",
            "oneshot": "a one-shot generator in a re-iterable wrapper (later passes empty)",
            "generator": "a bare generator",
            "stable": "an iterable yielding the same batches every pass",
            "list": "a list of batches",
            "dataloader": f"a DataLoader (batch {loader_batch})",
            "dataloader_shuffle": f"a shuffling DataLoader (batch {loader_batch})",
            "batch_size": f"a tensor pair with batch_size={loader_batch}"}[source]
    words = (f"{what}, batches of {sizes}, cache {cache}"
             f"{'' if check else ', check_determinism=False'}; model {text}")
    source_tag = {"reordered": "stable", "list": "stable", "dataloader_shuffle": "dataloader",
                  "generator": "oneshot"}.get(source, source)
    tags = tags | {f"source:{source_tag}", f"cache:{cache}"}
    # three products: a change from the third or fourth pass shows even without the
    # determinism check's two passes
    return _case(seed, "data_source", words, s, make, tags, repeats=3,
                 oracle_data="the batches of the first pass, concatenated")


def _mutation_case(seed: int, rng: random.Random, s: _Settings) -> Case:
    """In-place writes after construction: the operator is a snapshot, so its products
    must stay those of the model and data at construction."""
    base = rng.choice(["mlp", "mlp", "convnet", "convnet", "hooked", "dataset"])
    if base in ("mlp", "hooked", "dataset"):
        chain = _draw_chain(rng)
        text, tags, in_shape, classes = chain.text(), chain.tags(), chain.in_shape, chain.classes
        has_bn = False

        def build_model(gen: torch.Generator) -> nn.Module:
            model = chain.build(gen, s.dtype)
            if base == "hooked":
                model.register_forward_hook(_shift_output)
            return model
        if base == "hooked":
            text = "a forward hook (output + 0.1) on " + text
    else:
        plan = _draw_convnet(rng, allow_bad=False)
        text, tags, in_shape, classes = plan.text(), set(plan.tags), plan.in_shape, plan.classes
        has_bn = any(t.startswith("bn:") for t in tags)

        def build_model(gen: torch.Generator) -> nn.Module:
            return plan.build(gen, s.dtype)
    writes = ["X.mul_", "X.numpy", "X.data", "X[0]", "y", "weight", "bias", "train"]
    if has_bn and rng.random() < 0.5:
        writes = ["running_var", "running_var", "running_mean"]
    write = rng.choice(writes)
    kwargs = s.kwargs()
    batch_size = rng.randint(1, 4)
    if base == "dataset":
        kwargs["batch_size"] = batch_size
        if rng.random() < 0.7:
            kwargs["cache_bytes"] = 0

    def make() -> Built:
        gen = torch.Generator().manual_seed(seed)
        model = build_model(gen)
        X = _randn(gen, s.batch, *in_shape).to(s.dtype)
        return Built(model, (X, _labels(gen, s.batch, classes)), dict(kwargs))

    def mutate(model: nn.Module, data: Any) -> None:
        X, y = data
        with torch.no_grad():
            if write == "X.mul_":
                X.mul_(3)
            elif write == "X.numpy":
                X.numpy()[...] = 0.75
            elif write == "X.data":
                X.data.add_(1)
            elif write == "X[0]":
                X[0] = 5.0
            elif write == "y":
                y[0] = (y[0] + 1) % classes
            elif write == "weight":
                next(p for p in model.parameters() if p.dim() >= 2).data.mul_(2)
            elif write == "bias":
                # a model without biases gets the shift on its last parameter instead
                shifts = [p for p in model.parameters() if p.dim() == 1]
                (shifts or list(model.parameters()))[-1].add_(1.0)
            elif write == "train":
                model.train()
            else:
                bn = next(m for m in model.modules()
                          if isinstance(m, nn.modules.batchnorm._BatchNorm))
                if write == "running_var":
                    bn.running_var.mul_(4)
                else:
                    bn.running_mean.add_(1)

    mutate_tag = {"X[0]": "X.mul_", "bias": "weight", "train": "weight",
                  "running_mean": "running_var"}.get(write, write)
    where = {"dataset": f"tensor pair with batch_size={batch_size}"
             f"{', cache_bytes=0' if 'cache_bytes' in kwargs else ''}, "}.get(base, "")
    words = f"{write} after construction; {where}model {text}"
    return _case(seed, "mutation", words, s, make, tags | {f"mutate:{mutate_tag}"},
                 mutate=mutate)


_FAMILY_MAKERS = {"mlp": _mlp_case, "convnet": _convnet_case, "constants": _constants_case,
                  "subclass": _subclass_case, "hooks": _hooks_case,
                  "parametrize": _parametrize_case, "memory_format": _memory_format_case,
                  "data_source": _data_source_case, "mutation": _mutation_case}


def make_case(seed: int) -> Case:
    """The case of ``seed``: its family is FAMILIES[seed % len(FAMILIES)], every other
    choice is drawn from ``random.Random(seed)``. Cheap: nothing is built until
    ``case.build()``."""
    family = FAMILIES[seed % len(FAMILIES)]
    rng = random.Random(seed)
    settings = _draw_settings(rng)
    return _FAMILY_MAKERS[family](seed, rng, settings)


# ---------------------------------------------------------------------------- running


class _Crash(Exception):
    """The operator raised something other than TypeError or ValueError: a failure."""

    def __init__(self, stage: str, error: Exception):
        super().__init__(stage)
        self.stage, self.error = stage, error


class _Refused(Exception):
    """The operator raised TypeError or ValueError: an allowed outcome."""

    def __init__(self, stage: str, error: Exception):
        super().__init__(stage)
        self.stage, self.error = stage, error

    def outcome(self) -> str:
        first = str(self.error).splitlines()[0] if str(self.error) else ""
        return f"raised {type(self.error).__name__} {self.stage}: {first}"


def _register_global(kind: str, hook: Callable):
    hooks = torch.nn.modules.module
    if kind == "global_forward":
        return hooks.register_module_forward_hook(hook)
    return hooks.register_module_forward_pre_hook(hook)


def _oracle_data(built: Built) -> tuple[torch.Tensor, torch.Tensor]:
    if built.oracle_batches is not None:
        X = torch.cat([b[0] for b in built.oracle_batches])
        y = torch.cat([b[1] for b in built.oracle_batches])
        return X.clone(), y.clone()
    X, y = built.data
    return X.detach().clone(), y.clone()


def _oracle(case: Case, model: nn.Module, data: tuple[torch.Tensor, torch.Tensor],
            V: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    product = reference.hessian_matmat if case.curvature == "hessian" else reference.ggn_matmat
    return product(model, data, V, reduction=kwargs.get("reduction", "mean"),
                   weight_decay=kwargs.get("weight_decay", 0.0))


def _failure(case: Case, what: str) -> AssertionError:
    return AssertionError(f"seed {case.seed}: {what}\n  case: {case.description}\n"
                          f"  oracle data: {case.oracle_data}\n"
                          f"  reproduce: {reproduce_command(case.seed)}")


def run_case(case: Case) -> str:
    """Runs one case; returns "matched via <backend>/<engine>" or "raised <Type> <when>:
    <message>", or raises AssertionError (a wrong product, a crash other than TypeError or
    ValueError, or a documented refusal that did not happen)."""
    built = case.build()
    handles = []
    try:
        for kind, hook in built.global_hooks:
            handles.append(_register_global(kind, hook))
        return _run(case, built)
    finally:
        for handle in handles:
            handle.remove()


def _run(case: Case, built: Built) -> str:
    # the oracle's inputs: deep copies made before the operator exists or anything is written
    snapshot = copy.deepcopy(built.model)
    X0, y0 = _oracle_data(built)
    P = sum(p.numel() for p in snapshot.parameters())
    gen = torch.Generator().manual_seed(case.seed)
    V64 = torch.randn(P, case.k, generator=gen, dtype=torch.float64)
    # float32 autograd's error on a single vector varies several-fold from vector to vector;
    # the bar takes its largest over the case's columns and a few more
    V_bar = torch.cat([V64, torch.randn(P, FLOAT32_BAR_VECTORS, generator=gen,
                                        dtype=torch.float64)], 1)
    expected: torch.Tensor | None = None
    autograd_error = 0.0
    if not case.must_raise:
        model64 = copy.deepcopy(snapshot).double()
        data64 = (X0.double() if X0.is_floating_point() else X0, y0)

        def oracles() -> tuple[torch.Tensor, float]:
            """The float64 oracle on V64, and float32 autograd's error (float32 cases)."""
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if case.dtype == torch.float64:
                    return _oracle(case, model64, data64, V64, built.kwargs), 0.0
                exact = _oracle(case, model64, data64, V_bar, built.kwargs)
                ours32 = _oracle(case, snapshot, (X0, y0), V_bar.float(), built.kwargs)
                return exact[:, :case.k], max(
                    relative_error(ours32[:, j].double(), exact[:, j])
                    for j in range(V_bar.shape[1]))
        try:
            expected, autograd_error = oracles()
        except Exception as err:  # the generator drew a model autograd cannot run
            raise _failure(case, f"invalid case: the oracle raised {type(err).__name__}: "
                                 f"{err}") from err
    finite = expected is not None and bool(torch.isfinite(expected).all())
    if case.dtype == torch.float64:
        tolerance = FLOAT64_TOLERANCE
        bar = "1e-10"
    else:
        tolerance = 4 * max(autograd_error, 8 * FLOAT32_EPS)
        bar = f"4 x max(float32 autograd's {autograd_error:.1e}, 8 eps)"

    operator_type = pyflat.Hessian if case.curvature == "hessian" else pyflat.GGN
    V = V64.to(case.dtype)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            op = _stage("at construction",
                        lambda: operator_type(built.model, built.data, **built.kwargs))
            if op.shape != (P, P):
                raise _failure(case, f"operator shape {op.shape}, the model has {P} parameters")
            results = [(f" {i + 1}" if case.repeats > 1 else "",
                        _stage("at a product", lambda: _product(case, op, V)))
                       for i in range(case.repeats)]
            if case.mutate is not None:
                case.mutate(built.model, built.data)
                results.append((" after the in-place write",
                                _stage("at a product after the in-place write",
                                       lambda: _product(case, op, V))))
    except _Refused as refused:
        return refused.outcome()
    except _Crash as crash:
        first = str(crash.error).splitlines()[0] if str(crash.error) else ""
        raise _failure(case, f"crashed {crash.stage} with {type(crash.error).__name__}: "
                             f"{first}") from crash.error
    via = f"{op.backend}/{op.engine}"
    if case.must_raise:
        raise _failure(case, f"accepted (via {via}) what must be refused: {case.must_raise}")
    if not finite:
        raise _failure(case, f"returned products (via {via}) although model(X) or the oracle "
                             "is not finite")
    for when, actual in results:
        if actual.dtype != case.dtype:
            raise _failure(case, f"product{when} has dtype {actual.dtype}, expected {case.dtype}")
    mismatch = _mismatch(results, expected, tolerance)
    if mismatch is None:
        return f"matched via {via}"
    # Past saturation autograd's tanh' = 1 - t^2 and sigmoid' = s (1 - s) round to 0 where
    # the engines keep every digit; an oracle with exact rules settles which side is wrong.
    with exact_saturation():
        exact, exact_autograd_error = oracles()
    if relative_error(exact, expected) > FLOAT64_TOLERANCE:
        if case.dtype == torch.float32:
            tolerance = 4 * max(exact_autograd_error, 8 * FLOAT32_EPS)
        if _mismatch(results, exact, tolerance) is None:
            return f"matched via {via} (the saturation-exact oracle)"
    when, error = mismatch
    raise _failure(case, f"wrong product{when} via {via}: relative error {error:.3e} > "
                         f"{tolerance:.1e} ({bar})")


def _mismatch(results: list[tuple[str, torch.Tensor]], expected: torch.Tensor,
              tolerance: float) -> tuple[str, float] | None:
    """The first product off the expected one by more than the tolerance, and its error."""
    for when, actual in results:
        error = relative_error(actual.double(), expected)
        if not error <= tolerance:
            return when, error
    return None


def _stage(stage: str, action: Callable[[], Any]) -> Any:
    """Runs one step of the operator, sorting its exceptions: TypeError and ValueError
    are refusals; anything else is a crash."""
    try:
        return action()
    except (TypeError, ValueError) as err:
        raise _Refused(stage, err) from err
    except Exception as err:
        raise _Crash(stage, err) from err


def _product(case: Case, op: Any, V: torch.Tensor) -> torch.Tensor:
    if case.vector_form:
        return (op @ V[:, 0]).reshape(-1, 1)
    return op @ V

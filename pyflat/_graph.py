"""The graph engine: GGN and exact Hessian products of convnets and residual networks.

A model is captured once with torch.fx into a list of nodes of the kinds below; the
forward pass of a batch is prepared once (activations' s' and s'', max-pooling argmax,
BatchNorm's normalised input, softmax probabilities and, for the exact Hessian, the
gradient deltas of every node); every product then runs Pearlmutter's R-forward and the
backward over the nodes for k directions at once (DESIGN.md, "Recurrences" and "the
tangent layout"): tangents and deltas are (B, k, features...), so each convolution or
GEMM term is one call for all k directions. Convolutions, pooling and GEMMs run through
ATen (oneDNN / cuDNN / BLAS); the per-element pieces through pyflat's own kernels.

Node kinds and their rules (R = directional derivative, D = delta, e = gradient delta):

* linear, conv:  Rz = conv(Ra, W) + conv(a, V) + c;  grad V = D * a (+ e * Ra);
  D_a = D * W (+ e * V).  Grouped convolutions order the stacked channels (group,
  direction, channel) so that each direction stays inside its group; 1x1 convolutions
  without padding or groups run as batched GEMMs over the pixels they read.
* activation:    Ra = s' Rz;  D_z = s' D (+ s'' e_a Rz).
* max pooling:   tangents gathered at the forward's argmax, deltas routed back to it.
* average pooling, adaptive average pooling, reshapes, identity: linear maps applied to
  tangents, their adjoints to deltas.
* batch norm (eval mode): y = g xhat + beta, xhat = (x - mean) / sd with running
  statistics; Ry = g/sd Rx + Rg xhat + Rbeta; grad Rg = D xhat (+ e Rx / sd),
  D_x = g/sd D (+ e Rg / sd).
* add: tangents add; deltas go to both inputs (and add where a value fans out).
* affine (x + number, number - x, x * number, x / number, -x): the value is the traced
  call itself, on the primal; tangents and deltas are scaled by its slope.
"""
from __future__ import annotations

import contextlib
import operator
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import fx, nn

from . import ops
from .activations import CURVED, FUNCTION_READERS, METHOD_NAMES, MODULE_READERS
from .errors import UnsupportedModel
from .layout import ParameterLayout

__all__ = ["Graph", "GraphEngine", "Node", "SUPPORTED", "capture"]

#: what the graph engine takes, for messages and documentation
SUPPORTED = ("Linear", "Conv1d", "Conv2d", "MaxPool2d", "AvgPool2d", "AdaptiveAvgPool2d",
             "BatchNorm1d", "BatchNorm2d (eval mode)", "Flatten", "Dropout (eval mode)",
             "Identity", "activations (" + ", ".join(t.__name__ for t in MODULE_READERS) + ")",
             "residual additions", "sums and products with a number",
             "view / reshape / flatten that keep the batch axis")

# functional pooling -> (module type, its positional parameters after the input)
_FUNCTION_POOLS = {
    F.max_pool2d: (nn.MaxPool2d, ("kernel_size", "stride", "padding", "dilation", "ceil_mode",
                                  "return_indices")),
    F.avg_pool2d: (nn.AvgPool2d, ("kernel_size", "stride", "padding", "ceil_mode",
                                  "count_include_pad", "divisor_override")),
    F.adaptive_avg_pool2d: (nn.AdaptiveAvgPool2d, ("output_size",)),
}
_PASS_MODULES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
                 nn.AlphaDropout)


@dataclass
class Node:
    """One step of the captured model. ``inputs`` index earlier nodes; ``path`` says
    where it comes from (module path or function), for messages."""

    kind: str
    path: str
    inputs: list[int] = field(default_factory=list)
    module: Optional[nn.Module] = None
    activation: tuple[str, float, float] = ("identity", 0.0, 0.0)
    params: dict[str, nn.Parameter] = field(default_factory=dict)
    fx_node: Optional[fx.Node] = None  # reshapes and affine maps: rerun on the primal
    factor: float = 1.0                # affine nodes: the slope of the map

    @property
    def label(self) -> str:
        """How messages name the node: "Conv2d at 'layer1.0.conv1'", "function relu 'x_1'"."""
        if self.module is not None and not self.path.startswith("function "):
            return f"{type(self.module).__name__} at '{self.path}'"
        return self.path


@dataclass
class Graph:
    nodes: list[Node]
    output: int
    layout: ParameterLayout          # model.parameters(): the flat layout of directions
    steps: list[tuple[fx.Node, Optional[int]]]  # traced order: (fx node, engine node or None)


def _unsupported(caller: str, what: str, why: str = "",
                 path: Optional[str] = None) -> UnsupportedModel:
    reason = why or "the fused engine supports " + ", ".join(SUPPORTED)
    return UnsupportedModel(f"{caller}: unsupported {what}: {reason}", path)


def _module_node(caller: str, path: str, module: nn.Module) -> Node:
    kind = type(module)
    if kind is nn.Linear:
        return Node("linear", path, module=module)
    if kind in (nn.Conv1d, nn.Conv2d):
        if module.padding_mode != "zeros":
            raise _unsupported(caller, f"module {kind.__name__} at '{path}'",
                               f"padding_mode '{module.padding_mode}' (only 'zeros')", path)
        if isinstance(module.padding, str) and module.padding == "same" and any(
                d * (s - 1) % 2 for d, s in zip(module.dilation, module.kernel_size)):
            raise _unsupported(caller, f"module {kind.__name__} at '{path}'",
                               "padding='same' with an even receptive field pads unevenly", path)
        return Node("conv", path, module=module)
    if kind in MODULE_READERS:
        return Node("activation", path, module=module, activation=MODULE_READERS[kind](module))
    if kind is nn.MaxPool2d:
        return Node("maxpool", path, module=module)
    if kind is nn.AvgPool2d:
        return Node("avgpool", path, module=module)
    if kind is nn.AdaptiveAvgPool2d:
        return Node("adaptive_avgpool", path, module=module)
    if kind in (nn.BatchNorm1d, nn.BatchNorm2d):
        if module.running_mean is None:
            raise _unsupported(caller, f"module {kind.__name__} at '{path}'",
                               "track_running_stats=False normalises with batch statistics "
                               "even in eval mode; the engine takes running statistics", path)
        if module.training:
            raise TypeError(f"{caller}: {kind.__name__} at '{path}' is in training mode; "
                            "curvature is measured in eval mode: call model.eval() first")
        return Node("batchnorm", path, module=module)
    if kind is nn.Flatten:
        return Node("reshape", path, module=module)
    if kind in _PASS_MODULES:
        if module.training and getattr(module, "p", 0) > 0:
            raise TypeError(f"{caller}: {kind.__name__} at '{path}' is in training mode, so "
                            "every product would draw a new mask; call model.eval() first")
        return Node("identity", path, module=module)
    raise _unsupported(caller, f"module {kind.__name__} at '{path}'", path=path)


# x + c, x - c, c - x, x * c, x / c, -x with c a number: the slope of each in x
_AFFINE = {operator.add: "+", torch.add: "+", operator.sub: "-", torch.sub: "-",
           operator.mul: "*", torch.mul: "*", operator.truediv: "/", torch.div: "/",
           operator.neg: "neg", torch.neg: "neg"}


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _affine_node(caller: str, n: fx.Node, index: dict) -> Node:
    """An affine map of one tensor by a number; its value is the traced call itself, so
    a constant is never dropped and rounding is the model's."""
    op = _AFFINE[n.target]
    where = f"{getattr(n.target, '__name__', n.target)} '{n.name}'"
    tensors = [i for i, a in enumerate(n.args) if isinstance(a, fx.Node) and a in index]
    numbers = [a for a in n.args if _is_number(a)]
    if op == "neg":
        ok, slope = len(n.args) == 1 and tensors == [0] and not n.kwargs, -1.0
    else:
        ok = len(n.args) == 2 and len(tensors) == 1 and len(numbers) == 1 and not n.kwargs
        number = numbers[0] if numbers else 0.0
        first = tensors == [0]
        if op == "+":
            slope = 1.0
        elif op == "-":
            slope = 1.0 if first else -1.0
        elif op == "*":
            slope = float(number)
        else:  # number / x is not affine
            ok, slope = ok and first and number != 0, 1.0 / number if number else 0.0
    if not ok:
        raise _unsupported(caller, where, "only a tensor of the model and one number "
                           "(x + c, c - x, x * c, x / c, -x); tensors add as a + b")
    return Node("affine", where, inputs=[index[n.args[tensors[0]]]], factor=slope, fx_node=n)


def capture(model: nn.Module, caller: str) -> Graph:
    """Traces ``model`` with torch.fx into engine nodes, or raises TypeError naming the
    module or function the engine cannot take."""
    try:
        traced = fx.symbolic_trace(model)
    except Exception as err:  # fx raises many kinds: control flow on values, unsupported ops
        raise UnsupportedModel(f"{caller}: torch.fx cannot trace {type(model).__name__} "
                        f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
                        "; the fused engine needs a traceable forward") from None
    nodes: list[Node] = []
    index: dict[fx.Node, int] = {}   # fx node -> engine node
    values: set[fx.Node] = set()     # non-tensor values (sizes): only reshapes read them
    steps: list[tuple[fx.Node, Optional[int]]] = []
    output = None

    def tensor_input(arg, where: str) -> int:
        if not isinstance(arg, fx.Node) or arg not in index:
            raise _unsupported(caller, where, f"its input {arg!r} is not a tensor of the model")
        return index[arg]

    for n in traced.graph.nodes:
        if n.op == "placeholder":
            if any(node.kind == "input" for node in nodes):
                raise _unsupported(caller, f"input '{n.target}'",
                                   "the model must take one tensor argument")
            node = Node("input", n.target)
        elif n.op == "call_module":
            module = model.get_submodule(n.target)
            node = _module_node(caller, n.target, module)
            node.inputs = [tensor_input(n.args[0], f"module at '{n.target}'")]
            if len(n.args) != 1 or n.kwargs:
                raise _unsupported(caller, f"call of module at '{n.target}'",
                                   "modules must be called on one tensor")
        elif n.op == "call_function" and n.target in (operator.add, torch.add) and \
                len(n.args) == 2 and all(isinstance(a, fx.Node) and a in index for a in n.args):
            if n.kwargs:
                raise _unsupported(caller, f"addition '{n.name}'", "only a + b without alpha")
            node = Node("add", f"addition '{n.name}'", inputs=[index[a] for a in n.args])
        elif n.op == "call_function" and n.target in _AFFINE:
            node = _affine_node(caller, n, index)
        elif n.op == "call_function" and n.target in FUNCTION_READERS:
            act = FUNCTION_READERS[n.target](n.args[1:], n.kwargs)
            node = Node("activation", f"function {n.target.__name__} '{n.name}'",
                        inputs=[tensor_input(n.args[0], n.name)], activation=act)
        elif n.op == "call_method" and n.target in METHOD_NAMES and len(n.args) == 1:
            node = Node("activation", f"method {n.target} '{n.name}'",
                        inputs=[tensor_input(n.args[0], n.name)],
                        activation=(METHOD_NAMES[n.target], 0.0, 0.0))
        elif n.op == "call_function" and n.target in _FUNCTION_POOLS:
            # the module is built on the prepared forward: sizes may be traced values
            kinds = {nn.MaxPool2d: "maxpool", nn.AvgPool2d: "avgpool",
                     nn.AdaptiveAvgPool2d: "adaptive_avgpool"}
            node = Node(kinds[_FUNCTION_POOLS[n.target][0]],
                        f"function {n.target.__name__} '{n.name}'",
                        inputs=[tensor_input(n.args[0], n.name)], fx_node=n)
        elif (n.op == "call_function" and n.target is torch.flatten) or (
                n.op == "call_method" and n.target in ("view", "reshape", "flatten")):
            node = Node("reshape", f"{n.target if isinstance(n.target, str) else 'flatten'} "
                        f"'{n.name}'", inputs=[tensor_input(n.args[0], n.name)], fx_node=n)
        elif n.op == "call_method" and n.target == "contiguous":
            node = Node("identity", f"contiguous '{n.name}'",
                        inputs=[tensor_input(n.args[0], n.name)])
        elif (n.op == "call_method" and n.target == "size") or (
                n.op == "call_function" and n.target is getattr and n.args[1] == "shape") or (
                n.op == "call_function" and n.target is operator.getitem
                and isinstance(n.args[0], fx.Node) and n.args[0] in values):
            values.add(n)  # sizes, evaluated on the prepared forward for the reshapes
            steps.append((n, None))
            continue
        elif n.op == "output":
            if not isinstance(n.args[0], fx.Node) or n.args[0] not in index:
                raise _unsupported(caller, "model output",
                                   "the model must return one tensor of logits")
            output = index[n.args[0]]
            continue
        else:
            target = getattr(n.target, "__name__", n.target)
            raise _unsupported(caller, f"{n.op} '{target}' (node '{n.name}')")
        index[n] = len(nodes)
        steps.append((n, len(nodes)))
        nodes.append(node)
    if output is None:
        raise _unsupported(caller, "model", "it returns no tensor")

    layout = ParameterLayout.of(model)
    owner: dict[int, str] = {}
    for node in nodes:
        if node.kind in ("linear", "conv", "batchnorm"):
            for name in ("weight", "bias"):
                p = getattr(node.module, name, None)
                if p is None:
                    continue
                if id(p) in owner:
                    raise UnsupportedModel(
                        f"{caller}: parameter '{node.path}.{name}' is also used at "
                        f"'{owner[id(p)]}'; shared parameters are not supported by the fused "
                        "engine", node.path)
                if layout.position(p) is None:
                    raise UnsupportedModel(f"{caller}: '{node.path}.{name}' is not among "
                                           "model.parameters()", node.path)
                owner[id(p)] = node.path
                node.params[name] = p
    return Graph(nodes, output, layout, steps)


def _pool_matrix(size_in: int, size_out: int, like: torch.Tensor) -> torch.Tensor:
    """(size_out, size_in) averaging matrix of adaptive average pooling along one axis."""
    m = torch.zeros(size_out, size_in, dtype=like.dtype, device=like.device)
    for i in range(size_out):
        start = (i * size_in) // size_out
        end = -((-(i + 1) * size_in) // size_out)
        m[i, start:end] = 1.0 / (end - start)
    return m


def _conv_params(module: nn.Module) -> dict[str, Any]:
    padding = module.padding
    if isinstance(padding, str):
        padding = [0 if padding == "valid" else d * (s - 1) // 2
                   for d, s in zip(module.dilation, module.kernel_size)]
    return {"stride": list(module.stride), "padding": list(padding),
            "dilation": list(module.dilation), "groups": module.groups}


def _conv(x, weight, p):
    return torch.ops.aten.convolution(x, weight, None, p["stride"], p["padding"], p["dilation"],
                                      False, [0] * len(p["stride"]), p["groups"])


def _conv_backward(grad_out, x, weight, p, want_input: bool, want_weight: bool):
    """(input, weight) gradients of <grad_out, conv(x, weight)>, as asked. ``x`` or
    ``weight`` may be given as a shape where only the other's values are read."""
    if not isinstance(x, torch.Tensor):
        x = grad_out.new_empty(x)
    if not isinstance(weight, torch.Tensor):
        weight = grad_out.new_empty(weight)
    grads = torch.ops.aten.convolution_backward(
        grad_out, x, weight, None, p["stride"], p["padding"], p["dilation"], False,
        [0] * len(p["stride"]), p["groups"], [want_input, want_weight, False])
    return grads[0], grads[1]


@contextlib.contextmanager
def _reproducible(device: torch.device):
    """cuDNN may pick convolution-backward algorithms that add with atomics: a product
    would then change in the last bits from call to call. Ask for deterministic ones."""
    if device.type != "cuda":
        yield
        return
    # set one by one, not through cudnn.flags(): that reads the legacy allow_tf32 switch,
    # which raises on torch >= 2.9 once cuDNN's conv and rnn fp32_precision differ (as
    # pyflat's full_precision makes them), and on exit writes it over both levels
    cudnn = torch.backends.cudnn
    saved = cudnn.benchmark, cudnn.deterministic
    cudnn.benchmark, cudnn.deterministic = False, True
    try:
        yield
    finally:
        cudnn.benchmark, cudnn.deterministic = saved


class GraphEngine:
    """Prepared forward of one batch through a captured graph, and the products on it.

    Construction runs the forward to the logits; :meth:`prepare_loss` then takes the
    labels (checked by the caller against ``num_classes``) and prepares the rest.

    Args:
        graph: from :func:`capture`.
        X: the batch's inputs.
        reduction: "mean" or "sum".
        exact: prepare the gradient deltas the exact Hessian needs.
    """

    def __init__(self, graph: Graph, X: torch.Tensor, reduction: str, exact: bool,
                 caller: str):
        self.graph, self.reduction, self.exact, self.caller = graph, reduction, exact, caller
        nodes = graph.nodes
        self.batch = X.shape[0]
        # whether a node's value depends on the parameters: only those carry tangents
        self.carries = [False] * len(nodes)
        for i, node in enumerate(nodes):
            self.carries[i] = bool(node.params) or any(self.carries[j] for j in node.inputs)
        self.users: list[list[int]] = [[] for _ in nodes]
        for i, node in enumerate(nodes):
            for j in node.inputs:
                self.users[j].append(i)
        # tangents the exact Hessian's backward reads (inputs of layers with parameters and
        # of curved activations); the others may be overwritten or freed once consumed
        self.keep = [False] * len(nodes)
        if exact:
            for i, node in enumerate(nodes):
                curved = node.kind == "activation" and node.activation[0] in CURVED
                if node.kind in ("linear", "conv", "batchnorm") or curved:
                    for j in node.inputs:
                        self.keep[j] = True
        self.param_views = {}  # per node: weight/bias snapshots
        for node in nodes:
            # contiguous copies: a channels_last model would hand its layout to every
            # tangent and delta, and the per-element kernels take contiguous memory
            self.param_views[id(node)] = {k: p.detach().clone(memory_format=torch.contiguous_format)
                                          for k, p in node.params.items()}
        self._forward(X)

    # ---------------------------------------------------------------- forward
    def _forward(self, X: torch.Tensor) -> None:
        nodes, B = self.graph.nodes, self.batch
        values: list[Optional[torch.Tensor]] = [None] * len(nodes)
        self.cache: list[dict[str, Any]] = [dict() for _ in nodes]
        env: dict[fx.Node, Any] = {}  # traced values by fx node, for sizes and reshapes
        with torch.no_grad():
            for n, i in self.graph.steps:
                if i is None:
                    env[n] = _run_fx_node(n, env)
                    continue
                node = nodes[i]
                x = values[node.inputs[0]] if node.inputs else X
                values[i] = env[n] = self._forward_node(i, node, x, values, env)
                if values[i].dim() == 0 or values[i].shape[0] != B:
                    raise UnsupportedModel(
                        f"{self.caller}: {node.label} does not keep the batch axis (output "
                        f"{tuple(values[i].shape)} for a batch of {B}); the engine needs one "
                        "output row per sample", node.label)
        logits = values[self.graph.output]
        if logits.dim() != 2:
            raise ValueError(f"{self.caller}: the model must map X to logits of shape "
                             f"({B}, classes), got {tuple(logits.shape)}")
        self.shapes = [tuple(v.shape[1:]) for v in values]
        for i, node in enumerate(nodes):
            if node.kind in ("linear", "conv") and node.inputs:
                self.cache[i]["a"] = a = values[node.inputs[0]]
                if self.cache[i].get("pointwise"):  # (B, I, pixels the 1x1 kernel visits)
                    stride = self.cache[i]["conv"]["stride"]
                    self.cache[i]["a_sub"] = _subsample(a, stride).reshape(B, a.shape[1], -1)
        self.logits, self.num_classes = logits, logits.shape[1]

    def prepare_loss(self, y: torch.Tensor) -> None:
        """Softmax cross-entropy on the logits and, for the exact Hessian, the gradient
        deltas e of every node and s'' * e of the curved activations."""
        nodes = self.graph.nodes
        loss, probs, grad = ops.softmax_cross_entropy(self.logits.contiguous(), y,
                                                      self.reduction)
        self.loss, self.probs = loss, probs
        if self.exact:
            # gradient deltas e of every node: the backward with one "direction", the
            # loss gradient, and no second-order terms
            with _reproducible(grad.device):
                deltas = self._backward(grad.unsqueeze(1), tangents=None, directions=None,
                                        out=None, exact=False)
            for i, node in enumerate(nodes):
                e = deltas[i]
                if e is None:
                    continue
                e = e.squeeze(1)
                if node.kind in ("linear", "conv", "batchnorm"):
                    self.cache[i]["e"] = e.contiguous()
                elif node.kind == "activation" and "second" in self.cache[i]:
                    self.cache[i]["curvature"] = (self.cache[i].pop("second") * e).contiguous()
        for c in self.cache:
            c.pop("second", None)

    def _pool_module(self, node: Node, env) -> nn.Module:
        """The pooling module a functional call stands for, its sizes evaluated."""
        n = node.fx_node
        module_type, names = _FUNCTION_POOLS[n.target]
        args = fx.node.map_arg(n.args[1:], lambda a: env[a])
        kwargs = fx.node.map_arg(dict(n.kwargs), lambda a: env[a])
        bound = dict(zip(names, args), **kwargs)
        if bound.pop("return_indices", False):
            raise _unsupported(self.caller, node.label, "return_indices=True")
        try:
            return module_type(**bound)
        except TypeError as err:
            raise _unsupported(self.caller, node.label, str(err)) from None

    def _forward_node(self, i: int, node: Node, x: torch.Tensor, values, env) -> torch.Tensor:
        cache, m = self.cache[i], node.module
        if node.kind in ("maxpool", "avgpool", "adaptive_avgpool"):
            m = cache["module"] = m if m is not None else self._pool_module(node, env)
        p = self.param_views[id(node)]
        if node.kind == "input":
            return x
        if node.kind == "linear":
            if x.dim() != 2:
                raise UnsupportedModel(f"{self.caller}: {node.label} gets input of shape "
                                       f"{tuple(x.shape)}; the engine takes Linear layers on "
                                       "(batch, features) inputs", node.label)
            return F.linear(x, p["weight"], p.get("bias"))
        if node.kind == "conv":
            if x.dim() != m.weight.dim() or x.shape[1] != m.in_channels:
                raise UnsupportedModel(
                    f"{self.caller}: {node.label} gets input of shape {tuple(x.shape)}; it "
                    f"takes (batch, {m.in_channels}, {', '.join('...' for _ in m.kernel_size)})",
                    node.label)
            cache["conv"] = conv = _conv_params(m)
            # 1x1 convolutions without padding or groups are GEMMs over the (subsampled)
            # pixels: oneDNN's strided 1x1 backward is slower than the forward it mirrors
            cache["pointwise"] = (all(s == 1 for s in m.kernel_size) and conv["groups"] == 1
                                  and all(q == 0 for q in conv["padding"]))
            return torch.ops.aten.convolution(x, p["weight"], p.get("bias"), conv["stride"],
                                              conv["padding"], conv["dilation"], False,
                                              [0] * len(conv["stride"]), conv["groups"])
        if node.kind == "activation":
            name, p0, p1 = node.activation
            curved = self.exact and name in CURVED
            value, first, second = ops.activation_forward(x, name, p0, p1, with_second=curved)
            cache["first"] = first
            if curved:
                cache["second"] = second
            return value
        if node.kind == "maxpool":
            if x.dim() != 4:
                raise UnsupportedModel(f"{self.caller}: {node.label} gets input of shape "
                                       f"{tuple(x.shape)}; the engine takes (B, C, H, W)",
                                       node.label)
            out, idx = F.max_pool2d(x, m.kernel_size, m.stride, m.padding, m.dilation,
                                    ceil_mode=m.ceil_mode, return_indices=True)
            cache["indices"] = idx
            cache["in_shape"] = tuple(x.shape[1:])
            return out
        if node.kind == "avgpool":
            cache["in_shape"] = tuple(x.shape[1:])
            return m(x)
        if node.kind == "adaptive_avgpool":
            out = m(x)
            cache["rows"] = _pool_matrix(x.shape[-2], out.shape[-2], x)
            cache["cols"] = _pool_matrix(x.shape[-1], out.shape[-1], x)
            return out
        if node.kind == "batchnorm":
            if x.dim() < 2 or x.shape[1] != m.num_features:
                raise UnsupportedModel(f"{self.caller}: {node.label} gets input of shape "
                                       f"{tuple(x.shape)}", node.label)
            bshape = (1, -1) + (1,) * (x.dim() - 2)
            sd = torch.sqrt(m.running_var.to(x.dtype) + m.eps)
            xhat = (x - m.running_mean.to(x.dtype).view(bshape)) / sd.view(bshape)
            gain = p["weight"] if "weight" in p else torch.ones_like(sd)
            cache.update(xhat=xhat, inv_sd=1.0 / sd, scale=gain / sd)
            # the value as the module computes it, so that kinks downstream (ReLU, max
            # pooling) switch exactly where autograd's do in this dtype
            return F.batch_norm(x, m.running_mean, m.running_var, p.get("weight"),
                                p.get("bias"), False, 0.0, m.eps)
        if node.kind == "reshape":
            # the module or method itself, on the primal: its output shape is the rule
            return m(x) if m is not None else _run_fx_node(node.fx_node, env)
        if node.kind == "add":
            return values[node.inputs[0]] + values[node.inputs[1]]
        if node.kind == "identity":
            return x
        if node.kind == "affine":  # the model's own call: x + c, x / c, ...
            return _run_fx_node(node.fx_node, env)
        raise AssertionError(node.kind)

    def prepared_bytes(self) -> int:
        """Memory held by the prepared batch: cached tensors, probabilities, weights."""
        tensors = {id(t): t for c in self.cache for t in c.values()
                   if isinstance(t, torch.Tensor)}
        for views in self.param_views.values():
            tensors.update((id(t), t) for t in views.values())
        for t in (self.logits, getattr(self, "probs", None)):
            if t is not None:
                tensors[id(t)] = t
        return sum(t.numel() * t.element_size() for t in tensors.values())

    # ------------------------------------------------------------ products
    def matmat(self, directions: torch.Tensor) -> torch.Tensor:
        """Products on a (k, P) block of directions (rows); returns (k, P)."""
        with _reproducible(directions.device):
            tangents = self._tangents(directions)
            logits_tangent = tangents[self.graph.output]
            out = directions.new_zeros(directions.shape)
            if logits_tangent is None:
                return out
            d = ops.softmax_hessian(self.probs, logits_tangent, self.reduction)
            self._backward(d, tangents, directions, out, self.exact)
        return out

    def _direction(self, directions: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        return self.graph.layout.rows(directions, self.graph.layout.position(p))

    def _tangents(self, directions: torch.Tensor) -> list[Optional[torch.Tensor]]:
        nodes, B, k = self.graph.nodes, self.batch, directions.shape[0]
        T: list[Optional[torch.Tensor]] = [None] * len(nodes)
        fresh = [False] * len(nodes)  # T[i] is memory node i allocated (not a view)

        def consumable(j: int, i: int) -> bool:
            """Whether node i may overwrite its input's tangent: i is its only reader."""
            return fresh[j] and self.users[j] == [i] and not self.keep[j]

        for i, node in enumerate(nodes):
            if not self.carries[i]:
                continue
            src = node.inputs[0] if node.inputs else None
            t = T[src] if src is not None else None
            in_place = t is not None and consumable(src, i)
            c, p = self.cache[i], self.param_views[id(node)]
            shape = self.shapes[i]
            fresh[i] = True
            if node.kind == "linear":
                V = self._direction(directions, node.params["weight"])   # (k, out, in)
                out = (c["a"] @ V.reshape(-1, V.shape[-1]).t()).view(B, k, -1)
                if t is not None:
                    out.add_((t.reshape(B * k, -1) @ p["weight"].t()).view(B, k, -1))
                if "bias" in node.params:
                    out.add_(self._direction(directions, node.params["bias"]))
                T[i] = out
            elif node.kind == "conv" and c["pointwise"]:
                V = self._direction(directions, node.params["weight"])   # (k, O, I, 1...)
                O, I, spatial = V.shape[1], V.shape[2], shape[1:]
                out = torch.matmul(V.reshape(k * O, I), c["a_sub"]).view(B, k, O, *spatial)
                if t is not None:
                    t_sub = _subsample(t, c["conv"]["stride"]).reshape(B * k, I, -1)
                    out.add_(torch.matmul(p["weight"].reshape(O, I), t_sub).view(B, k, O,
                                                                                *spatial))
                if "bias" in node.params:
                    cb = self._direction(directions, node.params["bias"])
                    out.add_(cb.view(1, k, O, *([1] * len(spatial))))
                T[i] = out
            elif node.kind == "conv":
                conv = c["conv"]
                g = conv["groups"]
                V = self._direction(directions, node.params["weight"])   # (k, O, I/g, ...)
                O, rest = V.shape[1], V.shape[2:]
                # stacked output channels ordered (group, direction, channel)
                Vs = V.reshape(k, g, O // g, *rest).transpose(0, 1).reshape(k * O, *rest)
                out = _conv(c["a"], Vs, conv)                             # (B, g*k*O/g, ...)
                spatial = out.shape[2:]
                out = out.view(B, g, k, O // g, *spatial).transpose(1, 2).reshape(B, k, O,
                                                                                 *spatial)
                if t is not None:
                    out.add_(_conv(t.reshape(B * k, *t.shape[2:]), p["weight"],
                                   conv).view(B, k, O, *spatial))
                if "bias" in node.params:
                    cb = self._direction(directions, node.params["bias"])
                    out.add_(cb.view(1, k, O, *([1] * len(spatial))))
                T[i] = out
            elif node.kind == "activation":
                if in_place:  # s' * t over t itself
                    T[i] = ops.activation_delta_(t, c["first"])
                else:
                    T[i] = ops.activation_tangent(c["first"], t)
            elif node.kind == "maxpool":
                idx = c["indices"]
                C, H, W = c["in_shape"]
                flat = idx.view(B, 1, C, -1).expand(B, k, C, idx.shape[-2] * idx.shape[-1])
                T[i] = t.reshape(B, k, C, H * W).gather(3, flat).view(B, k, *shape)
            elif node.kind == "avgpool":
                T[i] = c["module"](t.reshape(B, -1, *t.shape[-2:])).view(B, k, *shape)
            elif node.kind == "adaptive_avgpool":
                T[i] = c["rows"] @ t @ c["cols"].t()
            elif node.kind == "batchnorm":
                C = shape[0]
                per_channel = (1, k, C) + (1,) * (len(shape) - 1)
                scale = c["scale"].view(1, 1, C, *per_channel[3:])
                if t is None:
                    out = torch.zeros((B, k, *shape), dtype=directions.dtype,
                                      device=directions.device)
                else:
                    out = t.mul_(scale) if in_place else t * scale
                if "weight" in node.params:
                    Rg = self._direction(directions, node.params["weight"])
                    out.addcmul_(c["xhat"].unsqueeze(1), Rg.view(per_channel))
                if "bias" in node.params:
                    out.add_(self._direction(directions, node.params["bias"]).view(per_channel))
                T[i] = out
            elif node.kind == "reshape":
                T[i], fresh[i] = t.reshape(B, k, *shape), False
            elif node.kind == "add":
                a, b = node.inputs
                if T[a] is None or T[b] is None:
                    T[i], fresh[i] = (T[b] if T[a] is None else T[a]), False
                elif consumable(a, i):
                    T[i] = T[a].add_(T[b])
                elif consumable(b, i):
                    T[i] = T[b].add_(T[a])
                else:
                    T[i] = T[a] + T[b]
            elif node.kind == "identity":
                T[i], fresh[i] = t, False
            elif node.kind == "affine":
                if node.factor == 1.0:
                    T[i], fresh[i] = t, False
                else:
                    T[i] = t.mul_(node.factor) if in_place else t * node.factor
            if T[i] is not None and not T[i].is_contiguous():
                T[i], fresh[i] = T[i].contiguous(), True
            for j in node.inputs:  # free what no later node reads
                if self.users[j][-1] == i and not self.keep[j]:
                    T[j] = None
        return T

    def _backward(self, d_out: torch.Tensor, tangents, directions, out, exact: bool):
        """Runs deltas from the logits (B, k, C) back through the nodes. With ``out``
        (k, P), writes the parameter gradients there; returns the deltas of every node."""
        nodes, B, k = self.graph.nodes, self.batch, d_out.shape[1]
        D: list[Optional[torch.Tensor]] = [None] * len(nodes)
        shared = [False] * len(nodes)   # D[i] is also held elsewhere: copy before in place
        D[self.graph.output] = d_out

        def send(j: int, delta: torch.Tensor, alias: bool) -> None:
            if not self.carries[j]:
                return
            if D[j] is None:
                D[j], shared[j] = delta, alias
            else:
                D[j], shared[j] = D[j] + delta, False

        def write(p: torch.Tensor, grad: torch.Tensor) -> None:
            self.graph.layout.write_rows(out, self.graph.layout.position(p), grad)

        for i in range(len(nodes) - 1, -1, -1):
            node, d = nodes[i], D[i]
            if d is None:
                continue
            c, p = self.cache[i], self.param_views[id(node)]
            t_in = tangents[node.inputs[0]] if (exact and node.inputs) else None
            src = node.inputs[0] if node.inputs else None
            needs_input = src is not None and self.carries[src]
            if node.kind == "linear":
                O = d.shape[-1]
                e = c.get("e") if exact else None
                if out is not None:
                    gw = (d.reshape(B, k * O).t() @ c["a"]).view(k, O, -1)
                    if e is not None and t_in is not None:
                        gw = gw + (e.t() @ t_in.reshape(B, -1)).view(O, k, -1).transpose(0, 1)
                    write(node.params["weight"], gw)
                    if "bias" in node.params:
                        write(node.params["bias"], d.sum(0))
                if needs_input:
                    din = (d.reshape(B * k, O) @ p["weight"]).view(B, k, -1)
                    if e is not None:
                        V = self._direction(directions, node.params["weight"])
                        din = din + (e @ V.transpose(0, 1).reshape(O, -1)).view(B, k, -1)
                    send(src, din, False)
            elif node.kind == "conv" and c["pointwise"]:
                a_sub, W, stride = c["a_sub"], p["weight"], c["conv"]["stride"]
                O, I, S = d.shape[2], a_sub.shape[1], a_sub.shape[2]
                ones = W.shape[2:]
                e = c.get("e") if exact else None
                if out is not None:
                    # sum over the batch of per-sample GEMMs: a fixed-order reduction
                    gw = torch.matmul(d.reshape(B, k * O, S), a_sub.transpose(1, 2)).sum(0)
                    gw = gw.view(k, O, I)
                    if e is not None and t_in is not None:
                        t_sub = _subsample(t_in, stride).reshape(B, k * I, S)
                        he = torch.matmul(e.reshape(B, O, S), t_sub.transpose(1, 2)).sum(0)
                        gw = gw + he.view(O, k, I).transpose(0, 1)
                    write(node.params["weight"], gw.reshape(k, O, I, *ones))
                    if "bias" in node.params:
                        write(node.params["bias"], d.sum(dim=(0, *range(3, d.dim()))))
                if needs_input:
                    sub = torch.matmul(W.reshape(O, I).t(), d.reshape(B * k, O, S))
                    if e is not None:
                        V = self._direction(directions, node.params["weight"]).reshape(k, O, I)
                        sub = sub.view(B, k * I, S).add_(torch.matmul(
                            V.transpose(1, 2).reshape(k * I, O), e.reshape(B, O, S)))
                    in_shape = c["a"].shape[1:]
                    send(src, _upsample(sub.view(B * k, I, S), in_shape, stride).view(
                        B, k, *in_shape), False)
            elif node.kind == "conv":
                conv = c["conv"]
                g = conv["groups"]
                O, spatial = d.shape[2], d.shape[3:]
                a, W = c["a"], p["weight"]
                rest, in_shape = W.shape[1:], a.shape[1:]
                e = c.get("e") if exact else None
                has_bias = "bias" in node.params
                din = gw = None
                # (oneDNN's float32 bias gradient sums naively; torch.sum sums pairwise)
                gb = d.sum(dim=(0, *range(3, d.dim()))) if has_bias and out is not None else None
                if k == 1:
                    # one call for the weight and input gradients at this delta
                    gi, gw = _conv_backward(d.view(B, O, *spatial), a, W, conv, needs_input,
                                            out is not None)
                    if out is not None:
                        gw = gw.unsqueeze(0)
                    if needs_input:
                        din = gi.view(B, 1, *in_shape)
                else:
                    if out is not None:
                        # stacked as in the forward: output channels (group, direction, channel)
                        ds = d.view(B, k, g, O // g, *spatial).transpose(1, 2).reshape(
                            B, k * O, *spatial)
                        gw = _conv_backward(ds, a, (k * O, *rest), conv, False, True)[1]
                        gw = gw.view(g, k, O // g, *rest).transpose(0, 1).reshape(k, O, *rest)
                    if needs_input:
                        din = _conv_backward(d.reshape(B * k, O, *spatial), (B * k, *in_shape),
                                             W, conv, True, False)[0].view(B, k, *in_shape)
                if out is not None:
                    if e is not None and t_in is not None:
                        I_g = rest[0]
                        # input channels (group, direction, channel), weight (O, k*I/g, ...)
                        ts = t_in.view(B, k, g, I_g, *t_in.shape[3:]).transpose(1, 2).reshape(
                            B, g * k * I_g, *t_in.shape[3:])
                        he = _conv_backward(e, ts, (O, k * I_g, *rest[1:]), conv, False, True)[1]
                        kernel_dims = range(4, 3 + len(rest))
                        gw = gw + he.view(g, O // g, k, I_g, *rest[1:]).permute(
                            2, 0, 1, 3, *kernel_dims).reshape(k, O, *rest)
                    write(node.params["weight"], gw)
                    if has_bias:
                        write(node.params["bias"], gb)
                if needs_input:
                    if e is not None:
                        V = self._direction(directions, node.params["weight"])
                        I_g, kernel = V.shape[2], V.shape[3:]
                        # e through conv(., V_j) for every j: a weight (O, k*I/g, ...) whose
                        # input channels are ordered (group, direction, channel)
                        Vt = V.reshape(k, g, O // g, I_g, *kernel).permute(
                            1, 2, 0, 3, *range(4, 4 + len(kernel))).reshape(O, k * I_g, *kernel)
                        he = _conv_backward(e, (B, g * k * I_g, *in_shape[1:]), Vt, conv, True,
                                            False)[0]
                        din.add_(he.view(B, g, k, I_g, *in_shape[1:]).transpose(1, 2).reshape(
                            B, k, *in_shape))
                    send(src, din, False)
            elif node.kind == "activation":
                if needs_input:
                    # in place below: copy a delta held elsewhere, or kept as a result
                    delta = (d.clone(memory_format=torch.contiguous_format)
                             if shared[i] or out is None else d.contiguous())
                    curvature = c.get("curvature") if exact else None
                    ops.activation_delta_(delta, c["first"], curvature,
                                          t_in if curvature is not None else None)
                    send(src, delta, False)
            elif node.kind == "maxpool":
                if needs_input:
                    C, H, W = c["in_shape"]
                    idx = c["indices"]
                    Ho, Wo = idx.shape[-2:]
                    m = c["module"]
                    grad_in = torch.ops.aten.max_pool2d_with_indices_backward(
                        d.reshape(B, k * C, Ho, Wo), d.new_empty((B, k * C, H, W)),
                        _pair(m.kernel_size), _pair(m.stride),
                        _pair(m.padding), _pair(m.dilation), m.ceil_mode,
                        idx.unsqueeze(1).expand(B, k, C, Ho, Wo).reshape(B, k * C, Ho, Wo))
                    send(src, grad_in.view(B, k, C, H, W), False)
            elif node.kind == "avgpool":
                if needs_input:
                    C, H, W = c["in_shape"]
                    m = c["module"]
                    grad_in = torch.ops.aten.avg_pool2d_backward(
                        d.reshape(B, k * C, *d.shape[-2:]), d.new_empty((B, k * C, H, W)),
                        _pair(m.kernel_size), _pair(m.stride),
                        _pair(m.padding), m.ceil_mode, m.count_include_pad, m.divisor_override)
                    send(src, grad_in.view(B, k, C, H, W), False)
            elif node.kind == "adaptive_avgpool":
                if needs_input:
                    send(src, c["rows"].t() @ d @ c["cols"], False)
            elif node.kind == "batchnorm":
                C = d.shape[2]
                bshape = (1, 1, C) + (1,) * (d.dim() - 3)
                reduce = (0, *range(3, d.dim()))
                e = c.get("e") if exact else None
                Rg = None
                if "weight" in node.params and e is not None:
                    Rg = self._direction(directions, node.params["weight"])
                if out is not None:
                    if "weight" in node.params:
                        gg = (d * c["xhat"].unsqueeze(1)).sum(dim=reduce)
                        if e is not None and t_in is not None:
                            gg = gg + (e.unsqueeze(1) * t_in).sum(dim=reduce) * c["inv_sd"]
                        write(node.params["weight"], gg)
                    if "bias" in node.params:
                        write(node.params["bias"], d.sum(dim=reduce))
                if needs_input:
                    # over d itself where no one else holds it (a product, not the prepare)
                    owned = out is not None and not shared[i] and d.is_contiguous()
                    din = d.mul_(c["scale"].view(bshape)) if owned else d * c["scale"].view(bshape)
                    if Rg is not None:
                        din.addcmul_(e.unsqueeze(1), (Rg * c["inv_sd"]).view(1, k, C, *bshape[3:]))
                    send(src, din, False)
            elif node.kind == "reshape":
                if needs_input:
                    send(src, d.reshape(B, k, *self.shapes[src]), shared[i])
            elif node.kind == "add":
                for j in node.inputs:
                    send(j, d, True)
            elif node.kind == "identity":
                if needs_input:
                    send(src, d, shared[i])
            elif node.kind == "affine":
                if needs_input and node.factor == 1.0:
                    send(src, d, shared[i])
                elif needs_input:
                    send(src, d * node.factor, False)
            if out is not None:
                D[i] = None  # free as we go; the prepare pass keeps them all
        return D


def _subsample(x: torch.Tensor, stride) -> torch.Tensor:
    """The pixels a 1x1 convolution with this stride reads: x[..., ::s1, ::s2]."""
    if all(s == 1 for s in stride):
        return x
    return x[(Ellipsis,) + tuple(slice(None, None, s) for s in stride)]


def _upsample(sub: torch.Tensor, in_shape, stride) -> torch.Tensor:
    """The adjoint of _subsample: (N, C, pixels) back onto (N, *in_shape), zeros between."""
    if all(s == 1 for s in stride):
        return sub.view(sub.shape[0], *in_shape)
    full = sub.new_zeros((sub.shape[0], *in_shape))
    picked = _subsample(full, stride)
    picked.copy_(sub.view(picked.shape))
    return full


def _pair(v) -> list[int]:
    return list(v) if isinstance(v, (tuple, list)) else [v, v]



def _run_fx_node(n: fx.Node, env: dict) -> Any:
    """Evaluates a traced size or reshape call on the prepared forward's values."""
    args = fx.node.map_arg(n.args, lambda a: env[a])
    kwargs = fx.node.map_arg(n.kwargs, lambda a: env[a])
    if n.op == "call_method":
        return getattr(args[0], n.target)(*args[1:], **kwargs)
    return n.target(*args, **kwargs)

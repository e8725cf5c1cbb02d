"""The graph engine: GGN and exact Hessian products of convnets and residual networks.

A model is captured once with torch.fx into a list of nodes, each with the rule of its
layer kind (pyflat/engines/rules.py: linear, conv, activation, pooling, eval BatchNorm, add,
affine maps, reshapes, identity); the forward pass of a batch is prepared once (what each
rule caches: activations' s' and s'', max-pooling argmax, BatchNorm's normalised input;
softmax probabilities and, for the exact Hessian, the gradient deltas of every node);
every product then runs Pearlmutter's R-forward and the backward over the nodes for k
directions at once: tangents and deltas are (B, k, features...), so each convolution or
GEMM term is one call for all k directions. This file holds the capture, the loops and
the memory policy (which tangents and deltas a rule may overwrite, which are freed, where
fan-outs sum); no per-kind math.
"""
from __future__ import annotations

import contextlib
import copy
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from .. import ops
from ..activations import FUNCTION_READERS, METHOD_NAMES, MODULE_READERS
from ..errors import UnsupportedModel
from ..linalg import ParameterLayout
from .rules import MODULE_RULES, POOL_FUNCTION_RULES, RULES, Products, Rule, Site, run_fx_node

__all__ = ["Graph", "GraphEngine", "Node", "SUPPORTED", "capture"]

#: what the graph engine takes, for messages and documentation
SUPPORTED = ("Linear", "Conv1d", "Conv2d", "MaxPool2d", "AvgPool2d", "AdaptiveAvgPool2d",
             "BatchNorm1d", "BatchNorm2d (eval mode)", "Flatten", "Dropout (eval mode)",
             "Identity", "activations (" + ", ".join(t.__name__ for t in MODULE_READERS) + ")",
             "residual additions", "sums and products with a number",
             "view / reshape / flatten that keep the batch axis")


@dataclass
class Node:
    """One step of the captured model. ``inputs`` index earlier nodes; ``path`` says
    where it comes from (module path or function), for messages."""

    kind: str                          # the rule's name (pyflat.engines.rules.RULES)
    path: str
    inputs: list[int] = field(default_factory=list)
    module: nn.Module | None = None
    activation: tuple[str, float, float] = ("identity", 0.0, 0.0)
    params: dict[str, nn.Parameter] = field(default_factory=dict)
    fx_node: fx.Node | None = None  # reshapes and affine maps: rerun on the primal
    factor: float = 1.0                # affine nodes: the slope of the map

    @property
    def rule(self) -> Rule:
        """The rule of the node's kind (:data:`pyflat.engines.rules.RULES`)."""
        return RULES[self.kind]

    @property
    def label(self) -> str:
        """How messages name the node: "Conv2d at 'layer1.0.conv1'", "function relu 'x_1'"."""
        if self.module is not None and not self.path.startswith("function "):
            return f"{type(self.module).__name__} at '{self.path}'"
        return self.path


@dataclass
class Graph:
    """A model captured by :func:`capture`: its engine nodes in traced order (inputs
    before their users), the index of the node holding the logits, the flat parameter
    layout of the directions, every traced step (constants included) for the prepared
    forward, and the root that was traced (a shallow copy of the model), whose buffers
    the constants read."""

    nodes: list[Node]
    output: int
    layout: ParameterLayout          # model.parameters(): the flat layout of directions
    steps: list[tuple[fx.Node, int | None]]  # traced order: (fx node, engine node or None)
    root: nn.Module                  # the model, for the buffers constants read


def _unsupported(caller: str, what: str, why: str = "",
                 path: str | None = None) -> UnsupportedModel:
    reason = why or "the fused engine supports " + ", ".join(SUPPORTED)
    return UnsupportedModel(f"{caller}: unsupported {what}: {reason}", path)


def _module_node(caller: str, path: str, module: nn.Module) -> Node:
    """The node of a module call, its rule found by the module's exact type."""
    kind = type(module)
    entry = MODULE_RULES.get(kind)
    if entry is None:
        raise _unsupported(caller, f"module {kind.__name__} at '{path}'", path=path)
    why = entry.check(caller, path, module) if entry.check is not None else None
    if why:
        raise _unsupported(caller, f"module {kind.__name__} at '{path}'", why, path)
    activation = entry.activation(module) if entry.activation is not None else \
        ("identity", 0.0, 0.0)
    return Node(entry.rule.name, path, module=module, activation=activation)


# x + c, x - c, c - x, x * c, x / c, -x with c a number: the slope of each in x
_AFFINE = {operator.add: "+", torch.add: "+", operator.sub: "-", torch.sub: "-",
           operator.mul: "*", torch.mul: "*", operator.truediv: "/", torch.div: "/",
           operator.neg: "neg", torch.neg: "neg"}
# the same as tensor methods (fx records c - x, with c a tensor, as c.sub(x))
_AFFINE_METHODS = {"add": "+", "sub": "-", "mul": "*", "div": "/", "neg": "neg"}


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _affine_node(caller: str, n: fx.Node, index: dict, values: set) -> Node:
    """An affine map of one tensor by a number, or a shift by a constant tensor (a buffer
    or a slice of one) of the tensor's shape; its value is the traced call itself, so a
    constant is never dropped and rounding is the model's."""
    op = _AFFINE_METHODS[n.target] if n.op == "call_method" else _AFFINE[n.target]
    where = f"{getattr(n.target, '__name__', n.target)} '{n.name}'"
    tensors = [i for i, a in enumerate(n.args) if isinstance(a, fx.Node) and a in index]
    constants = [a for a in n.args if isinstance(a, fx.Node) and a in values]
    if op in ("+", "-") and len(n.args) == 2 and len(tensors) == 1 and len(constants) == 1 \
            and not n.kwargs:
        value, tensor = n.meta.get("value"), n.args[tensors[0]].meta.get("value")
        if not (isinstance(value, torch.Tensor) and isinstance(tensor, torch.Tensor)
                and value.shape == tensor.shape):
            raise _unsupported(caller, where, "a constant that broadcasts the model's tensor "
                               "to another shape")
        slope = -1.0 if op == "-" and tensors == [1] else 1.0
        return Node("affine", where, inputs=[index[n.args[tensors[0]]]], factor=slope,
                    fx_node=n)
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
                           "(x + c, c - x, x * c, x / c, -x) or a constant tensor of its "
                           "shape (x + c, x - c, c - x); tensors add as a + b")
    return Node("affine", where, inputs=[index[n.args[tensors[0]]]], factor=slope, fx_node=n)


class _ConcreteProxy(fx.Proxy):
    """A traced value that also holds its value on the real batch (``node.meta["value"]``):
    shape queries answer with numbers, so a forward that slices a buffer by the input's
    length, asserts on a shape or branches on one traces as it runs. Control flow on a
    tensor's values still fails to trace (the graph would hold for this batch alone)."""

    def _concrete(self, attribute: str):
        value = self.node.meta.get("value")
        if isinstance(value, torch.Tensor):
            return getattr(value, attribute)
        return fx.Proxy.__getattr__(self, attribute)

    shape = property(lambda self: self._concrete("shape"))
    ndim = property(lambda self: self._concrete("ndim"))
    dtype = property(lambda self: self._concrete("dtype"))
    device = property(lambda self: self._concrete("device"))

    def size(self, dim=None):
        size = self._concrete("shape")
        return size if dim is None or not isinstance(size, torch.Size) else size[dim]

    def dim(self):
        return self._concrete("ndim")

    def __len__(self):
        shape = self._concrete("shape")
        if isinstance(shape, torch.Size) and len(shape):
            return shape[0]
        return fx.Proxy.__len__(self)


class _ConcreteTracer(fx.Tracer):
    """torch.fx's tracer (standard modules as leaves), evaluating every node on the real
    batch as it records it. Buffers and the input are read as copies, so a forward that
    writes to them in place changes nothing while it is traced."""

    def __init__(self, example: torch.Tensor):
        super().__init__()
        self.example = example
        self._evaluating = False  # fx's patches of module calls and attributes stand aside

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _ConcreteProxy(node, self)

    def getattr(self, attr, attr_val, parameter_proxy_cache):
        if self._evaluating:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def call_module(self, m, forward, args, kwargs):
        if self._evaluating:
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None,
                     proxy_factory_fn=None):
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr,
                                     proxy_factory_fn)
        if kind != "output":
            self._value(proxy.node)
        return proxy

    def _value(self, n: fx.Node) -> Any:
        # fx records the tensors a forward uses as constants (buffers, slices of them)
        # through create_node, not create_proxy: their get_attr nodes are read here too
        if "value" not in n.meta:
            self._evaluating = True
            try:
                with torch.no_grad():
                    n.meta["value"] = self._evaluate(n)
            except Exception:  # unknown: the node stays symbolic, and the engine's own
                n.meta["value"] = None  # forward names what it cannot take
            finally:
                self._evaluating = False
        return n.meta["value"]

    def _evaluate(self, n: fx.Node) -> Any:
        if n.op == "placeholder":
            first = not any(m.op == "placeholder" for m in n.graph.nodes if m is not n)
            return self.example.clone() if first else None
        if n.op == "get_attr":
            return _copy(_attribute(self.root, n.target))
        args = fx.node.map_arg(n.args, self._value)
        kwargs = fx.node.map_arg(n.kwargs, self._value)
        if n.op == "call_module":  # forward(), not __call__: fx patches calls while tracing
            return self.root.get_submodule(n.target).forward(*args, **kwargs)
        if n.op == "call_method":
            return getattr(args[0], n.target)(*args[1:], **kwargs)
        return n.target(*args, **kwargs)


def capture(model: nn.Module, X: torch.Tensor, caller: str) -> Graph:
    """Traces ``model`` on the batch ``X`` with torch.fx into engine nodes, or raises
    UnsupportedModel naming the module or function the engine cannot take.

    Every traced value is also computed on ``X``: shapes are real numbers while tracing,
    and what depends on neither the input nor the parameters (buffers, slices of them,
    sizes) becomes a constant the prepared forward evaluates."""
    # a shallow copy: fx stores the tensors a forward creates as attributes of the root it
    # traces (_tensor_constant0, ...), which must not appear on the user's model
    root = copy.copy(model)
    try:
        graph = _ConcreteTracer(X).trace(root)
    except Exception as err:  # fx raises many kinds: control flow on values, unsupported ops
        raise UnsupportedModel(f"{caller}: torch.fx cannot trace {type(model).__name__} "
                        f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
                        "; the fused engine needs a traceable forward") from None
    nodes: list[Node] = []
    index: dict[fx.Node, int] = {}   # fx node -> engine node
    values: set[fx.Node] = set()     # constants: sizes, buffers and what is computed from them
    steps: list[tuple[fx.Node, int | None]] = []
    output = None
    parameter_names = {name for name, _ in model.named_parameters()}

    def tensor_input(arg, where: str) -> int:
        if not isinstance(arg, fx.Node) or arg not in index:
            raise _unsupported(caller, where, f"its input {arg!r} is not a tensor of the model")
        return index[arg]

    for n in graph.nodes:
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
        elif (n.op == "get_attr" and n.target not in parameter_names) or (
                n.op in ("call_function", "call_method")
                and all(a in values for a in n.all_input_nodes)) or (
                n.op == "call_method" and n.target == "size") or (
                n.op == "call_function" and n.target is getattr and n.args[1] == "shape"):
            # constants (a buffer, a slice of one, a size): evaluated on the prepared
            # forward, for the reshapes and affine maps that read them
            values.add(n)
            steps.append((n, None))
            continue
        elif n.op == "call_function" and n.target in (operator.add, torch.add) and \
                len(n.args) == 2 and all(isinstance(a, fx.Node) and a in index for a in n.args):
            if n.kwargs:
                raise _unsupported(caller, f"addition '{n.name}'", "only a + b without alpha")
            node = Node("add", f"addition '{n.name}'", inputs=[index[a] for a in n.args])
        elif (n.op == "call_function" and n.target in _AFFINE) or (
                n.op == "call_method" and n.target in _AFFINE_METHODS):
            node = _affine_node(caller, n, index, values)
        elif n.op == "call_function" and n.target in FUNCTION_READERS:
            act = FUNCTION_READERS[n.target](n.args[1:], n.kwargs)
            node = Node("activation", f"function {n.target.__name__} '{n.name}'",
                        inputs=[tensor_input(n.args[0], n.name)], activation=act)
        elif n.op == "call_method" and n.target in METHOD_NAMES and len(n.args) == 1:
            node = Node("activation", f"method {n.target} '{n.name}'",
                        inputs=[tensor_input(n.args[0], n.name)],
                        activation=(METHOD_NAMES[n.target], 0.0, 0.0))
        elif n.op == "call_function" and n.target in POOL_FUNCTION_RULES:
            # the module is built on the prepared forward: sizes may be traced values
            node = Node(POOL_FUNCTION_RULES[n.target].name,
                        f"function {n.target.__name__} '{n.name}'",
                        inputs=[tensor_input(n.args[0], n.name)], fx_node=n)
        elif (n.op == "call_function" and n.target is torch.flatten) or (
                n.op == "call_method" and n.target in ("view", "reshape", "flatten")):
            node = Node("reshape", f"{n.target if isinstance(n.target, str) else 'flatten'} "
                        f"'{n.name}'", inputs=[tensor_input(n.args[0], n.name)], fx_node=n)
        elif n.op == "call_method" and n.target == "contiguous":
            node = Node("identity", f"contiguous '{n.name}'",
                        inputs=[tensor_input(n.args[0], n.name)])
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
    for node in nodes:  # a module node's own parameters (its rule reads them by name)
        if node.module is not None:
            for name, p in node.module.named_parameters(recurse=False):
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
    return Graph(nodes, output, layout, steps, root)


def _attribute(root: nn.Module, target: str) -> Any:
    value = root
    for part in target.split("."):
        value = getattr(value, part)
    return value


def _copy(value: Any) -> Any:
    return value.detach().clone() if isinstance(value, torch.Tensor) else value


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

    The loops and the memory policy live here; what each node computes is its rule's
    (pyflat/engines/rules.py). Construction runs the forward to the logits; :meth:`prepare_loss`
    then takes the labels (checked by the caller against ``num_classes``) and prepares the
    rest.

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
        self.param_views = {}  # per node: weight/bias snapshots
        for node in nodes:
            # contiguous copies: a channels_last model would hand its layout to every
            # tangent and delta, and the per-element kernels take contiguous memory
            self.param_views[id(node)] = {k: p.detach().clone(memory_format=torch.contiguous_format)
                                          for k, p in node.params.items()}
        self.cache: list[dict[str, Any]] = [dict() for _ in nodes]
        self.sites = [Site(node, i, self.cache[i], self.param_views[id(node)], self)
                      for i, node in enumerate(nodes)]
        # tangents the exact Hessian's backward reads; the others may be overwritten or
        # freed once consumed
        self.keep = [False] * len(nodes)
        if exact:
            for i, node in enumerate(nodes):
                if node.rule.reads_input_tangent(self.sites[i]):
                    for j in node.inputs:
                        self.keep[j] = True
        self._forward(X)

    # ---------------------------------------------------------------- forward
    def _forward(self, X: torch.Tensor) -> None:
        nodes, B = self.graph.nodes, self.batch
        values: list[torch.Tensor | None] = [None] * len(nodes)
        env: dict[fx.Node, Any] = {}  # traced values by fx node, for sizes and reshapes
        with torch.no_grad():
            for n, i in self.graph.steps:
                if i is None:  # a constant: a buffer (a copy: nothing writes to the model's),
                    # a slice of one, a size
                    env[n] = (_copy(_attribute(self.graph.root, n.target)) if n.op == "get_attr"
                              else run_fx_node(n, env))
                    continue
                node = nodes[i]
                x = values[node.inputs[0]] if node.inputs else X
                values[i] = env[n] = node.rule.forward(self.sites[i], x, values, env)
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
        self.logits, self.num_classes = logits, logits.shape[1]

    def prepare_loss(self, y: torch.Tensor) -> None:
        """Softmax cross-entropy on the logits and, for the exact Hessian, the gradient
        deltas e of every node, handed to the rules that keep second-order terms."""
        loss, probs, grad = ops.softmax_cross_entropy(self.logits.contiguous(), y,
                                                      self.reduction)
        self.loss, self.probs = loss, probs
        if self.exact:
            # gradient deltas e of every node: the backward with one "direction", the
            # loss gradient, and no second-order terms
            with _reproducible(grad.device):
                deltas = self._backward(grad.unsqueeze(1), tangents=None, directions=None,
                                        out=None, exact=False)
            for i, node in enumerate(self.graph.nodes):
                e = deltas[i]
                node.rule.keep_second_order(self.sites[i], None if e is None else e.squeeze(1))

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

    def _tangents(self, directions: torch.Tensor) -> list[torch.Tensor | None]:
        nodes = self.graph.nodes
        p = Products(directions, None, directions.shape[0], self.exact, self.graph.layout)
        T: list[torch.Tensor | None] = [None] * len(nodes)
        fresh = [False] * len(nodes)  # T[i] is memory node i allocated (not a view)

        def overwritable(j: int, i: int) -> bool:
            """Whether node i may overwrite its input's tangent: i is its only reader."""
            return T[j] is not None and fresh[j] and self.users[j] == [i] and not self.keep[j]

        for i, node in enumerate(nodes):
            if not self.carries[i]:
                continue
            T[i], fresh[i] = node.rule.tangent(self.sites[i], [T[j] for j in node.inputs],
                                               [overwritable(j, i) for j in node.inputs], p)
            if T[i] is not None and not T[i].is_contiguous():
                T[i], fresh[i] = T[i].contiguous(), True
            for j in node.inputs:  # free what no later node reads
                if self.users[j][-1] == i and not self.keep[j]:
                    T[j] = None
        return T

    def _backward(self, d_out: torch.Tensor, tangents, directions, out, exact: bool):
        """Runs deltas from the logits (B, k, C) back through the nodes. With ``out``
        (k, P), writes the parameter gradients there; returns the deltas of every node."""
        nodes = self.graph.nodes
        p = Products(directions, out, d_out.shape[1], exact, self.graph.layout)
        D: list[torch.Tensor | None] = [None] * len(nodes)
        shared = [False] * len(nodes)   # D[i] is also held elsewhere: copy before in place
        D[self.graph.output] = d_out

        for i in range(len(nodes) - 1, -1, -1):
            node, d = nodes[i], D[i]
            if d is None:
                continue
            t_in = tangents[node.inputs[0]] if (exact and node.inputs) else None
            sends = node.rule.backward(self.sites[i], d, t_in,
                                       [self.carries[j] for j in node.inputs], shared[i], p)
            for position, delta, alias in sends:
                j = node.inputs[position]
                if not self.carries[j]:
                    continue
                if D[j] is None:  # a fan-out sums its deltas
                    D[j], shared[j] = delta, alias
                else:
                    D[j], shared[j] = D[j] + delta, False
            if out is not None:
                D[i] = None  # free as we go; the prepare pass keeps them all
        return D

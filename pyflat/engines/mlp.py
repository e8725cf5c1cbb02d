"""Reading an nn.Module into the engine's description of an MLP.

The MLP engine takes a chain of Linear layers with at most one elementwise activation
after each. This module walks an ``nn.Sequential`` (nested ones too), checks that every
module is one the engine computes exactly, and says which module is not, by its path;
a model it does not take goes to the graph engine (pyflat/engines/graph.py) instead.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..activations import MODULE_READERS
from ..errors import UnsupportedModel

__all__ = ["MLPSpec", "check_plain_modules", "parse_mlp", "SUPPORTED_MODULES"]

SUPPORTED_MODULES = ("Linear", "Flatten", "Identity", "Dropout (eval mode)") + tuple(
    t.__name__ for t in MODULE_READERS)


@dataclass
class MLPSpec:
    """A model as the engine sees it; ``parameters`` follow the flat direction layout,
    which equals ``list(model.parameters())``."""

    weights: list[torch.Tensor] = field(default_factory=list)
    biases: list[torch.Tensor | None] = field(default_factory=list)
    activations: list[str] = field(default_factory=list)
    activation_params: list[float] = field(default_factory=list)
    linear_paths: list[str] = field(default_factory=list)
    # the activation module after each Linear (None for identity)
    activation_modules: list[nn.Module | None] = field(default_factory=list)
    parameters: list[nn.Parameter] = field(default_factory=list)
    # (path, module) applied to the input before the first Linear: Flatten, activations
    input_modules: list[tuple[str, nn.Module]] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        """C, the output width of the last Linear layer (the number of logits)."""
        return self.weights[-1].shape[0]

    @property
    def in_features(self) -> int:
        """The input width of the first Linear layer."""
        return self.weights[0].shape[1]

    def transform_input(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` through the modules before the first Linear layer (Flatten, activations),
        without gradients: the (B, in_features) input of the engine."""
        with torch.no_grad():
            for _, module in self.input_modules:
                x = module(x)
        return x


def _unsupported(caller: str, path: str, module: nn.Module, why: str = "") -> UnsupportedModel:
    reason = why or ("the MLP engine supports " + ", ".join(SUPPORTED_MODULES))
    return UnsupportedModel(f"{caller}: unsupported module {type(module).__name__} at '{path}': "
                            f"{reason}", path)


def check_plain_modules(model: nn.Module, caller: str) -> None:
    """Refuses, with UnsupportedModel naming the module, what makes ``model(X)`` compute more
    than its modules' own rules: forward hooks and pre-hooks (on any module, or the global
    ones of ``torch.nn.modules.module``), parametrized tensors, and a ``forward`` or
    ``__call__`` replaced on an instance. The fused engines read the modules, not the
    call, so they would compute another function; the reference backend runs the call.
    """
    hooks = torch.nn.modules.module
    for name, register in (("_global_forward_hooks", "register_module_forward_hook"),
                           ("_global_forward_pre_hooks", "register_module_forward_pre_hook")):
        if getattr(hooks, name, None):
            raise UnsupportedModel(f"{caller}: a global forward hook is registered "
                                   f"(torch.nn.modules.module.{register}); it changes every "
                                   "module's output, and the fused engines read the modules' "
                                   "rules, not the hooked calls")
    for path, module in model.named_modules():
        where = f"{type(module).__name__} at '{path or '<model>'}'"
        if module._forward_hooks or module._forward_pre_hooks:
            kind = "forward hook" if module._forward_hooks else "forward pre-hook"
            raise UnsupportedModel(f"{caller}: {where} has a {kind}; the fused engines compute "
                                   "the module's own rule and would not run it", path)
        if torch.nn.utils.parametrize.is_parametrized(module):
            names = ", ".join(module.parametrizations.keys())
            raise UnsupportedModel(f"{caller}: {where} has parametrized tensors ({names}, "
                                   "torch.nn.utils.parametrize); the fused engines take plain "
                                   "parameters", path)
        for attribute in ("forward",) + _CALL_PATH:
            if attribute in vars(module):
                raise UnsupportedModel(f"{caller}: {where} has its {attribute} replaced on the "
                                       "instance; the fused engines compute the module's own "
                                       "rule", path)
    # torch.fx traces the root's forward(), so a call that does more is never seen; calls of
    # submodules are traced through, and the MLP engine reads only exact layer types.
    overridden = _overridden_call(model)
    if overridden is not None:
        raise UnsupportedModel(f"{caller}: {type(model).__name__} at '<model>' overrides "
                               f"{overridden}, so model(X) runs more than its forward(); the "
                               "fused engines compute forward()", "")


#: what ``module(x)`` runs before it reaches ``forward``
_CALL_PATH = ("__call__", "_wrapped_call_impl", "_call_impl")


def _overridden_call(module: nn.Module) -> str | None:
    """The name of the call method ``type(module)`` overrides, if any."""
    return next((name for name in _CALL_PATH
                 if getattr(type(module), name, None) is not getattr(nn.Module, name, None)),
                None)


def _own_forward(module: nn.Module) -> bool:
    """Whether a container overrides the chain that nn.Sequential.forward runs."""
    return type(module).forward is not nn.Sequential.forward or \
        _overridden_call(module) is not None


def _leaves(module: nn.Module, path: str, caller: str):
    if isinstance(module, nn.Sequential):
        if _own_forward(module):
            raise _unsupported(caller, path or "<model>", module,
                               "it is an nn.Sequential with its own forward(), which the MLP "
                               "engine cannot read as a chain of layers")
        # _modules, not named_children(): the latter skips a module that appears twice,
        # and a reused activation (act = nn.ReLU() in two places) runs twice.
        for name, child in module._modules.items():
            if child is None:
                continue
            yield from _leaves(child, f"{path}.{name}" if path else name, caller)
    else:
        yield path or "<model>", module


def parse_mlp(model: nn.Module, caller: str) -> MLPSpec:
    """Describes ``model`` for the engine, or raises UnsupportedModel naming what it cannot
    take.

    Args:
        model: an ``nn.Sequential`` (nested allowed) of Linear layers, activations
            (ReLU, LeakyReLU, Tanh, Sigmoid, GELU, Softplus, ELU, SiLU), Flatten, Identity
            and Dropout in eval mode; or a single Linear layer.
        caller: the public name the errors speak for (e.g. ``"pyflat.GGN"``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"{caller}: model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(model, (nn.Sequential, nn.Linear)) and any(True for _ in model.children()):
        raise _unsupported(caller, "<model>", model,
                           "a module with its own forward() cannot be read as a chain of "
                           "layers; the MLP engine takes an nn.Sequential (nested allowed) of "
                           + ", ".join(SUPPORTED_MODULES))
    spec = MLPSpec()
    activation_after: str | None = None  # path of the activation following the last Linear
    for path, module in _leaves(model, "", caller):
        kind = type(module)
        if kind is nn.Linear:
            spec.weights.append(module.weight.detach())
            spec.biases.append(None if module.bias is None else module.bias.detach())
            spec.activations.append("identity")
            spec.activation_params += [0.0, 0.0]
            spec.linear_paths.append(path)
            spec.activation_modules.append(None)
            spec.parameters.append(module.weight)
            if module.bias is not None:
                spec.parameters.append(module.bias)
            activation_after = None
        elif kind in MODULE_READERS:
            name, p0, p1 = MODULE_READERS[kind](module)
            if not spec.weights:
                spec.input_modules.append((path, module))
            elif activation_after is not None:
                raise _unsupported(caller, path, module,
                                   f"it directly follows the activation at '{activation_after}'; "
                                   "the MLP engine takes at most one activation after each "
                                   "Linear")
            else:
                spec.activations[-1] = name
                spec.activation_params[-2:] = [p0, p1]
                spec.activation_modules[-1] = module
                activation_after = path
        elif kind is nn.Flatten:
            if module.start_dim != 1 or module.end_dim != -1:
                raise _unsupported(caller, path, module,
                                   f"only Flatten(start_dim=1, end_dim=-1) is supported, got "
                                   f"start_dim={module.start_dim}, end_dim={module.end_dim}")
            if not spec.weights:
                spec.input_modules.append((path, module))
        elif kind is nn.Identity:
            continue
        elif kind is nn.Dropout:
            if module.training and module.p > 0:
                raise _unsupported(caller, path, module,
                                   "Dropout is in training mode, so every product would draw a "
                                   "new mask; call model.eval() first")
        else:
            raise _unsupported(caller, path, module)
    if not spec.weights:
        raise UnsupportedModel(f"{caller}: model has no Linear layer; the MLP engine needs at "
                               "least one")

    own = list(model.parameters())
    if len(own) != len(spec.parameters) or any(a is not b for a, b in zip(own, spec.parameters)):
        raise UnsupportedModel(f"{caller}: the model's parameters are not the Linear layers' "
                               "weights and biases in order (is a Linear layer used twice?); "
                               "shared parameters are not supported")
    return spec

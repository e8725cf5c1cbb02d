"""Input checks of the curvature front door, shared by every back end.

What the arguments alone decide (a batch's shape, dtype, device and labels; the model's
dtype, device, mode and BatchNorm statistics) is checked once, before any engine runs;
``check_reproduces`` is the fused engines' proof that they compute ``model(X)``.
"""
from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Sequence

import torch
from torch import nn

from ..errors import UnsupportedModel
from ..precision import full_precision


def check_batch(data, dtype: torch.dtype, device: torch.device, num_classes: int | None,
                caller: str, allow_integer: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Validates a batch ``(X, y)`` for a model of the given dtype, device and classes
    (the label range is checked when ``num_classes`` is given). ``allow_integer`` admits
    an integer X (token ids), which has no tangent; a float X must have the model's
    dtype either way."""
    if not isinstance(data, (tuple, list)) or len(data) != 2:
        raise TypeError(f"{caller}: data must be a pair (X, y) of tensors, got "
                        f"{type(data).__name__}")
    X, y = data
    if not isinstance(X, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise TypeError(f"{caller}: data must be a pair (X, y) of tensors, got "
                        f"({type(X).__name__}, {type(y).__name__})")
    integer = not (X.dtype.is_floating_point or X.dtype.is_complex or X.dtype == torch.bool)
    if X.dtype != dtype and not (integer and allow_integer):
        if integer:  # a valid input the autograd backend takes; it has no tangent here
            raise UnsupportedModel(f"{caller}: X must have the model's dtype {dtype}, got "
                                   f"{X.dtype} (integer inputs such as token ids run through "
                                   "backend='reference')")
        raise TypeError(f"{caller}: X must have the model's dtype {dtype}, got {X.dtype}")
    if X.device != device or y.device != device:
        raise ValueError(f"{caller}: X and y must be on the model's device {device}, got "
                         f"{X.device} and {y.device}")
    if X.dim() < 2 or X.shape[0] == 0:
        raise ValueError(f"{caller}: X must be (batch, features...) with batch >= 1, got "
                         f"{tuple(X.shape)}")
    if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        raise TypeError(f"{caller}: y must hold integer class indices, got {y.dtype} "
                        "(soft labels are not supported)")
    if y.shape != (X.shape[0],):
        raise ValueError(f"{caller}: y must have shape ({X.shape[0]},) to match X, got "
                         f"{tuple(y.shape)}")
    if not bool(torch.isfinite(X).all()):
        raise ValueError(f"{caller}: X holds NaN or inf")
    if num_classes is not None:
        check_labels(y, num_classes, caller)
    return X, y.long()


def check_labels(y: torch.Tensor, num_classes: int, caller: str) -> None:
    """Every label of y (B,) must be a class index in [0, num_classes)."""
    low, high = int(y.min()), int(y.max())
    if low < 0 or high >= num_classes:
        bad = low if low < 0 else high
        raise ValueError(f"{caller}: y must hold class indices in [0, {num_classes}), got {bad}")


def model_dtype_device(parameters: Sequence[torch.Tensor], paths: Sequence[str],
                        caller: str, kernels: bool = True) -> tuple[torch.dtype, torch.device]:
    """The model's one dtype (float32 or float64) and device, its parameters finite;
    with ``kernels``, pyflat's ops must exist for that device (the fused engines)."""
    dtypes = {p.dtype for p in parameters}
    devices = {p.device for p in parameters}
    if len(dtypes) != 1 or len(devices) != 1:
        raise TypeError(f"{caller}: all parameters must share one dtype and device, got "
                        f"{sorted(map(str, dtypes))} on {sorted(map(str, devices))}")
    dtype, device = dtypes.pop(), devices.pop()
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{caller}: the model must be float32 or float64, got {dtype}")
    if kernels and not torch._C._dispatch_has_kernel_for_dispatch_key("pyflat::mlp_forward",
                                                                       device.type.upper()):
        raise ValueError(f"{caller}: this build of pyflat has no kernels for {device.type} "
                         f"devices; the model is on {device}")
    for p, path in zip(parameters, paths):
        if not bool(torch.isfinite(p).all()):
            raise ValueError(f"{caller}: parameter '{path}' holds NaN or inf")
    return dtype, device


def check_eval_mode(model: nn.Module, caller: str) -> None:
    """Dropout draws new masks and BatchNorm uses batch statistics in training mode: the
    curvature is of the eval-mode function, so such models must be in eval mode."""
    for path, module in model.named_modules():
        if module.training and isinstance(module, (nn.modules.dropout._DropoutNd,
                                                   nn.modules.batchnorm._BatchNorm)):
            raise ValueError(f"{caller}: {type(module).__name__} at '{path or '<model>'}' is in "
                             "training mode; curvature is measured in eval mode: call "
                             "model.eval() first")


def check_model_state(model: nn.Module, caller: str) -> None:
    """BatchNorm's running statistics define the eval-mode function: a NaN, an infinity
    or a negative variance makes model(X) meaningless, so it is refused by every backend."""
    for path, module in model.named_modules():
        if not isinstance(module, nn.modules.batchnorm._BatchNorm) or \
                module.running_mean is None:
            continue
        where = f"{type(module).__name__} at '{path or '<model>'}'"
        for name in ("running_mean", "running_var"):
            stat = getattr(module, name)
            if not bool(torch.isfinite(stat).all()):
                raise ValueError(f"{caller}: {where} has {name} with NaN or inf entries")
        if bool((module.running_var < 0).any()):
            raise ValueError(f"{caller}: {where} has running_var with negative entries "
                             f"(min {float(module.running_var.min()):.3g}); a variance is >= 0")


def forward_tolerance(dtype: torch.dtype) -> float:
    """How far an engine's logits may sit from model(X), relative to their largest
    magnitude: a few dozen rounding errors of the dtype (measured engine-vs-module gaps
    are 0-6 ulps on deep MLPs), far below any dropped constant or skipped hook."""
    return 64 * torch.finfo(dtype).eps


#: set while a data set prepares again a batch whose logits were checked at construction
#: (the same samples, by fingerprint, and the same model state): the check's extra
#: forward would cost a fifth of each product
_FORWARD_CHECKED = contextvars.ContextVar("pyflat_forward_checked", default=False)


@contextlib.contextmanager
def forward_already_checked():
    """Within this context the fused engines skip :func:`check_reproduces`: for batches
    prepared again whose samples and model state were proven the same."""
    token = _FORWARD_CHECKED.set(True)
    try:
        yield
    finally:
        _FORWARD_CHECKED.reset(token)


def check_reproduces(model: nn.Module, X: torch.Tensor, logits: torch.Tensor, caller: str,
                      what: str) -> None:
    """The fused engines' second line of defence, after the structural checks: the
    prepared logits must be model(X). NaN-aware: a non-finite output is refused outright."""
    if _FORWARD_CHECKED.get():
        return
    with torch.no_grad(), full_precision(X.device):
        expected = model(X.clone())  # a forward may write to its input in place
    if not isinstance(expected, torch.Tensor) or expected.shape != logits.shape:
        got = tuple(expected.shape) if isinstance(expected, torch.Tensor) else \
            type(expected).__name__
        raise UnsupportedModel(f"{caller}: the {what} gives logits of shape "
                               f"{tuple(logits.shape)}, model(X) gives {got}")
    if not bool(torch.isfinite(expected).all()):
        raise ValueError(f"{caller}: model(X) is not finite (NaN or inf in the logits); "
                         "check the weights, the inputs and BatchNorm's running statistics")
    scale = float(expected.abs().max()) or 1.0
    gap = float((expected - logits.to(expected.dtype)).abs().max())
    if not gap <= forward_tolerance(expected.dtype) * scale:
        raise UnsupportedModel(f"{caller}: the {what} does not reproduce model(X) (relative "
                               f"gap {gap / scale:.1e}): the forward does something the engine "
                               "cannot see")

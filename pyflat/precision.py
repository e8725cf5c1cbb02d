"""Precision switches: pyflat's float32 products run in full IEEE precision unless asked.

torch lets float32 GEMMs and convolutions compute in reduced precision: TF32 on NVIDIA
GPUs (10 mantissa bits: a float32 GGN product with TF32 is off by ~1e-3 relative), and
bf16 through oneDNN on CPUs that have it (on an AVX512-BF16 CPU, torch 2.13: a float32
GEMM's error about doubles, and a float32 MLP GGN product's goes from 1.4e-7 to 3.5e-7).
These switches are process-wide and often turned on for training, so pyflat's products
and the reference set them to full precision for the duration of each product and
restore the caller's settings after, also when the product raises.
``pyflat.set_allow_tf32(True)`` lets pyflat use TF32 on NVIDIA GPUs; nothing lets it use
bf16 for float32.

torch >= 2.9 has ``fp32_precision`` settings, a tree whose levels inherit from their
parent where set to ``"none"``::

    torch.backends.fp32_precision                     generic/all
    |- torch.backends.cudnn.fp32_precision            cuda/all
    |  |- torch.backends.cuda.matmul.fp32_precision   cuda/matmul
    |  |- torch.backends.cudnn.conv.fp32_precision    cuda/conv
    |  '- torch.backends.cudnn.rnn.fp32_precision     cuda/rnn
    '- torch.backends.mkldnn.fp32_precision           mkldnn/all
       |- torch.backends.mkldnn.matmul.fp32_precision mkldnn/matmul
       |- torch.backends.mkldnn.conv.fp32_precision   mkldnn/conv
       '- torch.backends.mkldnn.rnn.fp32_precision    mkldnn/rnn

with values "ieee", "tf32", "bf16" (oneDNN only) or "none". The guard sets the matmul and
conv levels of the product's device ("cuda" on NVIDIA GPUs, "mkldnn", i.e. oneDNN,
elsewhere) and puts back each level's own setting, "none" included, so a level that
inherited before inherits again after. It never reads the legacy ``allow_tf32`` switches:
there reading them raises once the levels disagree with what one boolean can say (after
``torch.backends.cuda.matmul.fp32_precision = "tf32"``, say), and so inside the guard too
(``torch.backends.cudnn.allow_tf32`` even at torch's defaults: cuDNN's conv level is then
"ieee", its rnn level "tf32"). On older torch the guard sets and restores the
legacy switches (``torch.set_float32_matmul_precision``, whose "medium" also lets oneDNN
use bf16, and ``torch.backends.cudnn.allow_tf32``).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["get_allow_tf32", "set_allow_tf32", "full_precision"]

_ALLOW_TF32 = False

# torch >= 2.9. The private getter and setter under the public attributes take any level
# by name; the public ``torch.backends.mkldnn.fp32_precision`` setter writes the generic
# level instead of its own (torch 2.13), so mkldnn/all could not be put back through it.
_HAS_FP32_PRECISION = hasattr(torch._C, "_get_fp32_precision_getter") and \
    hasattr(torch._C, "_set_fp32_precision_setter")

# the levels full_precision sets, under each backend's "all"
_OPS = ("matmul", "conv")


def set_allow_tf32(enabled: bool) -> None:
    """Lets pyflat's products (and the reference) use TF32 GEMMs on NVIDIA GPUs.

    A process-wide switch, False by default. With it on, float32 GEMMs and convolutions
    inside pyflat's products on a CUDA device run in TF32 (10 mantissa bits: a float32
    GGN product is then off by ~1e-3 relative); float64 products, CPU products and
    torch's own settings outside the products are unaffected.

    Args:
        enabled: a bool (TypeError otherwise).
    """
    global _ALLOW_TF32
    if not isinstance(enabled, bool):
        raise TypeError(f"set_allow_tf32: enabled must be a bool, got {type(enabled).__name__}")
    _ALLOW_TF32 = enabled


def get_allow_tf32() -> bool:
    """Whether pyflat's products may use TF32 on NVIDIA GPUs (:func:`set_allow_tf32`);
    False unless set."""
    return _ALLOW_TF32


def _own_precisions(backend: str) -> dict[tuple[str, str], str]:
    """The matmul and conv levels' own fp32_precision settings under ``backend``, "none"
    where a level inherits.

    torch's getter returns the effective value (a "none" level reads as its parent's), so
    the levels are read while the two above them, generic/all and ``backend``/all, are
    "none" for the moment."""
    get, put = torch._C._get_fp32_precision_getter, torch._C._set_fp32_precision_setter
    above: dict[tuple[str, str], str] = {}
    try:
        for level in (("generic", "all"), (backend, "all")):
            above[level] = get(*level)
            put(*level, "none")
        return {(backend, op): get(backend, op) for op in _OPS}
    finally:
        for level, value in above.items():
            put(*level, value)


@contextlib.contextmanager
def _legacy_full_precision(device: torch.device) -> Iterator[None]:
    """torch without fp32_precision: the legacy switches. The float32 matmul precision
    covers cuBLAS and oneDNN ("medium" lets oneDNN use bf16), cudnn.allow_tf32 the cuDNN
    convolutions."""
    tf32 = _ALLOW_TF32 and device.type == "cuda"
    matmul, cudnn = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    try:
        torch.set_float32_matmul_precision("high" if tf32 else "highest")
        torch.backends.cudnn.allow_tf32 = tf32
        yield
    finally:
        torch.set_float32_matmul_precision(matmul)
        torch.backends.cudnn.allow_tf32 = cudnn


@contextlib.contextmanager
def full_precision(device: torch.device | str) -> Iterator[None]:
    """Within the block, float32 GEMMs and convolutions on ``device`` run in IEEE
    precision (TF32 on NVIDIA GPUs if :func:`set_allow_tf32` allows it); on exit every
    precision setting is again exactly what it was, "none" (inherit) included.

    Example:
        >>> torch.backends.mkldnn.matmul.fp32_precision = "bf16"
        >>> with full_precision(torch.device("cpu")):
        ...     torch.backends.mkldnn.matmul.fp32_precision
        'ieee'
        >>> torch.backends.mkldnn.matmul.fp32_precision
        'bf16'
    """
    device = torch.device(device)
    if not _HAS_FP32_PRECISION:
        with _legacy_full_precision(device):
            yield
        return
    backend = "cuda" if device.type == "cuda" else "mkldnn"
    precision = "tf32" if backend == "cuda" and _ALLOW_TF32 else "ieee"
    put = torch._C._set_fp32_precision_setter
    own = _own_precisions(backend)
    try:
        for level in own:
            put(*level, precision)
        yield
    finally:
        for level, value in own.items():
            put(*level, value)

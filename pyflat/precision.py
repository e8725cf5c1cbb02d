"""Precision switches: pyflat keeps TF32 off on NVIDIA GPUs unless asked.

TF32 GEMMs keep 10 mantissa bits: fine for training, not for curvature that users publish
(a float32 GGN product with TF32 is off by ~1e-3 relative). torch's own switches
(``torch.backends.cuda.matmul.allow_tf32``, ``torch.backends.cudnn.allow_tf32``; the
latter defaults to on) are process-wide and often turned on for training, so pyflat's
products and the reference set them for the duration of each product and restore them
after. ``pyflat.set_allow_tf32(True)`` lets pyflat use TF32.
"""
from __future__ import annotations

import contextlib

import torch

__all__ = ["get_allow_tf32", "set_allow_tf32", "full_precision"]

_ALLOW_TF32 = False


def set_allow_tf32(enabled: bool) -> None:
    """Lets pyflat's products (and the reference) use TF32 GEMMs on NVIDIA GPUs."""
    global _ALLOW_TF32
    if not isinstance(enabled, bool):
        raise TypeError(f"set_allow_tf32: enabled must be a bool, got {type(enabled).__name__}")
    _ALLOW_TF32 = enabled


def get_allow_tf32() -> bool:
    return _ALLOW_TF32


@contextlib.contextmanager
def full_precision(device: torch.device):
    """Within the block, CUDA GEMMs and convolutions use TF32 only if pyflat allows it."""
    if torch.device(device).type != "cuda":
        yield
        return
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = _ALLOW_TF32
    torch.backends.cudnn.allow_tf32 = _ALLOW_TF32
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul
        torch.backends.cudnn.allow_tf32 = cudnn

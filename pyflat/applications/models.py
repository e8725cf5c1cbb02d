"""The models the applications build: MLPs and a small CNN for the 8x8 digits, each
initialised from a seed (torch's default initialisation after ``torch.manual_seed``)."""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["digits_cnn", "mlp"]


def mlp(widths: list[int], activation: type[nn.Module] = nn.ReLU,
        seed: int = 0) -> nn.Sequential:
    """Linear layers widths[0] -> ... -> widths[-1] with ``activation()`` between them
    (float32; ``.double()`` for float64). ``[64, 10]`` is logistic regression."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (d_in, d_out) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(d_in, d_out))
        if i + 2 < len(widths):
            layers.append(activation())
    return nn.Sequential(*layers)


def digits_cnn(seed: int = 0) -> nn.Sequential:
    """A small CNN for 8x8 digits: two 3x3 convolutions (16, 32 channels), ReLU, 2x2 max
    pooling, a linear classifier (9,930 parameters)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(32 * 4 * 4, 10))

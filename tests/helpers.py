"""Shared builders for the tests: small MLPs, batches, comparisons in float64, and an
autograd oracle with exact saturation. Imported by the tests; fixtures live in conftest.py."""
from __future__ import annotations

import torch
from torch import nn

# One constructor per activation the engine supports; parameters chosen so that every
# branch is exercised (Softplus with a low threshold reaches its linear branch).
ACTIVATION_MODULES = {
    "identity": nn.Identity,
    "relu": nn.ReLU,
    "leaky_relu": lambda: nn.LeakyReLU(0.2),
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "gelu": nn.GELU,
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "softplus": lambda: nn.Softplus(beta=1.5, threshold=2.0),
    "elu": lambda: nn.ELU(alpha=0.8),
    "silu": nn.SiLU,
}


class ResidualMLP(nn.Module):
    """A model with its own forward: a skip connection around LayerNorm, which the fused
    engines do not take (5 features in, 3 classes)."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(5, 8)
        self.block = nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 8), nn.Tanh())
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        h = torch.relu(self.inp(x))
        return self.out(h + self.block(h))


def make_mlp(widths, activation="tanh", dtype=torch.float64, seed=0, bias=True,
             scale=1.0) -> nn.Sequential:
    """Linear layers widths[0] -> ... -> widths[-1] with `activation` between them."""
    gen = torch.Generator().manual_seed(seed)
    layers = []
    for i, (d_in, d_out) in enumerate(zip(widths[:-1], widths[1:])):
        lin = nn.Linear(d_in, d_out, bias=bias)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(d_out, d_in, generator=gen) * scale / d_in ** 0.5)
            if bias:
                lin.bias.copy_(torch.randn(d_out, generator=gen) * 0.5)
        layers.append(lin)
        if i + 2 < len(widths):
            layers.append(ACTIVATION_MODULES[activation]())
    return nn.Sequential(*layers).to(dtype)


def make_batch(batch, features, classes, dtype=torch.float64, seed=1):
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(batch, features, generator=gen, dtype=dtype)
    y = torch.randint(0, classes, (batch,), generator=gen)
    return X, y


def num_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def random_block(P, k, dtype=torch.float64, seed=2):
    return torch.randn(P, k, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def symmetric(eigenvalues, seed=0) -> torch.Tensor:
    """A dense float64 symmetric matrix with the given eigenvalues, random eigenvectors."""
    n = len(eigenvalues)
    gen = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return Q @ torch.diag(torch.as_tensor(eigenvalues, dtype=torch.float64)) @ Q.T


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| (0 if both vanish)."""
    scale = expected.abs().max().item()
    diff = (actual - expected).abs().max().item()
    return diff / scale if scale > 0 else diff


def assert_within_float32_autograd(ours: float, autograd: float) -> None:
    """The float32 bar for a product's relative error against float64: within 4x float32
    autograd's own error on the same problem (floor: 8 float32 epsilons)."""
    assert ours <= 4 * max(autograd, 8 * torch.finfo(torch.float32).eps), (ours, autograd)


def _tanh_exact(z: torch.Tensor) -> torch.Tensor:
    # (1 - e) / (1 + e) with e = exp(-2|z|), a branch per sign; clamping keeps the branch
    # not taken finite, so its zero gradient stays zero
    e_pos = torch.exp(-2 * z.clamp(min=0))
    e_neg = torch.exp(2 * z.clamp(max=0))
    return torch.where(z >= 0, (1 - e_pos) / (1 + e_pos), (e_neg - 1) / (e_neg + 1))


def _sigmoid_exact(z: torch.Tensor) -> torch.Tensor:
    e_pos = torch.exp(-z.clamp(min=0))
    e_neg = torch.exp(z.clamp(max=0))
    return torch.where(z >= 0, 1 / (1 + e_pos), e_neg / (1 + e_neg))


class exact_saturation(torch.overrides.TorchFunctionMode):
    """Runs tanh and sigmoid as compositions whose autograd derivatives (all orders, both
    modes) keep their relative accuracy past saturation. Autograd's own rules, 1 - t^2 and
    s (1 - s), round to 0 once t or s rounds to 1 (|z| > 19 for tanh in float64), where
    the true derivative is about 4 exp(-2|z|); the fused engines use that form. Only for
    tests: an oracle to settle which side of a disagreement is right."""

    _TANH = (torch.tanh, torch.Tensor.tanh, torch.nn.functional.tanh)
    _SIGMOID = (torch.sigmoid, torch.Tensor.sigmoid, torch.special.expit,
                torch.nn.functional.sigmoid)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self._TANH and len(args) == 1 and not kwargs:
            return _tanh_exact(args[0])
        if func in self._SIGMOID and len(args) == 1 and not kwargs:
            return _sigmoid_exact(args[0])
        return func(*args, **kwargs)

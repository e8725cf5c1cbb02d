"""Randomized trace and Frobenius-norm estimators with standard errors.

All probes of an estimate run as blocks of products (``A @ V`` with V of shape (n, k)),
not as a loop of single products. Probes are drawn in float64 on the CPU from an explicit
seed or generator, so the same call gives the same numbers on any device.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from .lanczos import _check_operator, _generator

__all__ = ["Estimate", "hutchinson_trace", "hutchpp_trace", "frobenius_norm"]


@dataclass
class Estimate:
    """A randomized estimate.

    Attributes:
        value: the estimate.
        stderr: its standard error (sample standard deviation of the per-probe terms over
            sqrt of their number); 0 for a part computed exactly.
        products: operator products used.
        samples: the per-probe terms whose mean is the random part of the estimate.
    """

    value: float
    stderr: float
    products: int
    samples: torch.Tensor

    def __repr__(self) -> str:
        return f"Estimate({self.value:.6g} +- {self.stderr:.2g}, products={self.products})"


def _probes(n: int, count: int, distribution: str, gen: torch.Generator) -> torch.Tensor:
    if distribution == "rademacher":
        return torch.randint(0, 2, (n, count), generator=gen).to(torch.float64).mul_(2).sub_(1)
    if distribution == "gaussian":
        return torch.randn(n, count, generator=gen, dtype=torch.float64)
    raise ValueError(f"distribution must be 'rademacher' or 'gaussian', got {distribution!r}")


def _apply_blocks(A, V: torch.Tensor, block_size: Optional[int]) -> torch.Tensor:
    """A @ V in float64, with the columns of V sent in blocks of ``block_size``."""
    step = V.shape[1] if block_size is None else block_size
    outs = []
    for block in V.split(step, dim=1):
        out = A @ block.to(dtype=A.dtype, device=A.device)
        outs.append(out.to(dtype=torch.float64, device=V.device))
    return torch.cat(outs, dim=1)


def _check_count(name: str, value, minimum: int, caller: str) -> None:
    if not isinstance(value, int) or value < minimum:
        raise ValueError(f"{caller}: {name} must be an int >= {minimum}, got {value!r}")


def _mean_and_stderr(samples: torch.Tensor) -> tuple[float, float]:
    m = samples.numel()
    stderr = float(samples.std(unbiased=True)) / math.sqrt(m) if m > 1 else math.inf
    return float(samples.mean()), stderr


def hutchinson_trace(A, num_probes: int = 100, distribution: str = "rademacher", *,
                     seed: Optional[int] = None, generator: Optional[torch.Generator] = None,
                     block_size: Optional[int] = None) -> Estimate:
    """Hutchinson's estimator tr(A) ~ mean_i v_i^T A v_i (Hutchinson 1989).

    With Rademacher probes the variance of one term is 2 (||A||_F^2 - sum_i A_ii^2);
    Gaussian probes give 2 ||A||_F^2.

    Args:
        A: symmetric operator (pyflat operator, reference operator, dense tensor).
        num_probes: number of probes (= products).
        distribution: 'rademacher' or 'gaussian'.
        seed, generator: randomness of the probes.
        block_size: probes per product call (default: all at once).

    Example:
        >>> est = pyflat.hutchinson_trace(pyflat.Hessian(model, (X, y)), 200, seed=0)
        >>> est.value, est.stderr
    """
    n = _check_operator(A, "pyflat.hutchinson_trace")
    _check_count("num_probes", num_probes, 2, "pyflat.hutchinson_trace")
    gen = _generator(seed, generator)
    V = _probes(n, num_probes, distribution, gen)
    samples = (V * _apply_blocks(A, V, block_size)).sum(0)
    value, stderr = _mean_and_stderr(samples)
    return Estimate(value, stderr, num_probes, samples)


def hutchpp_trace(A, num_products: int = 102, distribution: str = "rademacher", *,
                  seed: Optional[int] = None, generator: Optional[torch.Generator] = None,
                  block_size: Optional[int] = None) -> Estimate:
    """Hutch++ (Meyer, Musco, Musco, Woodruff 2021): the trace of a low-rank sketch,
    computed exactly, plus Hutchinson on the deflated rest.

    With m = num_products // 3: Q = orth(A S) for m random S; tr(A) ~ tr(Q^T A Q) +
    mean_i g_i^T (I - QQ^T) A (I - QQ^T) g_i over m probes g. The standard error is that of
    the Hutchinson part (the sketch part has none given Q). Far fewer products than
    Hutchinson for a decaying spectrum, as curvature spectra of trained nets are.

    Args:
        num_products: total products, a multiple of 3 used in full (at least 6).
        Other arguments as :func:`hutchinson_trace`.
    """
    n = _check_operator(A, "pyflat.hutchpp_trace")
    _check_count("num_products", num_products, 6, "pyflat.hutchpp_trace")
    gen = _generator(seed, generator)
    m = num_products // 3
    S = _probes(n, m, distribution, gen)
    Q, _ = torch.linalg.qr(_apply_blocks(A, S, block_size))
    sketch = float((Q * _apply_blocks(A, Q, block_size)).sum())
    G = _probes(n, m, distribution, gen)
    G = G - Q @ (Q.T @ G)
    samples = (G * _apply_blocks(A, G, block_size)).sum(0)
    rest, stderr = _mean_and_stderr(samples)
    return Estimate(sketch + rest, stderr, 3 * m, samples)


def frobenius_norm(A, num_probes: int = 100, distribution: str = "rademacher", *,
                   seed: Optional[int] = None, generator: Optional[torch.Generator] = None,
                   block_size: Optional[int] = None) -> Estimate:
    """||A||_F from ||A||_F^2 = E |A v|^2 (E[v v^T] = I).

    ``value`` is the norm; its standard error follows from that of the squared norm by
    the delta method (se / (2 ||A||_F)); ``samples`` are the terms |A v_i|^2.

    Arguments as :func:`hutchinson_trace`.
    """
    n = _check_operator(A, "pyflat.frobenius_norm")
    _check_count("num_probes", num_probes, 2, "pyflat.frobenius_norm")
    gen = _generator(seed, generator)
    V = _probes(n, num_probes, distribution, gen)
    samples = _apply_blocks(A, V, block_size).pow(2).sum(0)
    squared, stderr = _mean_and_stderr(samples)
    norm = math.sqrt(max(squared, 0.0))
    return Estimate(norm, stderr / (2 * norm) if norm > 0 else stderr, num_probes, samples)

"""Randomized trace and Frobenius-norm estimators with standard errors.

Hutchinson's estimator (Hutchinson 1989), Hutch++ (Meyer, Musco, Musco & Woodruff 2021,
"Hutch++: Optimal Stochastic Trace Estimation"), an adaptive Hutch++ run to a target
error, and ||A||_F from E ||A v||^2. Each takes a symmetric operator A of shape (n, n)
(a pyflat operator, a reference operator or a dense tensor) and returns an
:class:`Estimate`.

All probes of an estimate run as blocks of products (``A @ V`` with V of shape (n, k)),
not as a loop of single products. Probes are drawn in float64 on the CPU from an explicit
seed or generator, so the same call gives the same numbers on any device.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .._progress import progress_bar
from .lanczos import _check_operator, _generator
from .operator import operator_block_size

__all__ = ["Estimate", "adaptive_trace", "hutchinson_trace", "hutchpp_trace", "frobenius_norm"]


@dataclass
class Estimate:
    """A randomized estimate.

    Attributes:
        value: the estimate.
        stderr: its standard error (sample standard deviation of the per-probe terms over
            sqrt of their number); a part computed exactly (the Hutch++ sketch) adds none.
        products: operator products used (columns of V sent through ``A @ V``).
        samples: the per-probe terms whose mean is the random part of the estimate, a
            float64 CPU tensor of shape (m,) for m probes.
        converged: for :func:`adaptive_trace`, whether the target error was reached
            before ``max_products``; None for the fixed-budget estimators.
    """

    value: float
    stderr: float
    products: int
    samples: torch.Tensor
    converged: bool | None = None  # for estimates run to a target error

    def __repr__(self) -> str:
        return f"Estimate({self.value:.6g} +- {self.stderr:.2g}, products={self.products})"


def _probes(n: int, count: int, distribution: str, gen: torch.Generator) -> torch.Tensor:
    if distribution == "rademacher":
        return torch.randint(0, 2, (n, count), generator=gen).to(torch.float64).mul_(2).sub_(1)
    if distribution == "gaussian":
        return torch.randn(n, count, generator=gen, dtype=torch.float64)
    raise ValueError(f"distribution must be 'rademacher' or 'gaussian', got {distribution!r}")


def _apply_blocks(A, V: torch.Tensor, block_size: int | None) -> torch.Tensor:
    """A @ V in float64, with the columns of V sent in blocks of ``block_size`` (None: the
    operator's own bound, else all at once)."""
    step = block_size or operator_block_size(A) or V.shape[1]
    outs = []
    for block in V.split(step, dim=1):
        out = A @ block.to(dtype=A.dtype, device=A.device)
        outs.append(out.to(dtype=torch.float64, device=V.device))
    return torch.cat(outs, dim=1)


def _check_count(name: str, value, minimum: int, caller: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{caller}: {name} must be an int >= {minimum}, got {value!r}")


def _mean_and_stderr(samples: torch.Tensor) -> tuple[float, float]:
    m = samples.numel()
    stderr = float(samples.std(unbiased=True)) / math.sqrt(m) if m > 1 else math.inf
    return float(samples.mean()), stderr


def hutchinson_trace(A, num_probes: int = 100, distribution: str = "rademacher", *,
                     seed: int | None = None, generator: torch.Generator | None = None,
                     block_size: int | None = None) -> Estimate:
    """Hutchinson's estimator tr(A) ~ (1/m) sum_i v_i^T A v_i (Hutchinson 1989).

    The probes v_i (n,) have E[v v^T] = I, so each term is unbiased. With Rademacher
    probes (entries +-1) the variance of one term is 2 (||A||_F^2 - sum_i A_ii^2), that of
    the estimate 2 (||A||_F^2 - sum_i A_ii^2) / m; Gaussian probes give 2 ||A||_F^2 / m.

    Args:
        A: symmetric (n, n) operator (pyflat operator, reference operator, dense tensor)
            of any float dtype and device; probes are cast to its dtype and device, and
            products back to float64.
        num_probes: m, the number of probes (= products), at least 2.
        distribution: 'rademacher' or 'gaussian'.
        seed, generator: randomness of the probes (at most one; neither means seed 0).
        block_size: probes per product call, so V is (n, block_size) (default: the
            operator's ``block_size()``, which depends on static sizes only; all at once for
            a dense tensor).

    Returns:
        An :class:`Estimate` with ``samples`` the m terms v_i^T A v_i and ``stderr`` their
        standard deviation over sqrt(m).

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
                  seed: int | None = None, generator: torch.Generator | None = None,
                  block_size: int | None = None) -> Estimate:
    """Hutch++ (Meyer, Musco, Musco & Woodruff 2021, "Hutch++: Optimal Stochastic Trace
    Estimation"): the trace of a low-rank sketch, computed exactly, plus Hutchinson on the
    deflated rest.

    With m = num_products // 3: Q (n, m) = orth(A S) for m random probes S (n, m);
    tr(A) ~ tr(Q^T A Q) + (1/m) sum_i g_i^T (I - QQ^T) A (I - QQ^T) g_i over m further
    probes g_i, projected as (I - QQ^T) g_i before the product. That is 3m products: A S,
    A Q and A G. The standard error is that of the Hutchinson part (the sketch part has
    none given Q). To reach relative error eps, Hutch++ needs O(1/eps) products where
    Hutchinson needs O(1/eps^2) (for positive semidefinite A), and far fewer than
    Hutchinson in practice for a decaying spectrum, as curvature spectra of trained nets
    are.

    Args:
        A: symmetric (n, n) operator, as :func:`hutchinson_trace` takes.
        num_products: total products, at least 6; 3 * (num_products // 3) are used (a
            multiple of 3 is used in full).
        Other arguments as :func:`hutchinson_trace`.

    Returns:
        An :class:`Estimate` with ``products`` = 3m and ``samples`` the m deflated terms.
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
                   seed: int | None = None, generator: torch.Generator | None = None,
                   block_size: int | None = None) -> Estimate:
    """||A||_F from ||A||_F^2 = E ||A v||^2 (E[v v^T] = I).

    E ||A v||^2 = E v^T A^T A v = tr(A^T A) = ||A||_F^2 (the sum of lambda_i^2 for
    symmetric A), so this is Hutchinson's estimator of tr(A^2) with one product per probe:
    ||A||_F^2 ~ (1/m) sum_i ||A v_i||^2.

    ``value`` is the norm, the square root of that mean; its standard error follows from
    that of the squared norm by the delta method (se / (2 ||A||_F)); ``samples`` are the m
    terms ||A v_i||^2 (float64, (m,)), ``products`` = m.

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


def adaptive_trace(A, rel_stderr: float = 0.01, *, sketch_products: int = 20,
                   block_size: int = 16, max_products: int = 10_000,
                   distribution: str = "rademacher", seed: int | None = None,
                   generator: torch.Generator | None = None,
                   progress: bool | None = None) -> Estimate:
    """The trace to a target relative standard error, with as few products as it needs.

    Hutch++ (Meyer, Musco, Musco & Woodruff 2021) with an open-ended second stage: a
    sketch Q (n, s) = orth(A S) of s = ``sketch_products`` probes whose part tr(Q^T A Q)
    is exact (2s products), then blocks of ``block_size`` Hutchinson probes deflated as
    (I - QQ^T) g, until stderr <= rel_stderr * |estimate| (at least two blocks) or
    another block would take the products past ``max_products``; ``converged`` says
    which. With ``sketch_products=0`` it is plain Hutchinson run to the target.

    Args:
        A: symmetric (n, n) operator, as :func:`hutchinson_trace` takes.
        rel_stderr: target standard error relative to |estimate|, in (0, 1).
        sketch_products: s, probes of the sketch (0 for none).
        block_size: probes per block of the second stage (each one ``A @ V`` call with V
            (n, block_size)), at least 2.
        max_products: budget, at least 2s + 2 * block_size.
        distribution, seed, generator: as :func:`hutchinson_trace`.
        progress: show a bar on stderr (None: only on a terminal).

    Returns:
        An :class:`Estimate` with ``converged`` set and ``samples`` the deflated terms.

    Example:
        >>> est = pyflat.adaptive_trace(pyflat.Hessian(model, (X, y)), 0.01, seed=0)
        >>> est.value, est.stderr, est.products
    """
    n = _check_operator(A, "pyflat.adaptive_trace")
    if not 0 < rel_stderr < 1:
        raise ValueError(f"pyflat.adaptive_trace: rel_stderr must be in (0, 1), got "
                         f"{rel_stderr!r}")
    _check_count("sketch_products", sketch_products, 0, "pyflat.adaptive_trace")
    _check_count("block_size", block_size, 2, "pyflat.adaptive_trace")
    _check_count("max_products", max_products, 1, "pyflat.adaptive_trace")
    least = 2 * sketch_products + 2 * block_size
    if max_products < least:
        raise ValueError(f"pyflat.adaptive_trace: max_products must cover the sketch "
                         f"(2 x sketch_products = {2 * sketch_products}) and two blocks "
                         f"(2 x block_size = {2 * block_size}), at least {least}; got "
                         f"{max_products}")
    gen = _generator(seed, generator)
    products = 0
    sketch = 0.0
    Q = torch.zeros(n, 0, dtype=torch.float64)
    if sketch_products > 0:
        S = _probes(n, sketch_products, distribution, gen)
        Q, _ = torch.linalg.qr(_apply_blocks(A, S, None))
        sketch = float((Q * _apply_blocks(A, Q, None)).sum())
        products += 2 * sketch_products
    samples = torch.zeros(0, dtype=torch.float64)
    bar = progress_bar(None, "pyflat.adaptive_trace", progress)
    bar.update(products)
    while True:
        G = _probes(n, block_size, distribution, gen)
        G = G - Q @ (Q.T @ G)
        samples = torch.cat([samples, (G * _apply_blocks(A, G, None)).sum(0)])
        products += block_size
        bar.update(block_size)
        rest, stderr = _mean_and_stderr(samples)
        value = sketch + rest
        bar.set_postfix_str(f"relative error {stderr / max(abs(value), 1e-300):.1e}")
        done = samples.numel() >= 2 * block_size and stderr <= rel_stderr * abs(value)
        if done or products + block_size > max_products:
            bar.close()
            return Estimate(value, stderr, products, samples, converged=done)
